//! The run's log, in one place: the progress line, `metrics.jsonl` and the TensorBoard
//! scalars, written by rank 0 only.
//!
//! `metrics.jsonl` holds one record per optimizer step (`step`, `loss`, `ce`, `l1`, `lambda`,
//! `lr`, `grad_norm`; or `skipped` with the non-finite values as strings) and one per log
//! interval (`log_step` and the [`IntervalReport`] fields). The progress line and the
//! TensorBoard scalars report the same interval record.
use crate::sparsity::activity::LayerSummary;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sparse_kernels::FfnPath;
use sparse_tensorboard::EventWriter;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Appends one JSON object per line to `metrics.jsonl` in the run directory.
pub struct JsonlSink {
    file: std::fs::File,
}

impl JsonlSink {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("metrics.jsonl"))?;
        Ok(JsonlSink { file })
    }

    pub fn write(&mut self, value: &serde_json::Value) -> std::io::Result<()> {
        writeln!(self.file, "{value}")
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The values of one completed (not skipped) optimizer step.
#[derive(Clone, Copy, Debug)]
pub struct StepValues {
    /// `ce + lambda * l1`.
    pub loss: f64,
    /// Mean cross-entropy per token of the global batch.
    pub ce: f64,
    /// The L1 term per token (mean over layers of `sum_j |h_j|`).
    pub l1: f64,
    pub lambda: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

/// Running means of the completed steps of a log interval, and its clock.
pub struct Window {
    start: Instant,
    tokens: u64,
    steps: usize,
    loss: f64,
    ce: f64,
    l1: f64,
    grad_norm: f64,
}

impl Window {
    pub fn start() -> Window {
        Window {
            start: Instant::now(),
            tokens: 0,
            steps: 0,
            loss: 0.0,
            ce: 0.0,
            l1: 0.0,
            grad_norm: 0.0,
        }
    }

    pub fn add(&mut self, v: &StepValues, tokens: u64) {
        self.tokens += tokens;
        self.steps += 1;
        self.loss += v.loss;
        self.ce += v.ce;
        self.l1 += v.l1;
        self.grad_norm += v.grad_norm;
    }

    /// Tokens per second of the completed steps since [`Window::start`] (call after the
    /// device has finished their work).
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.start.elapsed().as_secs_f64()
    }

    /// `(loss, ce, l1, grad_norm)` averaged over the interval's completed steps.
    pub fn means(&self) -> (f64, f64, f64, f64) {
        let n = self.steps.max(1) as f64;
        (self.loss / n, self.ce / n, self.l1 / n, self.grad_norm / n)
    }
}

/// What one log interval reports.
pub struct IntervalReport<'a> {
    /// Optimizer steps completed at the end of the interval.
    pub step: usize,
    /// Means over the interval's completed steps ([`Window::means`]).
    pub loss: f64,
    pub ce: f64,
    pub l1: f64,
    pub grad_norm: f64,
    /// The schedules' values at the interval's last step.
    pub lambda: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation (0 on the CPU).
    pub mfu: f64,
    pub memory_gib: f64,
    pub sparsity: f64,
    pub nnz_per_token: f64,
    pub skipped_total: usize,
    pub val_ce: Option<f64>,
    pub layers: &'a [LayerSummary],
    pub reinitialized: &'a [i64],
    pub ffn_paths: &'a [FfnPath],
}

/// The progress bar (or plain lines) and the metric sinks of a run.
pub struct RunLog {
    main: bool,
    pb: ProgressBar,
    jsonl: Option<JsonlSink>,
    tb: Option<EventWriter>,
}

impl RunLog {
    /// Opens the sinks in `dir` on rank 0 (`main`); the other ranks log nothing.
    /// `restart_at`: first step a resumed run logs (TensorBoard drops later old points).
    /// `quiet`: plain lines, no progress bar.
    pub fn open(
        dir: &Path,
        main: bool,
        restart_at: Option<i64>,
        quiet: bool,
        max_steps: usize,
    ) -> Result<RunLog> {
        let pb = if quiet || !main {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(max_steps as u64)
        };
        pb.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap(),
        );
        if !main {
            return Ok(RunLog {
                main,
                pb,
                jsonl: None,
                tb: None,
            });
        }
        let mut tb = EventWriter::create(dir).context("creating the TensorBoard event file")?;
        if let Some(step) = restart_at {
            tb.mark_restart(step)?;
        }
        let jsonl = JsonlSink::open(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(RunLog {
            main,
            pb,
            jsonl: Some(jsonl),
            tb: Some(tb),
        })
    }

    /// Prints above the progress bar, or plainly when there is none (not a terminal,
    /// --quiet); nothing on ranks other than 0.
    pub fn line(&self, msg: &str) {
        if !self.main {
            return;
        }
        if self.pb.is_hidden() {
            println!("{msg}");
        } else {
            self.pb.println(msg);
        }
    }

    /// Moves the progress bar to `steps` completed steps.
    pub fn set_position(&self, steps: usize) {
        self.pb.set_position(steps as u64);
    }

    /// One more step done.
    pub fn advance(&self) {
        self.pb.inc(1);
    }

    pub fn finish(&self) {
        self.pb.finish();
    }

    /// The per-step record of completed step `step` (0-based).
    pub fn step(&mut self, step: usize, v: &StepValues) -> Result<()> {
        self.record(&json!({
            "step": step, "loss": v.loss, "ce": v.ce, "l1": v.l1, "lambda": v.lambda,
            "lr": v.lr, "grad_norm": v.grad_norm,
        }))
    }

    /// Step `step` (0-based) skipped for a non-finite loss or gradient norm.
    pub fn skipped(&mut self, step: usize, loss: f64, grad_norm: f64) -> Result<()> {
        self.line(&format!(
            "step {step}: non-finite loss {loss} or grad norm {grad_norm}: step skipped"
        ));
        self.record(&json!({
            "step": step, "skipped": true, "loss": loss.to_string(),
            "grad_norm": grad_norm.to_string(),
        }))
    }

    /// The count of skipped steps after step `step` (0-based) was skipped.
    pub fn skipped_total(&mut self, step: usize, skipped_total: usize) -> Result<()> {
        self.scalars(
            step as i64 + 1,
            &[("train/skipped_steps".into(), skipped_total as f32)],
        )
    }

    /// The interval record: the progress line, its `metrics.jsonl` record and the
    /// TensorBoard scalars, then a flush. The line reads
    /// `step N loss .. ce .. l1 .. λ .. lr .. |g| .. tok/s .. mfu ..% mem ..GiB sparsity ..% nnz ..[ val ..]`:
    /// loss, ce, l1 and |g| are means over the interval's completed steps, λ and lr the
    /// schedules' values at its last step.
    pub fn interval(&mut self, r: &IntervalReport) -> Result<()> {
        let msg = format!(
            "loss {:.4} ce {:.4} l1 {:.3} λ {:.2e} lr {:.2e} |g| {:.3} tok/s {:.0} mfu {:.1}% mem {:.1}GiB sparsity {:.2}% nnz {:.1}{}",
            r.loss,
            r.ce,
            r.l1,
            r.lambda,
            r.lr,
            r.grad_norm,
            r.tokens_per_s,
            r.mfu * 100.0,
            r.memory_gib,
            r.sparsity * 100.0,
            r.nnz_per_token,
            r.val_ce.map_or(String::new(), |v| format!(" val {v:.4}"))
        );
        self.pb.set_message(msg.clone());
        self.line(&format!("step {:>6} {msg}", r.step));
        self.record(&json!({
            "log_step": r.step, "loss": r.loss, "ce": r.ce, "l1": r.l1, "lambda": r.lambda,
            "lr": r.lr, "grad_norm": r.grad_norm, "tokens_per_s": r.tokens_per_s,
            "mfu": r.mfu, "memory_gib": r.memory_gib, "sparsity": r.sparsity,
            "nnz_per_token": r.nnz_per_token, "skipped_total": r.skipped_total,
            "val_ce": r.val_ce, "layers": r.layers, "reinitialized": r.reinitialized,
            "ffn_path": r.ffn_paths.iter().map(|p| p.name()).collect::<Vec<_>>(),
        }))?;
        // TensorBoard tags: `group/name`, and `layerNN/name` per layer.
        let groups: [(&str, &[(&str, f64)]); 4] = [
            ("train", &[("loss", r.loss), ("ce", r.ce), ("l1", r.l1)]),
            (
                "train",
                &[
                    ("lambda", r.lambda),
                    ("lr", r.lr),
                    ("grad_norm", r.grad_norm),
                    ("skipped_steps", r.skipped_total as f64),
                ],
            ),
            (
                "perf",
                &[
                    ("tokens_per_s", r.tokens_per_s),
                    ("mfu", r.mfu),
                    ("memory_gib", r.memory_gib),
                ],
            ),
            (
                "sparsity",
                &[("sparsity", r.sparsity), ("nnz_per_token", r.nnz_per_token)],
            ),
        ];
        let mut scalars: Vec<(String, f32)> = groups
            .iter()
            .flat_map(|(g, values)| {
                values
                    .iter()
                    .map(move |(k, v)| (format!("{g}/{k}"), *v as f32))
            })
            .collect();
        if let Some(v) = r.val_ce {
            scalars.push(("val/ce".into(), v as f32));
        }
        for (l, (ls, path)) in r.layers.iter().zip(r.ffn_paths).enumerate() {
            let per_layer = [
                ("nnz_mean", ls.nnz_mean),
                ("nnz_max", ls.nnz_max as f64),
                ("sparsity", ls.sparsity),
                ("dead", ls.dead as f64),
                ("ffn_path", path.id() as f64),
                ("reinitialized", r.reinitialized[l] as f64),
            ];
            scalars.extend(per_layer.map(|(k, v)| (format!("layer{l:02}/{k}"), v as f32)));
        }
        self.scalars(r.step as i64, &scalars)?;
        self.flush()
    }

    fn record(&mut self, v: &serde_json::Value) -> Result<()> {
        if let Some(j) = self.jsonl.as_mut() {
            j.write(v)?;
        }
        Ok(())
    }

    fn scalars(&mut self, step: i64, scalars: &[(String, f32)]) -> Result<()> {
        if let Some(tb) = self.tb.as_mut() {
            let refs: Vec<(&str, f32)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            tb.add_scalars(step, &refs)?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        if let Some(j) = self.jsonl.as_mut() {
            j.flush()?;
        }
        if let Some(tb) = self.tb.as_mut() {
            tb.flush()?;
        }
        Ok(())
    }
}

/// Peak resident memory of this process in bytes (Linux), for CPU runs.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
