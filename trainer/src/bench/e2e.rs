//! `sparse-train bench train` / `bench infer` / `bench generate`: whole-model throughput at a
//! config's shape,
//! sparse FFN against dense, side by side in one process, on the same weights.
//!
//! The model's sparsity is imposed ([`super::common::impose_sparsity`]) on the config's init,
//! or is the one a checkpoint learned (`--checkpoint`, inputs from its validation shards).
//!
//! **infer**: decoder forward without the LM head (as the paper's benchmark), bf16 weights,
//! no grad, the fused inference forward (`model::inference`); dense = the `Dense` FFN path
//! (cuBLAS), sparse = `Twell` (CUDA kernels).
//! **train**: full steps (fwd + bwd + L1 term + clip + AdamW) with bf16 matrix products over f32
//! weights at the config's micro-batch and `train.recompute`, lr `--lr` (default 0, see its
//! help); dense = `Dense`, sparse = `Hybrid`.
//!
//! Reported per path: ms per iteration (mean of the timed loop between synchronisations),
//! tokens/s, ratio to dense, peak memory held by tensors (the caching allocator's peak since
//! the path started), and energy from NVML's total-energy counter (delta over the timed loop,
//! whole board) per iteration and per token.
use super::common::{impose_sparsity, layer_means, summary, Energy, GIB};
pub use super::common::{BenchE2eArgs, Mode};
use super::generate::run_generate;
use crate::checkpoint::load;
use crate::config::Config;
use crate::data::DataLoader;
use crate::model::{synchronize, InferenceWeights, Llama};
use crate::optim::AdamW;
use crate::train::micro_batch::MicroBatchRunner;
use anyhow::{bail, Context, Result};
use sparse_kernels::cuda::DeferredChecks;
use sparse_kernels::cuda_runtime;
use sparse_kernels::torch::profiler;
use sparse_kernels::FfnPath;
use std::collections::HashMap;
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// One path's measured figures.
struct Row {
    path: FfnPath,
    ms: f64,
    tokens_per_s: f64,
    peak: Option<u64>,
    /// The caching allocator's peak reserved bytes (what a captured graph's private pool
    /// holds shows here, not in `peak`).
    reserved: Option<u64>,
    used_end: Option<u64>,
    energy_j: Option<f64>,
    nnz: Option<Vec<f64>>,
}

/// Runs `sparse-train bench train` or `bench infer`.
pub fn run(args: &BenchE2eArgs, mode: Mode) -> Result<()> {
    let device = Device::Cuda(args.device);
    if !tch::Cuda::is_available() {
        bail!("bench train/infer/generate needs a CUDA device (tch sees none)");
    }
    // The model: the checkpoint's trained weights, or the config's init (sparsity imposed below).
    let (cfg, origin, loaded) = match (&args.checkpoint, &args.config) {
        (Some(dir), _) => {
            let loaded = load::load(dir, device)?;
            let cfg = loaded.config.with_overrides(&args.overrides, dir)?;
            (cfg, format!("checkpoint {}", dir.display()), Some(loaded))
        }
        (None, Some(file)) => (
            Config::load_with_overrides(file, &args.overrides)?,
            format!("config {}", file.display()),
            None,
        ),
        (None, None) => bail!("give --config FILE or --checkpoint DIR"),
    };
    if !(0.0..1.0).contains(&args.sparsity) {
        bail!("--sparsity {} must be in [0, 1)", args.sparsity);
    }
    if args.steps == 0 {
        bail!("--steps must be >= 1");
    }
    if args.accum == 0 {
        bail!("--accum must be >= 1 (micro-batches per training step)");
    }
    let m = &cfg.model;
    let seq = cfg.train.seq_len as i64;
    let batch = args.batch.unwrap_or(match mode {
        Mode::Train => cfg.train.micro_batch_size,
        Mode::Infer | Mode::Generate => 64,
    }) as i64;
    let accum = match mode {
        Mode::Train => args.accum as i64,
        Mode::Infer | Mode::Generate => 1,
    };
    let tokens_per_iter = (accum * batch * seq) as f64;
    let paths: Vec<FfnPath> = if args.paths.is_empty() {
        vec![
            FfnPath::Dense,
            match mode {
                Mode::Train => FfnPath::Hybrid,
                Mode::Infer | Mode::Generate => FfnPath::Twell,
            },
        ]
    } else {
        args.paths.clone()
    };
    let energy = Energy::new(args.device as u32);
    let gpu = energy.name().unwrap_or_else(|| "unknown GPU".into());
    let h = m.intermediate_size as f64;
    let target = (1.0 - args.sparsity) * h;
    println!(
        "bench {}: GPU {gpu}, {origin} (L {}, D {}, H {}, heads {}/{}, vocab {}, {:.2}B params), {} x {} x {} = {} tokens/iter, {}",
        match mode { Mode::Train => "train", Mode::Infer => "infer", Mode::Generate => "generate" },
        m.num_layers,
        m.hidden_size,
        m.intermediate_size,
        m.num_heads,
        m.kv_heads(),
        m.vocab_size,
        m.num_params() as f64 / 1e9,
        accum,
        batch,
        seq,
        tokens_per_iter,
        match mode {
            Mode::Train => format!("micro-batches x sequences x tokens, bf16 matrix products over f32 weights, the trainer's fwd+bwd (recompute {}), clip, AdamW", cfg.train.recompute.name()),
            Mode::Infer => "bf16 weights, no grad, fused decoder body (LM head excluded)".into(),
            Mode::Generate => "bf16 weights, KV cache, greedy decoding (timed rows below; the tokens/iter figure is calibration only)".into(),
        }
    );
    let (mut vs, mut model) = match loaded {
        Some(l) => (l.vs, l.model),
        None => {
            tch::manual_seed(cfg.train.seed as i64);
            tch::Cuda::manual_seed_all(cfg.train.seed);
            let vs = VarStore::new(device);
            let model = Llama::new(&vs, m);
            (vs, model)
        }
    };
    if mode == Mode::Train {
        vs.unfreeze();
    } else {
        vs.bfloat16();
    }
    model.compute = Kind::BFloat16;
    // The trainer's activation recompute (`--set train.recompute=ffn|full`), for its memory.
    model.recompute = cfg.train.recompute;
    let data = bench_tokens(
        args,
        &cfg,
        batch.max(max_gen_batch(args, mode)),
        seq + 1,
        device,
    )?;
    let inputs = data.narrow(0, 0, batch).narrow(1, 0, seq);
    let calib = inputs.narrow(0, 0, batch.min(2));
    let dense_paths = vec![FfnPath::Dense; m.num_layers];
    let measure_nnz = || {
        tch::no_grad(|| {
            let out = model.forward(&calib, &dense_paths);
            layer_means(&out.layers)
        })
    };
    let nnz = if args.checkpoint.is_some() {
        let nnz = measure_nnz();
        println!(
            "trained sparsity (nothing imposed): active units/token of {h} per layer, dense path, {} tokens: {}",
            calib.numel(),
            summary(&nnz)
        );
        nnz
    } else {
        let t0 = Instant::now();
        let nnz = impose_sparsity(&model, target, 24, measure_nnz);
        println!(
            "imposed sparsity: target {:.2} % = {target:.1} active units/token of {h}; measured (dense, {} calibration tokens) {}; calibration {:.1} s",
            args.sparsity * 100.0,
            calib.numel(),
            summary(&nnz),
            t0.elapsed().as_secs_f64()
        );
        nnz
    };
    if mode == Mode::Generate {
        let live = nnz.iter().sum::<f64>() / nnz.len().max(1) as f64;
        return run_generate(args, &model, &paths, &energy, &data, live);
    }
    // The calibrated weights, restored before each training path (detached: a copy with a
    // grad_fn would keep the parameters' gradient accumulators alive on this stream, which
    // a captured micro-batch's backward cannot wait on).
    let snapshot: Option<HashMap<String, Tensor>> = (mode == Mode::Train).then(|| {
        vs.variables()
            .into_iter()
            .map(|(k, v)| (k, v.detach().to_device(Device::Cpu)))
            .collect()
    });
    let mut rows = Vec::new();
    for &path in &paths {
        let layer_paths = vec![path; m.num_layers];
        if let Some(snap) = &snapshot {
            tch::no_grad(|| {
                for (name, mut v) in vs.variables() {
                    v.copy_(&snap[&name]);
                }
            });
        }
        synchronize(device);
        cuda_runtime::empty_cache();
        cuda_runtime::reset_peak(device);
        let row = match mode {
            Mode::Infer => {
                // The fused inference forward over weights made once (as a server would).
                let weights = InferenceWeights::new(&model);
                let mut iter = |_, _| -> Result<()> {
                    weights.hidden(&model, &inputs, &layer_paths).map(drop)
                };
                let row = measure(path, device, &energy, args, tokens_per_iter, &mut iter)?;
                profile_one(args, mode, path, device, || iter(0, false))?;
                row
            }
            Mode::Generate => unreachable!("handled above"),
            Mode::Train => {
                let mut opt = AdamW::new(vs.variables().into_iter().collect(), &cfg.train);
                let lambda = cfg.sparsity.l1_coeff;
                let mut last = None;
                let mut reruns = 0;
                // The trainer's runner: eager, or captured with `--set train.cuda_graph=true`.
                let mut runner = MicroBatchRunner::new(cfg.train.cuda_graph);
                let micro_batch = data.narrow(0, 0, batch);
                let mut iter = |i, keep| -> Result<()> {
                    // The trainer's step: one set of compute weights, `accum` micro-batches
                    // (the same tokens each time), the global-mean loss, clip, fused AdamW;
                    // the hybrid pools checked once after the micro-batches, as the trainer
                    // does (the micro-batches run again on an overflow).
                    loop {
                        let checks = device.is_cuda().then(|| DeferredChecks::begin(device));
                        let checks = checks.transpose()?;
                        runner.begin_step(&model, lambda);
                        for micro in 0..accum {
                            let out = runner.run(
                                &model,
                                &micro_batch,
                                &layer_paths,
                                tokens_per_iter as u64,
                            )?;
                            if keep && micro + 1 == accum {
                                last = Some(layer_means(&out.layers));
                            }
                        }
                        let Some(c) = checks else { break };
                        if !c.finish()?.overflowed {
                            break;
                        }
                        opt.zero_grad();
                        reruns += 1;
                    }
                    let gn = opt.grad_norm().double_value(&[]);
                    if !gn.is_finite() {
                        bail!("{}: non-finite gradient norm at step {i}", path.name());
                    }
                    opt.clip_and_step(args.lr, gn, cfg.train.grad_clip)?;
                    opt.zero_grad();
                    Ok(())
                };
                let mut row = measure(path, device, &energy, args, tokens_per_iter, &mut iter)?;
                profile_one(args, mode, path, device, || {
                    iter(args.warmup + args.steps, false)
                })?;
                let name = path.name();
                if reruns > 0 {
                    println!("{name}: {reruns} step(s) re-run after a hybrid pool overflow");
                }
                if cfg.train.cuda_graph {
                    let n = runner.captures();
                    println!("{name}: the micro-batch was captured {n} time(s) as a CUDA graph");
                }
                row.nnz = last;
                row
            }
        };
        print_row(&row, rows.first(), args.steps, tokens_per_iter);
        rows.push(row);
    }
    if rows.iter().any(|r| r.peak == Some(0) || r.peak.is_none()) {
        println!("note: the caching allocator reported no peak; 'used' is NVML's device memory in use at the end of the loop (includes the allocator's cache)");
    }
    Ok(())
}

/// With `--profile-dir`: one more iteration under libtorch's profiler, its Chrome trace in
/// `DIR/<mode>-<path>.json`.
fn profile_one(
    args: &BenchE2eArgs,
    mode: Mode,
    path: FfnPath,
    device: Device,
    iter: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let Some(dir) = &args.profile_dir else {
        return Ok(());
    };
    std::fs::create_dir_all(dir)?;
    let name = if mode == Mode::Train {
        "train"
    } else {
        "infer"
    };
    let trace = dir.join(format!("{name}-{}.json", path.name()));
    synchronize(device);
    profiler::start(device.is_cuda())?;
    let profiled = iter();
    synchronize(device);
    profiler::stop(&trace)?;
    profiled?;
    println!(
        "           trace of one more iteration: {}",
        trace.display()
    );
    Ok(())
}

/// Runs `iter(i, last)` `args.warmup` times untimed, then `args.steps` times between two
/// synchronisations (`last` true on the final one), and measures the timed part: time,
/// tokens/s, the allocator's peak since the caller's reset, NVML memory and energy.
fn measure(
    path: FfnPath,
    device: Device,
    energy: &Energy,
    args: &BenchE2eArgs,
    tokens_per_iter: f64,
    mut iter: impl FnMut(usize, bool) -> Result<()>,
) -> Result<Row> {
    for i in 0..args.warmup {
        iter(i, false)?;
    }
    synchronize(device);
    let e0 = energy.total_mj();
    let t0 = Instant::now();
    for i in 0..args.steps {
        iter(args.warmup + i, i + 1 == args.steps)?;
    }
    synchronize(device);
    let s = t0.elapsed().as_secs_f64();
    let e1 = energy.total_mj();
    Ok(Row {
        path,
        ms: s * 1e3 / args.steps as f64,
        tokens_per_s: tokens_per_iter * args.steps as f64 / s,
        peak: cuda_runtime::peak_allocated_bytes(device),
        reserved: cuda_runtime::peak_reserved_bytes(device),
        used_end: energy.used_bytes(),
        energy_j: e0.zip(e1).map(|(a, b)| (b - a) as f64 / 1e3),
        nnz: None,
    })
}

fn print_row(r: &Row, dense: Option<&Row>, steps: usize, tokens_per_iter: f64) {
    let ratio = dense.map_or(String::from("1.000x"), |d| {
        format!("{:.3}x", r.tokens_per_s / d.tokens_per_s)
    });
    let energy = r.energy_j.map_or(String::from("energy n/a"), |j| {
        let per_iter = j / steps as f64;
        format!(
            "{per_iter:.2} J/iter, {:.3} mJ/token",
            per_iter * 1e3 / tokens_per_iter
        )
    });
    let mem = match (r.peak, r.used_end) {
        (Some(p), _) if p > 0 => format!(
            "peak alloc {:.2} GiB (reserved {:.2})",
            p as f64 / GIB,
            r.reserved.unwrap_or(0) as f64 / GIB
        ),
        (_, Some(u)) => format!("peak n/a, NVML used {:.2} GiB", u as f64 / GIB),
        _ => String::from("memory n/a"),
    };
    let nnz = r.nnz.as_ref().map_or(String::new(), |v| {
        format!(" | actives/token after last step {}", summary(v))
    });
    println!(
        "{:>6}: {:9.2} ms/iter | {:10.0} tokens/s | {ratio} vs dense | {mem} | {energy}{nnz}",
        r.path.name(),
        r.ms,
        r.tokens_per_s
    );
}

/// The largest batch `bench generate` decodes (its prompts are rows of the bench's tokens).
fn max_gen_batch(args: &BenchE2eArgs, mode: Mode) -> i64 {
    match mode {
        Mode::Generate => args.gen_batch.iter().copied().max().unwrap_or(1) as i64,
        Mode::Train | Mode::Infer => 1,
    }
}

/// `rows` token windows of `len` tokens: from `--data` (or, for a checkpoint, its validation
/// then training shards), the first windows in the loader's seeded order; else uniform
/// random ids (seed 0).
fn bench_tokens(
    args: &BenchE2eArgs,
    cfg: &Config,
    rows: i64,
    len: i64,
    device: Device,
) -> Result<Tensor> {
    let shards = args.data.clone().or_else(|| {
        args.checkpoint
            .as_ref()
            .and(cfg.data.val.clone().or_else(|| cfg.data.train.clone()))
    });
    let Some(path) = shards else {
        tch::manual_seed(0);
        let v = cfg.model.vocab_size as i64;
        return Ok(Tensor::randint(v, [rows, len], (Kind::Int64, device)));
    };
    let mut loader = DataLoader::from_shards(&path, len as usize - 1, cfg.train.seed)
        .with_context(|| format!("--data {}: opening the token shards", path.display()))?;
    if loader.vocab_size() > cfg.model.vocab_size {
        bail!(
            "--data {}: tokenizer vocabulary {} exceeds the model's vocab_size {}",
            path.display(),
            loader.vocab_size(),
            cfg.model.vocab_size
        );
    }
    let tokens = loader
        .sequences(0, rows as usize)
        .with_context(|| format!("--data {}: reading {rows} windows", path.display()))?;
    println!(
        "inputs: {rows} windows of {} tokens from {}",
        len - 1,
        path.display()
    );
    Ok(tokens.to_device(device))
}
