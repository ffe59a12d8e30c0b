//! The training loop: for each optimizer step, accumulate gradients over micro-batches,
//! guard against non-finite values, clip, update, repack; every `log_every` steps summarise
//! and log the interval; checkpoint periodically, at the end, and on a stop signal.
use super::log::{peak_rss_bytes, IntervalReport, RunLog, StepValues, Window};
use super::micro_batch::MicroBatchRunner;
use super::oom::{self, OutOfMemory};
use super::profile::{ProfileSteps, StepProfiler};
use super::stop::StopSignal;
use crate::checkpoint::parallel as tp_checkpoint;
use crate::checkpoint::saver::Saver;
use crate::checkpoint::state::{self as checkpoint_state, TrainerState};
use crate::config::{Config, DeviceChoice, Precision};
use crate::data::manifest::{self, ShardManifest};
use crate::data::{DataLoader, TokenSource};
use crate::model::parallel::{split_of, ParallelGroups, Split};
use crate::model::{cross_entropy, Llama};
use crate::optim::{learning_rate, AdamW, Zero1};
use crate::sparsity::activity::LayerActivity;
use crate::sparsity::dead_units::reinit_dead_gates;
use crate::sparsity::paths::{l1_coeff, PathScheduler};
use crate::sparsity::repack;
use anyhow::{bail, Context, Result};
use sparse_kernels::torch::profiler::range;
use sparse_kernels::FfnPath;
use sparse_launch::{stable_hash, World};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Reduction, Tensor};

mod micro_batches;

/// Command-line overrides of the config.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub max_steps: Option<usize>,
    /// `Some(None)`: resume from the run directory's latest checkpoint; `Some(Some(p))`:
    /// from `p` (a checkpoint or a run directory).
    pub resume: Option<Option<PathBuf>>,
    pub out_dir: Option<PathBuf>,
    pub quiet: bool,
    /// `--profile-steps`: a Chrome trace of these steps (see [`super::profile`]).
    pub profile_steps: Option<ProfileSteps>,
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

/// Trains on this process's share of `world` (see [`Trainer`]).
pub fn train(cfg: &Config, opts: &RunOptions, world: &World) -> Result<()> {
    Trainer::new(cfg, opts, world)?.run()
}

/// One rank's training run: data parallel over all ranks (gradients summed over ranks in
/// flat buckets, or reduce-scattered with ZeRO-1), every rank seeing its own disjoint
/// micro-batches of the same global batch, optionally tensor parallel within groups of
/// ranks; only rank 0 writes.
pub struct Trainer<'w> {
    cfg: Config,
    world: &'w World,
    groups: ParallelGroups<'w>,
    device: Device,
    /// Owns the parameters the model and the optimizer hold handles on.
    _vs: VarStore,
    model: Llama,
    opt: AdamW,
    zero1: Option<Zero1>,
    loader: DataLoader,
    val: Option<DataLoader>,
    sched: PathScheduler,
    activity: LayerActivity,
    /// Per layer, the original indices of the FFN units kept (see [`repack`]).
    layout: Vec<Tensor>,
    stop: StopSignal,
    /// The state a checkpoint saves, as of the last completed step.
    state: TrainerState,
    /// Sequences consumed, skipped steps included.
    cursor: u64,
    skipped_total: usize,
    skipped_in_a_row: usize,
    /// Steps run again because a hybrid FFN pool overflowed (see `micro_batches`).
    pool_reruns: usize,
    /// Runs each micro-batch, eagerly or as a replayed CUDA graph.
    runner: MicroBatchRunner,
    /// Micro-batches per rank and step.
    accum: usize,
    /// Tokens of one global batch.
    step_tokens: u64,
    window: Window,
    log: RunLog,
    saver: Saver,
    profiler: Option<StepProfiler>,
    /// `tokenizer.json` and `tokenizer_config.json` of the training shards' tokenizer, copied
    /// into every checkpoint (empty: synthetic data, or shards without a manifest).
    tokenizer_files: BTreeMap<String, Vec<u8>>,
    /// The step of the out-of-memory test hook ([`oom::TEST_OOM_AT_STEP`]), if set.
    oom_test_step: Option<usize>,
}

impl<'w> Trainer<'w> {
    /// Builds the run: groups, device, model, optimizer, data, scheduler, and the state of
    /// the checkpoint `--resume` names, if any.
    pub fn new(cfg: &Config, opts: &RunOptions, world: &'w World) -> Result<Trainer<'w>> {
        let mut cfg = cfg.clone();
        if let Some(n) = opts.max_steps {
            cfg.train.max_steps = n;
        }
        if let Some(d) = &opts.out_dir {
            cfg.train.out_dir = d.clone();
        }
        let everyone = world.collective();
        let groups = ParallelGroups::new(&cfg, world)?;
        cfg.parallel.data = groups.data().size();
        cfg.validate(Path::new("(after applying the world size)"))?;
        everyone.check_same_on_all_ranks(
            "config",
            stable_hash(serde_json::to_string(&cfg)?.as_bytes()),
        )?;
        let t = &cfg.train;
        let device = match t.device {
            DeviceChoice::Cpu => Device::Cpu,
            _ if world.size() > 1 => world.device(),
            choice => pick_device(choice)?,
        };
        if t.device == DeviceChoice::Cuda && !device.is_cuda() {
            bail!("config train.device is `cuda` but no CUDA device is available");
        }
        if t.cuda_graph && !device.is_cuda() {
            bail!("config train.cuda_graph is true but the run is on {device:?}: CUDA graphs need a GPU (set it false)");
        }
        // Mixed precision: bf16 matrix products over fp32 master weights (explicit casts in
        // the model rather than libtorch's autocast, whose weight-cast cache is not ours to
        // manage).
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
        model.recompute = t.recompute;
        model.l1_layer_weights = cfg.sparsity.l1_layer_weights.clone();
        let mut opt = AdamW::new(vs.variables().into_iter().collect(), t);
        let tp_size = groups.tensor.as_ref().map_or(1, |tp| tp.size);
        if tp_size > 1 {
            for p in &mut opt.params {
                if split_of(&p.name) == Split::Replicated {
                    p.norm_share = 1.0 / tp_size as f64;
                }
            }
        }
        // Identical initial weights on every rank (same seed; the broadcast makes it certain).
        for p in &mut opt.params {
            groups.data().broadcast(&mut p.param, 0)?;
        }
        let Data {
            loader,
            val,
            tokenizer_files,
        } = open_data(&cfg)?;
        let mut sched = PathScheduler::new(&cfg.sparsity, cfg.model.num_layers)?;
        let mut activity = LayerActivity::new(
            cfg.model.num_layers,
            cfg.model.intermediate_size / tp_size,
            device,
        );
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
            let path = checkpoint_state::resolve(resume.as_deref(), &t.out_dir)?;
            state = tp_checkpoint::restore(
                groups.tensor.as_deref(),
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
                activity.import_interval(&state.interval, groups.data());
            }
        }
        let zero1 = cfg.parallel.zero1.then(|| Zero1::new(&opt, groups.data()));
        let restart_at = opts.resume.is_some().then_some(state.step as i64 + 1);
        let log = RunLog::open(
            &t.out_dir,
            world.is_main(),
            restart_at,
            opts.quiet,
            t.max_steps,
        )?;
        let accum = t.batch_size / (t.micro_batch_size * groups.data().size());
        log.line(&format!(
            "model: {:.1}M parameters, {} layers; device {:?}; batch {} x {} tokens, {} micro-batches of {}",
            cfg.model.num_params() as f64 / 1e6,
            cfg.model.num_layers,
            device,
            t.batch_size,
            t.seq_len,
            accum,
            t.micro_batch_size
        ));
        if state.step > 0 {
            log.line(&format!(
                "resumed at step {} (cursor {} sequences)",
                state.step, state.cursor
            ));
            log.set_position(state.step);
        }
        let step_tokens = (t.batch_size * t.seq_len) as u64;
        let profiler = opts
            .profile_steps
            .map(|steps| {
                StepProfiler::new(
                    steps,
                    &t.out_dir,
                    world.rank(),
                    device,
                    state.step,
                    t.max_steps,
                )
            })
            .transpose()?;
        Ok(Trainer {
            world,
            groups,
            device,
            _vs: vs,
            model,
            opt,
            zero1,
            loader,
            val,
            sched,
            activity,
            layout,
            stop,
            cursor: state.cursor,
            skipped_total: state.skipped_total,
            state,
            skipped_in_a_row: 0,
            pool_reruns: 0,
            runner: MicroBatchRunner::new(cfg.train.cuda_graph),
            accum,
            step_tokens,
            window: Window::start(),
            log,
            saver: Saver::default(),
            profiler,
            tokenizer_files,
            oom_test_step: oom::test_hook_step()?,
            cfg,
        })
    }

    /// Runs the steps left until `train.max_steps`, or until a stop signal (then with a
    /// checkpoint at the step reached).
    pub fn run(mut self) -> Result<()> {
        for step in self.state.step..self.cfg.train.max_steps {
            if let Some(p) = self.profiler.as_mut() {
                p.before_step(step)?;
            }
            let values = match oom::catch(|| self.step(step)) {
                Ok(values) => values?,
                // The step may have stopped part-way through the update: nothing of its state
                // is saved; the write of the last complete checkpoint finishes.
                Err(detail) => {
                    self.saver.wait()?;
                    bail!(OutOfMemory::in_step(step, &self.cfg.train, detail));
                }
            };
            // A checkpoint write that failed (a full disk) stops the run now, not at the next
            // checkpoint.
            self.saver.check()?;
            self.write_due_trace(Some(step))?;
            let Some(values) = values else {
                self.log.advance();
                continue;
            };
            self.window.add(&values, self.step_tokens);
            self.log.step(step, &values)?;
            let last = step + 1 == self.cfg.train.max_steps;
            if (step + 1) % self.cfg.train.log_every == 0 || last {
                self.log_interval(step, &values, last)?;
                self.window = Window::start();
            }
            self.log.advance();
            self.record_state(step, values.lambda);
            // Every rank stops at the same step when any one of them got a signal.
            let stopping = self.world.collective().any_rank_flag(self.stop.requested());
            let every = self.cfg.checkpoint.every;
            let periodic = every > 0 && self.state.step.is_multiple_of(every);
            if stopping || periodic || self.state.step == self.cfg.train.max_steps {
                self.checkpoint()?;
            }
            if stopping {
                self.write_due_trace(None)?;
                self.saver.wait()?;
                self.log.flush()?;
                self.log.line(&format!(
                    "stop requested: checkpoint written at step {}",
                    self.state.step
                ));
                return Ok(());
            }
        }
        self.write_due_trace(None)?;
        self.log.finish();
        self.saver.wait()
    }

    /// After step `step`, or at the end of the run (`None`), writes the profiler's trace
    /// when due and says where.
    fn write_due_trace(&mut self, step: Option<usize>) -> Result<()> {
        let Some(p) = self.profiler.as_mut() else {
            return Ok(());
        };
        let written = match step {
            Some(s) => p.after_step(s)?,
            None => p.finish()?,
        };
        if let Some(path) = written {
            let msg = format!("profile trace written to {}", path.display());
            self.log.line(&msg);
        }
        Ok(())
    }

    /// Optimizer step `step` (0-based) over one global batch: forward and backward of this
    /// rank's micro-batches, the gradient reduction, the update, and a repack when due.
    /// `None` when the step was skipped for a non-finite loss or gradient norm.
    pub fn step(&mut self, step: usize) -> Result<Option<StepValues>> {
        let lambda = l1_coeff(&self.cfg.sparsity, step);
        let (ce_acc, mut l1_acc) = self.micro_batches(step, lambda)?;
        let t = &self.cfg.train;
        let dp = self.groups.data();
        let tp = self.groups.tensor.as_ref();
        let lr = learning_rate(t, step);
        let reduce = range(c"grad_reduce");
        let mut norm_sq = match self.zero1.as_mut() {
            Some(z) => z.reduce_scatter_grads(&self.opt, dp)?,
            None => {
                let mut grads: Vec<Tensor> =
                    self.opt.params.iter().map(|p| p.param.grad()).collect();
                dp.all_reduce_sum_many(&mut grads)?;
                self.opt.grad_sq()
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
        self.activity.reduce_step(dp)?;
        let host: Vec<f64> = Vec::try_from(
            Tensor::cat(&[&sums, &norm_t.view([1])], 0)
                .to_kind(Kind::Double)
                .to_device(Device::Cpu),
        )?;
        drop(reduce);
        let ce = host[0] / self.step_tokens as f64;
        let l1 = host[1] / self.step_tokens as f64;
        let grad_norm = host[2];
        let loss = ce + lambda * l1;
        if !loss.is_finite() || !grad_norm.is_finite() {
            self.opt.zero_grad();
            self.skipped_in_a_row += 1;
            self.skipped_total += 1;
            self.log.skipped(step, loss, grad_norm)?;
            if self.skipped_in_a_row >= t.max_skipped_steps {
                self.saver.wait()?;
                bail!(
                    "{} consecutive non-finite steps: stopping (last good checkpoint kept)",
                    self.skipped_in_a_row
                );
            }
            self.cursor += t.batch_size as u64;
            self.activity.end_step(self.step_tokens);
            self.log.skipped_total(step, self.skipped_total)?;
            return Ok(None);
        }
        self.skipped_in_a_row = 0;
        let update = range(c"optimizer");
        match self.zero1.as_mut() {
            Some(z) => z.step(&mut self.opt, dp, lr, grad_norm, t.grad_clip)?,
            None => self.opt.clip_and_step(lr, grad_norm, t.grad_clip)?,
        }
        oom::inject_if_due(self.oom_test_step, step);
        self.opt.zero_grad();
        drop(update);
        self.cursor += t.batch_size as u64;
        self.activity.end_step(self.step_tokens);
        let repack_every = self.cfg.sparsity.repack_every;
        if repack_every > 0 && (step + 1).is_multiple_of(repack_every) {
            self.repack(step)?;
        }
        Ok(Some(StepValues {
            loss,
            ce,
            l1,
            lambda,
            lr,
            grad_norm,
        }))
    }

    /// Removes the dead FFN units after step `step` (see [`repack`]).
    fn repack(&mut self, step: usize) -> Result<()> {
        let dp = self.groups.data();
        if let Some(z) = self.zero1.as_ref() {
            z.gather_moments(&mut self.opt, dp)?;
        }
        let removed = repack::prune_dead(
            &mut self.opt,
            &mut self.activity.tokens_since_fired,
            &mut self.layout,
            self.cfg.sparsity.tokens_until_dead,
        );
        if self.zero1.is_some() {
            self.zero1 = Some(Zero1::new(&self.opt, dp));
        }
        if removed.iter().any(|&n| n > 0) {
            let h: Vec<i64> = self.layout.iter().map(|k| k.size()[0]).collect();
            self.log.line(&format!(
                "step {}: repacked the FFN, units per layer now {h:?}",
                step + 1
            ));
        }
        Ok(())
    }

    /// Ends the log interval at step `step` (0-based; `last`: the run's final step):
    /// the activity summary feeds the path scheduler and the dead-unit re-initialisation,
    /// then the interval is logged with its throughput and, when due, the validation loss.
    fn log_interval(&mut self, step: usize, values: &StepValues, last: bool) -> Result<()> {
        let cfg = &self.cfg;
        let t = &cfg.train;
        let device = self.device;
        let paths = self.sched.paths().to_vec();
        let layers = self.activity.summarize(
            cfg.model.intermediate_size,
            cfg.sparsity.tokens_until_dead,
            self.groups.data(),
            self.groups.tensor.as_ref().map(|tp| tp.group()),
        )?;
        self.sched.observe(step, &layers);
        let reinitialized = if cfg.sparsity.reinit_dead {
            reinit_dead_gates(
                &self.model,
                &mut self.opt,
                &mut self.activity.tokens_since_fired,
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
        let tokens_per_s = self.window.tokens_per_s();
        let mfu = if device.is_cuda() {
            tokens_per_s * cfg.model.train_flops_per_token(t.seq_len) / peak_flops()
        } else {
            0.0
        };
        // Peak bytes held by tensors (caching allocator) on GPU, peak RSS on CPU.
        let memory_bytes = sparse_kernels::cuda_runtime::peak_allocated_bytes(device)
            .unwrap_or_else(peak_rss_bytes);
        let nnz: f64 = layers.iter().map(|l| l.nnz_mean).sum::<f64>() / layers.len() as f64;
        let mut val_ce = None;
        if let Some(v) = self.val.as_mut() {
            if (step + 1).is_multiple_of(t.eval_every) || last {
                val_ce = Some(evaluate(&self.model, v, cfg, &paths, device)?);
            }
        }
        let (loss, ce, l1, grad_norm) = self.window.means();
        self.log.interval(&IntervalReport {
            step: step + 1,
            loss,
            ce,
            l1,
            grad_norm,
            lambda: values.lambda,
            lr: values.lr,
            tokens_per_s,
            mfu,
            memory_gib: memory_bytes as f64 / (1u64 << 30) as f64,
            sparsity: 1.0 - nnz / cfg.model.intermediate_size as f64,
            nnz_per_token: nnz,
            skipped_total: self.skipped_total,
            val_ce,
            layers: &layers,
            reinitialized: &reinitialized,
            ffn_paths: self.sched.paths(),
        })
    }

    /// Brings the checkpointed state to the end of completed step `step` (0-based).
    fn record_state(&mut self, step: usize, lambda: f64) {
        let state = &mut self.state;
        state.step = step + 1;
        state.cursor = self.cursor;
        state.tokens_seen += self.step_tokens;
        state.skipped_total = self.skipped_total;
        state.l1_coeff = lambda;
        state.ffn_paths = self
            .sched
            .paths()
            .iter()
            .map(|p| p.name().to_string())
            .collect();
        state.next_path_decision = self.sched.next_decision();
    }

    /// Writes a checkpoint of the state at the last completed step (collective: every rank
    /// calls it; rank 0 writes, on a background thread).
    fn checkpoint(&mut self) -> Result<()> {
        let dp = self.groups.data();
        if let Some(z) = self.zero1.as_ref() {
            z.gather_moments(&mut self.opt, dp)?;
        }
        self.state.interval = self.activity.export_interval(dp)?;
        let hidden = self.cfg.model.intermediate_size as i64;
        self.state.ffn_layout = if self.layout.iter().all(|k| k.size()[0] == hidden) {
            Vec::new()
        } else {
            self.layout
                .iter()
                .map(|k| Vec::<i64>::try_from(k).expect("int64 layout"))
                .collect()
        };
        // With tensor parallelism, data-parallel group 0 gathers the full tensors for rank 0
        // (one checkpoint of the whole model, loadable at any layout).
        let full = match self.groups.tensor.as_ref() {
            Some(tp) if dp.rank() == 0 => Some(tp_checkpoint::gather_full(
                tp,
                &self.opt,
                &self.activity.tokens_since_fired,
                &self.cfg.train,
            )?),
            _ => None,
        };
        if self.world.is_main() {
            let (opt, clocks) = match &full {
                Some((o, c)) => (o, c.as_slice()),
                None => (&self.opt, self.activity.tokens_since_fired.as_slice()),
            };
            let mut snap = checkpoint_state::snapshot(&self.cfg, opt, &self.state, clocks)?;
            snap.files = self.tokenizer_files.clone();
            self.saver.save(
                self.cfg.train.out_dir.clone(),
                self.state.step as u64,
                snap,
                self.cfg.checkpoint.keep_last,
            )?;
        }
        Ok(())
    }
}

/// What a run reads: the training data, the validation data when evaluation is on, and the
/// files of the tokenizer that made the training shards (for checkpoints).
struct Data {
    loader: DataLoader,
    val: Option<DataLoader>,
    tokenizer_files: BTreeMap<String, Vec<u8>>,
}

fn open_data(cfg: &Config) -> Result<Data> {
    let t = &cfg.train;
    let mut tokenizer_files = BTreeMap::new();
    let loader = match &cfg.data.train {
        Some(p) => {
            let loader = DataLoader::from_shards(p, t.seq_len, t.seed)
                .with_context(|| format!("opening training data {}", p.display()))?;
            if let Some(tok) = manifest::tokenizer_of(p)? {
                tokenizer_files.extend(tok.checkpoint_files(cfg.model.max_seq_len)?);
                if let Some(v) = cfg.data.val.as_ref().filter(|_| t.eval_every > 0) {
                    if let Some(vm) = ShardManifest::read(v)? {
                        if vm.tokenizer.sha256 != tok.sha256() {
                            bail!(
                                "data.val {}: tokenized by {} (SHA-256 {}), but data.train {} by {} (SHA-256 {}): prepare both with the same --tokenizer",
                                v.display(),
                                vm.tokenizer.name,
                                vm.tokenizer.sha256,
                                p.display(),
                                tok.name,
                                tok.sha256()
                            );
                        }
                    }
                }
            }
            loader
        }
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
    let val = match &cfg.data.val {
        Some(p) if t.eval_every > 0 => Some(
            DataLoader::from_shards(p, t.seq_len, t.seed)
                .with_context(|| format!("opening validation data {}", p.display()))?,
        ),
        _ => None,
    };
    Ok(Data {
        loader,
        val,
        tokenizer_files,
    })
}

/// Mean validation cross-entropy per token over `train.eval_batches` micro-batches.
fn evaluate(
    model: &Llama,
    val: &mut DataLoader,
    cfg: &Config,
    paths: &[FfnPath],
    device: Device,
) -> Result<f64> {
    let t = &cfg.train;
    let n = t
        .eval_batches
        .min(val.windows_per_epoch() / t.micro_batch_size)
        .max(1);
    let mut total = 0.0;
    tch::no_grad(|| -> Result<()> {
        for i in 0..n {
            let batch = val
                .sequences((i * t.micro_batch_size) as u64, t.micro_batch_size)?
                .to_device(device);
            let inputs = batch.narrow(1, 0, t.seq_len as i64);
            let targets = batch.narrow(1, 1, t.seq_len as i64);
            let out = model.forward(&inputs, paths);
            total += cross_entropy(&out.logits, &targets, Reduction::Mean).double_value(&[]);
        }
        Ok(())
    })?;
    Ok(total / n as f64)
}
