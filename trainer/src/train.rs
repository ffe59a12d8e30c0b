//! The training loop: for each optimizer step, accumulate gradients over micro-batches,
//! guard against non-finite values, clip, update, log.
use crate::checkpointing::{self, TrainerState};
use crate::config::{Config, DeviceChoice, Precision};
use crate::data::{DataLoader, TokenSource};
use crate::metrics::{peak_rss_bytes, JsonlSink, LayerActivity};
use crate::model::{cross_entropy, Llama};
use crate::optim::{l1_coeff, learning_rate, AdamW, Zero1};
use crate::repack;
use crate::scheduler::PathScheduler;
use crate::stop::StopSignal;
use crate::tensor_parallel::{self, split_of, ParallelGroups, Split};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sparse_launch::{stable_hash, World};
use sparse_tensorboard::EventWriter;
use std::path::{Path, PathBuf};
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

/// Trains on this process's share of `world`: data parallel over all ranks (gradients
/// summed over ranks in flat buckets, or reduce-scattered with ZeRO-1), every rank seeing
/// its own disjoint micro-batches of the same global batch; only rank 0 writes.
pub fn train(cfg: &Config, opts: &RunOptions, world: &World) -> Result<()> {
    let mut cfg = cfg.clone();
    if let Some(n) = opts.max_steps {
        cfg.train.max_steps = n;
    }
    if let Some(d) = &opts.out_dir {
        cfg.train.out_dir = d.clone();
    }
    let everyone = world.collective();
    let groups = ParallelGroups::new(&cfg, world)?;
    let dp = groups.data();
    let tp = groups.tensor.as_ref();
    cfg.parallel.data = dp.size();
    cfg.validate(Path::new("(after applying the world size)"))?;
    everyone.check_same_on_all_ranks(
        "config",
        stable_hash(serde_json::to_string(&cfg)?.as_bytes()),
    )?;
    let main = world.is_main();
    MAIN_RANK.store(main, std::sync::atomic::Ordering::Relaxed);
    let t = &cfg.train;
    let device = match t.device {
        DeviceChoice::Cpu => Device::Cpu,
        _ if world.size() > 1 => world.device(),
        choice => pick_device(choice)?,
    };
    if t.device == DeviceChoice::Cuda && !device.is_cuda() {
        bail!("config train.device is `cuda` but no CUDA device is available");
    }
    // Mixed precision: bf16 matrix products over fp32 master weights (explicit casts in the
    // model rather than libtorch's autocast, whose weight-cast cache is not ours to manage).
    let bf16 = t.precision == Precision::Bf16 && device.is_cuda();
    tch::manual_seed(t.seed as i64);
    if device.is_cuda() {
        tch::Cuda::manual_seed_all(t.seed);
    }
    let vs = VarStore::new(device);
    let mut model = Llama::new_parallel(&vs, &cfg.model, groups.tensor.clone());
    if bf16 {
        model.compute = Kind::BFloat16;
    }
    let mut opt = AdamW::new(vs.variables().into_iter().collect(), t);
    if let Some(tp) = tp {
        for p in &mut opt.params {
            if split_of(&p.name) == Split::Replicated {
                p.norm_share = 1.0 / tp.size as f64;
            }
        }
    }
    let tp_size = tp.map_or(1, |tp| tp.size);
    let local_hidden = cfg.model.intermediate_size / tp_size;
    // Identical initial weights on every rank (same seed; the broadcast makes it certain).
    for p in &mut opt.params {
        dp.broadcast(&mut p.param, 0)?;
    }
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

    let accum = t.batch_size / (t.micro_batch_size * dp.size());
    let step_tokens = (t.batch_size * t.seq_len) as u64;
    let flops_per_token = cfg.model.train_flops_per_token(t.seq_len);
    let mut sched = PathScheduler::new(&cfg.sparsity, cfg.model.num_layers)?;
    let mut activity = LayerActivity::new(cfg.model.num_layers, local_hidden, device);
    let mut layout = repack::full_layout(cfg.model.num_layers, cfg.model.intermediate_size);
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
        world_size: world.size(),
        config: cfg.clone(),
        interval: Default::default(),
        ffn_layout: Vec::new(),
    };
    if let Some(resume) = &opts.resume {
        let path = checkpointing::resolve(resume.as_deref(), &t.out_dir);
        state = tensor_parallel::restore(
            tp.map(|t| t.as_ref()),
            &path,
            &cfg,
            &mut opt,
            &mut sched,
            &mut activity.tokens_since_fired,
        )?;
        state.config = cfg.clone();
        for (l, kept) in state.ffn_layout.iter().enumerate() {
            layout[l] = Tensor::from_slice(kept);
        }
        if state.interval.active_sum.len() == cfg.model.num_layers {
            activity.import_interval(&state.interval, dp);
        }
    }
    let mut zero1 = cfg.parallel.zero1.then(|| Zero1::new(&opt, dp));
    let restart_at = opts.resume.is_some().then_some(state.step as i64 + 1);
    let mut log = RunLog::open(&t.out_dir, main, restart_at)?;
    let mut saver = Saver::default();

    let pb = if opts.quiet || !main {
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
            // Rank r's micro-batches are its own contiguous block of the global batch.
            let first = cursor + ((dp.rank() * accum + micro) * t.micro_batch_size) as u64;
            let batch = loader
                .sequences(first, t.micro_batch_size)
                .to_device(device);
            let inputs = batch.narrow(1, 0, t.seq_len as i64);
            let targets = batch.narrow(1, 1, t.seq_len as i64);
            let out = model.forward(&inputs, &paths);
            let ce_sum = cross_entropy(&out.logits, &targets, Reduction::Sum);
            // Sums over this micro-batch divided by the global token count: the gradients
            // accumulate to the exact global mean, whatever the accumulation or world size.
            let loss = (&ce_sum + &out.l1_sum * lambda) / step_tokens as f64;
            loss.backward();
            ce_acc += ce_sum.detach();
            l1_acc += out.l1_sum.detach();
            activity.add(&out.layers);
        }
        let mut norm_sq = match zero1.as_mut() {
            Some(z) => z.reduce_scatter_grads(&opt, dp)?,
            None => {
                let mut grads: Vec<Tensor> = opt.params.iter().map(|p| p.param.grad()).collect();
                dp.all_reduce_sum_many(&mut grads)?;
                opt.grad_sq()
            }
        };
        if let Some(tp) = tp {
            // Split tensors' squares summed over the group, replicated ones counted once
            // (norm_share), and the L1 values of every rank's units.
            let mut both = Tensor::stack(&[&norm_sq, &l1_acc], 0);
            tp.sum_stat(&mut both)?;
            norm_sq = both.get(0);
            l1_acc = both.get(1);
        }
        let norm_t = norm_sq.sqrt();
        let mut sums = Tensor::stack(&[&ce_acc, &l1_acc], 0);
        dp.all_reduce_sum(&mut sums)?;
        activity.reduce_step(dp)?;
        let host: Vec<f64> = Vec::try_from(
            Tensor::cat(&[&sums, &norm_t.view([1])], 0)
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
            log.record(&json!({"step": step, "skipped": true, "loss": loss.to_string(), "grad_norm": grad_norm.to_string()}))?;
            if skipped_in_a_row >= t.max_skipped_steps {
                saver.wait()?;
                bail!("{skipped_in_a_row} consecutive non-finite steps: stopping (last good checkpoint kept)");
            }
            cursor += t.batch_size as u64;
            activity.end_step(step_tokens);
            log.scalars(
                step as i64 + 1,
                &[("train/skipped_steps".into(), skipped_total as f32)],
            )?;
            pb.inc(1);
            continue;
        }
        skipped_in_a_row = 0;
        match zero1.as_mut() {
            Some(z) => z.step(&mut opt, dp, lr, grad_norm, t.grad_clip)?,
            None => {
                opt.clip(grad_norm, t.grad_clip);
                opt.step(lr);
            }
        }
        opt.zero_grad();
        cursor += t.batch_size as u64;
        activity.end_step(step_tokens);
        let repack_every = cfg.sparsity.repack_every;
        if repack_every > 0 && (step + 1) % repack_every == 0 {
            if let Some(z) = zero1.as_ref() {
                z.gather_moments(&mut opt, dp)?;
            }
            let removed = repack::prune_dead(
                &mut opt,
                &mut activity.tokens_since_fired,
                &mut layout,
                cfg.sparsity.tokens_until_dead,
            );
            if zero1.is_some() {
                zero1 = Some(Zero1::new(&opt, dp));
            }
            if removed.iter().any(|&n| n > 0) {
                let h: Vec<i64> = layout.iter().map(|k| k.size()[0]).collect();
                log_line(
                    &pb,
                    format!(
                        "step {}: repacked the FFN, units per layer now {h:?}",
                        step + 1
                    ),
                );
            }
        }
        interval_tokens += step_tokens;
        interval_ce += ce;
        interval_steps += 1;
        log.record(&json!({"step": step, "loss": loss, "ce": ce, "l1": l1, "lambda": lambda, "lr": lr, "grad_norm": grad_norm}))?;

        let last = step + 1 == t.max_steps;
        if (step + 1) % t.log_every == 0 || last {
            let layers = activity.summarize(
                cfg.model.intermediate_size,
                cfg.sparsity.tokens_until_dead,
                dp,
                tp.map(|tp| tp.group()),
            )?;
            sched.observe(step, &layers);
            let reinitialized = if cfg.sparsity.reinit_dead {
                crate::dead_units::reinit_dead_gates(
                    &model,
                    &mut opt,
                    &mut activity.tokens_since_fired,
                    cfg.sparsity.tokens_until_dead,
                    t.seed,
                    step,
                )
            } else {
                vec![0; cfg.model.num_layers]
            };
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
            // Peak bytes held by tensors (caching allocator) on GPU, peak RSS on CPU.
            let mem_bytes = sparse_kernels::cuda_runtime::peak_allocated_bytes(device)
                .unwrap_or_else(peak_rss_bytes);
            let mem_gib = mem_bytes as f64 / (1u64 << 30) as f64;
            let nnz: f64 = layers.iter().map(|l| l.nnz_mean).sum::<f64>() / layers.len() as f64;
            let sparsity = 1.0 - nnz / cfg.model.intermediate_size as f64;
            let mut val_ce = None;
            if let Some(v) = val.as_mut() {
                if (step + 1) % t.eval_every == 0 || last {
                    val_ce = Some(evaluate(&model, v, &cfg, &paths, device)?);
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
            log.record(&json!({
                "log_step": step + 1, "loss": loss, "ce": interval_ce / interval_steps.max(1) as f64,
                "l1": l1, "lambda": lambda, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s, "mfu": mfu, "memory_gib": mem_gib,
                "sparsity": sparsity, "nnz_per_token": nnz, "skipped_total": skipped_total,
                "val_ce": val_ce, "layers": layers, "reinitialized": reinitialized,
                "ffn_path": sched.paths().iter().map(|p| p.name()).collect::<Vec<_>>(),
            }))?;
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
                scalars.push((
                    format!("layer{l:02}/reinitialized"),
                    reinitialized[l] as f32,
                ));
            }
            log.scalars(s, &scalars)?;
            log.flush()?;
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
        // Every rank stops at the same step when any one of them got a signal.
        let stopping = everyone.any_rank_flag(stop.requested());
        let periodic = cfg.checkpoint.every > 0 && state.step.is_multiple_of(cfg.checkpoint.every);
        if stopping || periodic || state.step == t.max_steps {
            if let Some(z) = zero1.as_ref() {
                z.gather_moments(&mut opt, dp)?;
            }
            state.interval = activity.export_interval(dp)?;
            let hidden = cfg.model.intermediate_size as i64;
            state.ffn_layout = if layout.iter().all(|k| k.size()[0] == hidden) {
                Vec::new()
            } else {
                layout
                    .iter()
                    .map(|k| Vec::<i64>::try_from(k).expect("int64 layout"))
                    .collect()
            };
            // With tensor parallelism, data-parallel group 0 gathers the full tensors for
            // rank 0 (one checkpoint of the whole model, loadable at any layout).
            let full = match tp {
                Some(tp) if dp.rank() == 0 => Some(tensor_parallel::gather_full(
                    tp,
                    &opt,
                    &activity.tokens_since_fired,
                    t,
                )?),
                _ => None,
            };
            if main {
                let (o, clocks) = match &full {
                    Some((o, c)) => (o, c.as_slice()),
                    None => (&opt, activity.tokens_since_fired.as_slice()),
                };
                let snap = checkpointing::snapshot(&cfg, o, &state, clocks)?;
                saver.save(
                    t.out_dir.clone(),
                    state.step as u64,
                    snap,
                    cfg.checkpoint.keep_last,
                )?;
            }
        }
        if stopping {
            saver.wait()?;
            log.flush()?;
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

/// The run's metric sinks, `metrics.jsonl` and TensorBoard events: rank 0 only.
struct RunLog {
    jsonl: Option<JsonlSink>,
    tb: Option<EventWriter>,
}

impl RunLog {
    /// `restart_at`: first step a resumed run logs (TensorBoard drops later old points).
    fn open(dir: &Path, main: bool, restart_at: Option<i64>) -> Result<RunLog> {
        if !main {
            return Ok(RunLog {
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
            jsonl: Some(jsonl),
            tb: Some(tb),
        })
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

    fn flush(&mut self) -> Result<()> {
        if let Some(j) = self.jsonl.as_mut() {
            j.flush()?;
        }
        if let Some(tb) = self.tb.as_mut() {
            tb.flush()?;
        }
        Ok(())
    }
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

/// Whether this process is rank 0, the only one that prints.
static MAIN_RANK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Prints above the progress bar, or plainly when there is none (not a terminal, --quiet).
fn log_line(pb: &ProgressBar, msg: String) {
    if !MAIN_RANK.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
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
            let out = model.forward(&inputs, paths);
            total += cross_entropy(&out.logits, &targets, Reduction::Mean).double_value(&[]);
        }
    });
    Ok(total / n as f64)
}
