//! The training loop: for each optimizer step, accumulate gradients over micro-batches,
//! guard against non-finite values, clip, update, log.
use crate::checkpointing::{self, TrainerState};
use crate::config::{Config, DeviceChoice, Precision};
use crate::data::{DataLoader, TokenSource};
use crate::metrics::{peak_rss_bytes, JsonlSink, LayerActivity};
use crate::model::Llama;
use crate::optim::{l1_coeff, learning_rate, AdamW};
use crate::scheduler::PathScheduler;
use crate::stop::StopSignal;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sparse_tensorboard::EventWriter;
use std::path::PathBuf;
use std::time::Instant;
use tch::{nn::VarStore, Device, Kind, Reduction, Tensor};

/// Command-line overrides of the config.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub max_steps: Option<usize>,
    /// `Some(None)`: resume from the run directory's latest checkpoint; `Some(Some(p))`:
    /// from `p` (a checkpoint or a run directory).
    pub resume: Option<Option<PathBuf>>,
    pub out_dir: Option<PathBuf>,
    pub quiet: bool,
}

/// bf16 peak of the GPU for MFU (H100 SXM dense bf16), overridable by SPARSE_TRAIN_PEAK_TFLOPS.
fn peak_flops() -> f64 {
    std::env::var("SPARSE_TRAIN_PEAK_TFLOPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(989.0)
        * 1e12
}

pub fn pick_device(choice: DeviceChoice) -> Result<Device> {
    Ok(match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda => {
            if !tch::Cuda::is_available() {
                bail!("config train.device is `cuda` but no CUDA device is available");
            }
            Device::Cuda(0)
        }
        DeviceChoice::Auto => Device::cuda_if_available(),
    })
}

pub fn train(cfg: &Config, opts: &RunOptions) -> Result<()> {
    let mut cfg = cfg.clone();
    if let Some(n) = opts.max_steps {
        cfg.train.max_steps = n;
    }
    if let Some(d) = &opts.out_dir {
        cfg.train.out_dir = d.clone();
    }
    let t = &cfg.train;
    let device = pick_device(t.device)?;
    let autocast = t.precision == Precision::Bf16 && device.is_cuda();
    tch::manual_seed(t.seed as i64);
    if device.is_cuda() {
        tch::Cuda::manual_seed_all(t.seed);
    }
    let vs = VarStore::new(device);
    let model = Llama::new(&vs, &cfg.model);
    let mut opt = AdamW::new(vs.variables().into_iter().collect(), t);
    let mut loader = match &cfg.data.train {
        Some(p) => DataLoader::from_shards(p, t.seq_len, t.seed)
            .with_context(|| format!("opening training data {}", p.display()))?,
        None => DataLoader::new(
            TokenSource::Synthetic {
                vocab_size: cfg.model.vocab_size,
            },
            t.seq_len,
            t.seed,
        )?,
    };
    if loader.vocab_size() > cfg.model.vocab_size {
        bail!(
            "data {}: tokenizer vocabulary {} exceeds model.vocab_size {}",
            cfg.data
                .train
                .as_ref()
                .map_or("synthetic".into(), |p| p.display().to_string()),
            loader.vocab_size(),
            cfg.model.vocab_size
        );
    }
    let mut val = match &cfg.data.val {
        Some(p) if t.eval_every > 0 => Some(
            DataLoader::from_shards(p, t.seq_len, t.seed)
                .with_context(|| format!("opening validation data {}", p.display()))?,
        ),
        _ => None,
    };

    let accum = t.batch_size / (t.micro_batch_size * cfg.parallel.data);
    let step_tokens = (t.batch_size * t.seq_len) as u64;
    let flops_per_token = cfg.model.train_flops_per_token(t.seq_len);
    let mut sched = PathScheduler::new(&cfg.sparsity, cfg.model.num_layers)?;
    let mut activity =
        LayerActivity::new(cfg.model.num_layers, cfg.model.intermediate_size, device);
    let stop = StopSignal::install().context("installing signal handlers")?;
    let mut state = TrainerState {
        step: 0,
        cursor: 0,
        tokens_seen: 0,
        skipped_total: 0,
        seed: t.seed,
        l1_coeff: 0.0,
        ffn_paths: sched.paths().iter().map(|p| p.name().to_string()).collect(),
        next_path_decision: sched.next_decision(),
        world_size: cfg.parallel.data * cfg.parallel.tensor,
        config: cfg.clone(),
    };
    if let Some(resume) = &opts.resume {
        let path = checkpointing::resolve(resume.as_deref(), &t.out_dir);
        state = checkpointing::restore(
            &path,
            &cfg,
            &mut opt,
            &mut sched,
            &mut activity.tokens_since_fired,
        )?;
        state.config = cfg.clone();
    }
    let mut tb = EventWriter::create(&t.out_dir).context("creating the TensorBoard event file")?;
    if opts.resume.is_some() {
        tb.mark_restart(state.step as i64 + 1)?;
    }
    let mut saver = Saver::default();
    let mut sink =
        JsonlSink::open(&t.out_dir).with_context(|| format!("creating {}", t.out_dir.display()))?;

    let pb = if opts.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(t.max_steps as u64)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap(),
    );
    let params = cfg.model.num_params();
    log_line(&pb, format!(
        "model: {:.1}M parameters, {} layers; device {:?}; batch {} x {} tokens, {} micro-batches of {}",
        params as f64 / 1e6,
        cfg.model.num_layers,
        device,
        t.batch_size,
        t.seq_len,
        accum,
        t.micro_batch_size
    ));

    if state.step > 0 {
        log_line(
            &pb,
            format!(
                "resumed at step {} (cursor {} sequences)",
                state.step, state.cursor
            ),
        );
        pb.set_position(state.step as u64);
    }
    let mut cursor = state.cursor;
    let mut skipped_in_a_row = 0usize;
    let mut skipped_total = state.skipped_total;
    let mut interval_start = Instant::now();
    let mut interval_tokens = 0u64;
    let mut interval_ce = 0.0f64;
    let mut interval_steps = 0usize;
    for step in state.step..t.max_steps {
        let lr = learning_rate(t, step);
        let lambda = l1_coeff(&cfg.sparsity, step);
        let paths = sched.paths().to_vec();
        let mut ce_acc = Tensor::zeros([], (Kind::Float, device));
        let mut l1_acc = Tensor::zeros([], (Kind::Float, device));
        for micro in 0..accum {
            let first = cursor + (micro * t.micro_batch_size) as u64;
            let batch = loader
                .sequences(first, t.micro_batch_size)
                .to_device(device);
            let inputs = batch.narrow(1, 0, t.seq_len as i64);
            let targets = batch.narrow(1, 1, t.seq_len as i64);
            let out = tch::autocast(autocast, || model.forward(&inputs, &paths));
            let ce_sum = out
                .logits
                .view([-1, cfg.model.vocab_size as i64])
                .cross_entropy_loss::<Tensor>(
                    &targets.reshape([-1]),
                    None,
                    Reduction::Sum,
                    -100,
                    0.0,
                );
            // Sums over this micro-batch divided by the global token count: the gradients
            // accumulate to the exact global mean, whatever the accumulation or world size.
            let loss = (&ce_sum + &out.l1_sum * lambda) / step_tokens as f64;
            loss.backward();
            ce_acc += ce_sum.detach();
            l1_acc += out.l1_sum.detach();
            activity.add(&out.layers);
        }
        let norm_t = opt.grad_norm();
        let host: Vec<f64> = Vec::try_from(
            Tensor::stack(&[&ce_acc, &l1_acc, &norm_t], 0)
                .to_kind(Kind::Double)
                .to_device(Device::Cpu),
        )?;
        let (ce, l1, grad_norm) = (
            host[0] / step_tokens as f64,
            host[1] / step_tokens as f64,
            host[2],
        );
        let loss = ce + lambda * l1;
        if !loss.is_finite() || !grad_norm.is_finite() {
            opt.zero_grad();
            skipped_in_a_row += 1;
            skipped_total += 1;
            log_line(
                &pb,
                format!(
                    "step {step}: non-finite loss {loss} or grad norm {grad_norm}: step skipped"
                ),
            );
            sink.write(&json!({"step": step, "skipped": true, "loss": loss.to_string(), "grad_norm": grad_norm.to_string()}))?;
            if skipped_in_a_row >= t.max_skipped_steps {
                saver.wait()?;
                bail!("{skipped_in_a_row} consecutive non-finite steps: stopping (last good checkpoint kept)");
            }
            cursor += t.batch_size as u64;
            activity.end_step(step_tokens);
            tb.add_scalar("train/skipped_steps", skipped_total as f32, step as i64 + 1)?;
            pb.inc(1);
            continue;
        }
        skipped_in_a_row = 0;
        opt.clip(grad_norm, t.grad_clip);
        opt.step(lr);
        opt.zero_grad();
        cursor += t.batch_size as u64;
        activity.end_step(step_tokens);
        interval_tokens += step_tokens;
        interval_ce += ce;
        interval_steps += 1;
        sink.write(&json!({"step": step, "loss": loss, "ce": ce, "l1": l1, "lambda": lambda, "lr": lr, "grad_norm": grad_norm}))?;

        let last = step + 1 == t.max_steps;
        if (step + 1) % t.log_every == 0 || last {
            let layers =
                activity.summarize(cfg.model.intermediate_size, cfg.sparsity.tokens_until_dead);
            sched.observe(step, &layers);
            if device.is_cuda() {
                tch::Cuda::synchronize(0);
            }
            let secs = interval_start.elapsed().as_secs_f64();
            let tokens_per_s = interval_tokens as f64 / secs;
            let mfu = if device.is_cuda() {
                tokens_per_s * flops_per_token / peak_flops()
            } else {
                0.0
            };
            let mem_gib = if device.is_cuda() {
                0.0
            } else {
                peak_rss_bytes() as f64 / (1u64 << 30) as f64
            };
            let nnz: f64 = layers.iter().map(|l| l.nnz_mean).sum::<f64>() / layers.len() as f64;
            let sparsity = 1.0 - nnz / cfg.model.intermediate_size as f64;
            let mut val_ce = None;
            if let Some(v) = val.as_mut() {
                if (step + 1) % t.eval_every == 0 || last {
                    val_ce = Some(evaluate(&model, v, &cfg, &paths, device, autocast)?);
                }
            }
            let msg = format!(
                "loss {loss:.4} ce {:.4} l1 {l1:.3} λ {lambda:.2e} lr {lr:.2e} |g| {grad_norm:.3} tok/s {tokens_per_s:.0} mfu {:.1}% mem {mem_gib:.1}GiB sparsity {:.2}% nnz {nnz:.1}{}",
                interval_ce / interval_steps.max(1) as f64,
                mfu * 100.0,
                sparsity * 100.0,
                val_ce.map_or(String::new(), |v| format!(" val {v:.4}"))
            );
            pb.set_message(msg.clone());
            log_line(&pb, format!("step {:>6} {msg}", step + 1));
            sink.write(&json!({
                "log_step": step + 1, "loss": loss, "ce": interval_ce / interval_steps.max(1) as f64,
                "l1": l1, "lambda": lambda, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s, "mfu": mfu, "memory_gib": mem_gib,
                "sparsity": sparsity, "nnz_per_token": nnz, "skipped_total": skipped_total,
                "val_ce": val_ce, "layers": layers,
                "ffn_path": sched.paths().iter().map(|p| p.name()).collect::<Vec<_>>(),
            }))?;
            sink.flush()?;
            let s = step as i64 + 1;
            let mut scalars: Vec<(String, f32)> = vec![
                ("train/loss".into(), loss as f32),
                (
                    "train/ce".into(),
                    (interval_ce / interval_steps.max(1) as f64) as f32,
                ),
                ("train/l1".into(), l1 as f32),
                ("train/lambda".into(), lambda as f32),
                ("train/lr".into(), lr as f32),
                ("train/grad_norm".into(), grad_norm as f32),
                ("train/skipped_steps".into(), skipped_total as f32),
                ("perf/tokens_per_s".into(), tokens_per_s as f32),
                ("perf/mfu".into(), mfu as f32),
                ("perf/memory_gib".into(), mem_gib as f32),
                ("sparsity/sparsity".into(), sparsity as f32),
                ("sparsity/nnz_per_token".into(), nnz as f32),
            ];
            if let Some(v) = val_ce {
                scalars.push(("val/ce".into(), v as f32));
            }
            for (l, (ls, path)) in layers.iter().zip(sched.paths()).enumerate() {
                scalars.push((format!("layer{l:02}/nnz_mean"), ls.nnz_mean as f32));
                scalars.push((format!("layer{l:02}/nnz_max"), ls.nnz_max as f32));
                scalars.push((format!("layer{l:02}/sparsity"), ls.sparsity as f32));
                scalars.push((format!("layer{l:02}/dead"), ls.dead as f32));
                scalars.push((format!("layer{l:02}/ffn_path"), path.id() as f32));
            }
            let refs: Vec<(&str, f32)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            tb.add_scalars(s, &refs)?;
            tb.flush()?;
            interval_start = Instant::now();
            interval_tokens = 0;
            interval_ce = 0.0;
            interval_steps = 0;
        }
        pb.inc(1);
        state.step = step + 1;
        state.cursor = cursor;
        state.tokens_seen += step_tokens;
        state.skipped_total = skipped_total;
        state.l1_coeff = lambda;
        state.ffn_paths = sched.paths().iter().map(|p| p.name().to_string()).collect();
        state.next_path_decision = sched.next_decision();
        let stopping = stop.requested();
        let periodic = cfg.checkpoint.every > 0 && state.step % cfg.checkpoint.every == 0;
        if stopping || periodic || state.step == t.max_steps {
            let snap = checkpointing::snapshot(&cfg, &opt, &state, &activity.tokens_since_fired)?;
            saver.save(
                t.out_dir.clone(),
                state.step as u64,
                snap,
                cfg.checkpoint.keep_last,
            )?;
        }
        if stopping {
            saver.wait()?;
            sink.flush()?;
            tb.flush()?;
            log_line(
                &pb,
                format!("stop requested: checkpoint written at step {}", state.step),
            );
            return Ok(());
        }
    }
    pb.finish();
    saver.wait()?;
    Ok(())
}

/// Writes checkpoints on a background thread (one at a time), so training continues while
/// the files are written and fsynced.
#[derive(Default)]
struct Saver {
    pending: Option<std::thread::JoinHandle<sparse_checkpoints::Result<PathBuf>>>,
}

impl Saver {
    fn save(
        &mut self,
        run: PathBuf,
        step: u64,
        ckpt: sparse_checkpoints::Checkpoint,
        keep: usize,
    ) -> Result<()> {
        self.wait()?;
        self.pending = Some(std::thread::spawn(move || {
            sparse_checkpoints::save(&run, step, &ckpt, keep)
        }));
        Ok(())
    }

    fn wait(&mut self) -> Result<()> {
        if let Some(h) = self.pending.take() {
            h.join()
                .map_err(|_| anyhow::anyhow!("checkpoint writer thread panicked"))??;
        }
        Ok(())
    }
}

/// Prints above the progress bar, or plainly when there is none (not a terminal, --quiet).
fn log_line(pb: &ProgressBar, msg: String) {
    if pb.is_hidden() {
        println!("{msg}");
    } else {
        pb.println(msg);
    }
}

/// Mean validation cross-entropy per token over `train.eval_batches` micro-batches.
fn evaluate(
    model: &Llama,
    val: &mut DataLoader,
    cfg: &Config,
    paths: &[sparse_kernels::FfnPath],
    device: Device,
    autocast: bool,
) -> Result<f64> {
    let t = &cfg.train;
    let n = t
        .eval_batches
        .min(val.windows_per_epoch() / t.micro_batch_size)
        .max(1);
    let mut total = 0.0;
    tch::no_grad(|| {
        for i in 0..n {
            let batch = val
                .sequences((i * t.micro_batch_size) as u64, t.micro_batch_size)
                .to_device(device);
            let inputs = batch.narrow(1, 0, t.seq_len as i64);
            let targets = batch.narrow(1, 1, t.seq_len as i64);
            let out = tch::autocast(autocast, || model.forward(&inputs, paths));
            total += out
                .logits
                .view([-1, cfg.model.vocab_size as i64])
                .cross_entropy_loss::<Tensor>(
                    &targets.reshape([-1]),
                    None,
                    Reduction::Mean,
                    -100,
                    0.0,
                )
                .double_value(&[]);
        }
    });
    Ok(total / n as f64)
}
