//! `sparse-train bench train` / `bench infer`: whole-model throughput at a config's shape,
//! sparse FFN against dense, side by side in one process, on the same weights.
//!
//! **Imposed sparsity.** A freshly initialised model is ~50 % sparse; the paper's trained
//! models are ~99.5 % (1.5B: 29 of 5632 units per token). The bench builds the model with
//! the config's init and then gives every layer's gate a calibrated negative shift through
//! a constant input direction, as the generator of shared/design/anchors.md §3 does on one
//! layer:
//! - residual channel `c = D - 1` is made constant: `embed[:, c] = init_std * sqrt(D)` and
//!   nothing writes to it (`o_proj` row c and `down_proj^T` column c are zeroed), so the
//!   FFN input carries `x̂_c = C / rms(x)` (a per-token value, as the anchors' `t_i`);
//! - `Wg[j, c] = -beta_l * (1 + 0.2 b_j)`, `b_j ~ N(0, 1)`: a per-layer shift `beta_l` and
//!   unequal unit popularity (±0.5 sigma of the gate at 99.5 %, the anchors' `b_j`);
//! - `beta_l` is found by bisection (all layers at once, 24 forwards on random tokens, dense
//!   path, the benchmark's precision) so each layer's mean active units per token is
//!   `(1 - sparsity) * H`. The other gate columns keep their random init.
//!
//! The tied LM head sees channel c as a constant logit offset (softmax-invariant). Inputs
//! are uniform random token ids (seed 0). Dense and sparse then run on identical weights
//! (training restores them from a host copy and starts a fresh AdamW before each path).
//!
//! **infer**: decoder forward without the LM head (as the paper's benchmark), bf16 weights,
//! no grad; dense = the `Dense` FFN path (cuBLAS), sparse = `Twell` (CUDA kernels).
//! **generate**: `generate_tokens` (prefill of a random prompt, then greedy decoding of one
//! token per step against the KV cache, LM head included, no early stop) at each
//! `--gen-batch`, bf16 weights; dense = `Dense`, sparse = `Twell`. Reported per path and
//! batch: prefill ms, decode ms/step, decode tokens/s, energy per decoded token, and how
//! many greedy tokens agree with the dense path's (bf16 rounding can flip near-ties).
//! **train**: full steps (fwd + bwd + L1 term + clip + AdamW) with bf16 matrix products over f32
//! weights at the config's micro-batch, lr `--lr` (default 0, see its help); dense =
//! `Dense`, sparse = `Hybrid`.
//!
//! Reported per path: ms per iteration (mean of the timed loop between synchronisations),
//! tokens/s, ratio to dense, peak memory held by tensors (the caching allocator's peak since
//! the path started), and energy from NVML's total-energy counter (delta over the timed loop,
//! whole board) per iteration and per token.
use crate::config::Config;
use crate::model::{cross_entropy, CachedOutput, Llama};
use crate::optim::AdamW;
use anyhow::{bail, Result};
use sparse_kernels::cuda_runtime;
use sparse_kernels::FfnPath;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Reduction, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Infer,
    Generate,
}

/// Arguments of `sparse-train bench train|infer`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchE2eArgs {
    /// Run config (YAML): the model shape, micro-batch, seq_len, optimizer and lambda.
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value: `--set train.micro_batch_size=2` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Target fraction of inactive FFN units per token (mean), imposed on every layer.
    #[arg(long, default_value_t = 0.995)]
    pub sparsity: f64,
    /// Sequences per iteration (default: train.micro_batch_size for train, 64 for infer,
    /// the paper's 64 x 2048).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Timed iterations per path.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Untimed warm-up iterations per path.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Paths to run, comma separated (default: dense and the mode's sparse path).
    #[arg(long, value_delimiter = ',')]
    pub paths: Vec<FfnPath>,
    /// Learning rate of the timed AdamW steps (train). Default 0: the optimizer does all its
    /// work (moments, decay, update) but the weights, and so the imposed sparsity, stay put;
    /// with a real lr the L1 term and Adam's sign-like first steps drive the random-token
    /// model far sparser within a few steps (measured: 28 -> ~1.5 actives/token in 10 steps
    /// at the config's warm-up lr), so the two paths would see different sparsity.
    #[arg(long, default_value_t = 0.0)]
    pub lr: f64,
    /// CUDA device index.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// generate: batch sizes to run (sequences decoded together), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub gen_batch: Vec<usize>,
    /// generate: prompt length in tokens (random ids).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// generate: new tokens per sequence (greedy, no early stop).
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
}

struct Energy {
    nvml: Option<nvml_wrapper::Nvml>,
    index: u32,
}

impl Energy {
    fn new(index: u32) -> Energy {
        let nvml = match nvml_wrapper::Nvml::init() {
            Ok(n) => Some(n),
            Err(e) => {
                println!("NVML not available ({e}): no energy figures");
                None
            }
        };
        Energy { nvml, index }
    }

    /// Total energy since driver load, mJ.
    fn total_mj(&self) -> Option<u64> {
        let d = self.nvml.as_ref()?.device_by_index(self.index).ok()?;
        d.total_energy_consumption().ok()
    }

    fn used_bytes(&self) -> Option<u64> {
        let d = self.nvml.as_ref()?.device_by_index(self.index).ok()?;
        d.memory_info().ok().map(|m| m.used)
    }

    /// Current SM clock, MHz.
    fn sm_clock(&self) -> Option<u32> {
        let d = self.nvml.as_ref()?.device_by_index(self.index).ok()?;
        d.clock_info(nvml_wrapper::enum_wrappers::device::Clock::SM)
            .ok()
    }

    /// Runs `f` while a thread samples the SM clock every 10 ms; returns `f`'s value and the
    /// mean clock (MHz) over the samples. Latency-bound work (many small kernels) can leave
    /// the GPU at a low clock, which this makes visible.
    fn with_clock<T>(&self, f: impl FnOnce() -> T) -> (T, Option<f64>) {
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let mut v = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(c) = self.sm_clock() {
                        v.push(c as f64);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                v
            });
            let out = f();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let v = sampler.join().unwrap_or_default();
            (
                out,
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64),
            )
        })
    }

    fn name(&self) -> Option<String> {
        let d = self.nvml.as_ref()?.device_by_index(self.index).ok()?;
        d.name().ok()
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Imposes `target` mean active units per token on every layer (see the module docs);
/// returns each layer's measured mean after calibration. `forward_stats` runs one forward
/// of the calibration tokens and returns the per-layer means.
pub fn impose_sparsity(
    model: &Llama,
    target: f64,
    iters: usize,
    mut forward_stats: impl FnMut() -> Vec<f64>,
) -> Vec<f64> {
    let d = model.cfg.hidden_size as i64;
    let c = d - 1;
    let device = model.embed.device();
    let big = model.cfg.init_std * (d as f64).sqrt();
    let layers = model.blocks.len();
    let mut popularity = Vec::with_capacity(layers);
    tch::no_grad(|| {
        let _ = model.embed.narrow(1, c, 1).fill_(big);
        for blk in &model.blocks {
            let _ = blk.o.narrow(0, c, 1).zero_();
            let _ = blk.down_t.narrow(1, c, 1).zero_();
            let h = blk.gate.size()[0];
            popularity.push(Tensor::randn([h, 1], (Kind::Float, device)) * 0.2 + 1.0);
        }
    });
    let set = |betas: &[f64]| {
        tch::no_grad(|| {
            for ((blk, pop), &beta) in model.blocks.iter().zip(&popularity).zip(betas) {
                let col = (pop * -beta).to_kind(blk.gate.kind());
                blk.gate.narrow(1, c, 1).copy_(&col);
            }
        })
    };
    // Geometric bisection on beta in [1e-6, 100]; more actives than wanted -> larger shift.
    let mut lo = vec![(1e-6f64).ln(); layers];
    let mut hi = vec![(100f64).ln(); layers];
    for _ in 0..iters {
        let mid: Vec<f64> = lo.iter().zip(&hi).map(|(a, b)| (a + b) / 2.0).collect();
        set(&mid.iter().map(|m| m.exp()).collect::<Vec<_>>());
        let got = forward_stats();
        for l in 0..layers {
            if got[l] > target {
                lo[l] = mid[l];
            } else {
                hi[l] = mid[l];
            }
        }
    }
    let fin: Vec<f64> = lo
        .iter()
        .zip(&hi)
        .map(|(a, b)| ((a + b) / 2.0).exp())
        .collect();
    set(&fin);
    forward_stats()
}

fn layer_means(out: &crate::model::ForwardOutput) -> Vec<f64> {
    let means: Vec<Tensor> = out
        .layers
        .iter()
        .map(|l| l.active_per_token.to_kind(Kind::Float).mean(Kind::Float))
        .collect();
    Vec::<f64>::try_from(
        Tensor::stack(&means, 0)
            .to_kind(Kind::Double)
            .to_device(Device::Cpu),
    )
    .expect("f64 stats")
}

fn summary(v: &[f64]) -> String {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("mean {mean:.1} (layers {min:.1} .. {max:.1})")
}

struct Row {
    path: FfnPath,
    ms: f64,
    tokens_per_s: f64,
    peak: Option<u64>,
    used_end: Option<u64>,
    energy_j: Option<f64>,
    nnz: Option<Vec<f64>>,
}

const GIB: f64 = (1u64 << 30) as f64;

/// Runs `sparse-train bench train` or `bench infer`.
pub fn run(args: &BenchE2eArgs, mode: Mode) -> Result<()> {
    let cfg = Config::load_with_overrides(&args.config, &args.overrides)?;
    if !(0.0..1.0).contains(&args.sparsity) {
        bail!("--sparsity {} must be in [0, 1)", args.sparsity);
    }
    if args.steps == 0 {
        bail!("--steps must be >= 1");
    }
    if !tch::Cuda::is_available() {
        bail!("bench train/infer needs a CUDA device (tch sees none)");
    }
    let device = Device::Cuda(args.device);
    let m = &cfg.model;
    let seq = cfg.train.seq_len as i64;
    let batch = args.batch.unwrap_or(match mode {
        Mode::Train => cfg.train.micro_batch_size,
        Mode::Infer | Mode::Generate => 64,
    }) as i64;
    let tokens_per_iter = (batch * seq) as f64;
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
        "bench {}: GPU {gpu}, config {} (L {}, D {}, H {}, heads {}/{}, vocab {}, {:.2}B params), {} x {} = {} tokens/iter, {}",
        match mode { Mode::Train => "train", Mode::Infer => "infer", Mode::Generate => "generate" },
        args.config.display(),
        m.num_layers,
        m.hidden_size,
        m.intermediate_size,
        m.num_heads,
        m.kv_heads(),
        m.vocab_size,
        m.num_params() as f64 / 1e9,
        batch,
        seq,
        tokens_per_iter,
        match mode {
            Mode::Train => "bf16 matrix products over f32 weights, fwd+bwd+AdamW",
            Mode::Infer => "bf16 weights, no grad, decoder body (LM head excluded)",
            Mode::Generate => "bf16 weights, KV cache, greedy decoding (timed rows below; the tokens/iter figure is calibration only)",
        }
    );
    tch::manual_seed(cfg.train.seed as i64);
    tch::Cuda::manual_seed_all(cfg.train.seed);
    let mut vs = VarStore::new(device);
    let mut model = Llama::new(&vs, m);
    model.compute = Kind::BFloat16;
    if mode != Mode::Train {
        vs.bfloat16();
    }
    tch::manual_seed(0);
    let data = Tensor::randint(m.vocab_size as i64, [batch, seq + 1], (Kind::Int64, device));
    let inputs = data.narrow(1, 0, seq);
    let targets = data.narrow(1, 1, seq);
    let calib = inputs.narrow(0, 0, batch.min(2));
    let dense_paths = vec![FfnPath::Dense; m.num_layers];
    let t0 = Instant::now();
    let nnz = impose_sparsity(&model, target, 24, || {
        tch::no_grad(|| {
            let out = model.forward(&calib, &dense_paths);
            layer_means(&out)
        })
    });
    println!(
        "imposed sparsity: target {:.2} % = {target:.1} active units/token of {h}; measured (dense, {} calibration tokens) {}; calibration {:.1} s",
        args.sparsity * 100.0,
        calib.numel(),
        summary(&nnz),
        t0.elapsed().as_secs_f64()
    );
    if mode == Mode::Generate {
        return run_generate(args, &model, &paths, &energy);
    }
    // The calibrated weights, restored before each training path.
    let snapshot: Option<HashMap<String, Tensor>> = (mode == Mode::Train).then(|| {
        vs.variables()
            .into_iter()
            .map(|(k, v)| (k, v.to_device(Device::Cpu)))
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
        sync(device);
        cuda_runtime::reset_peak(device);
        let row = match mode {
            Mode::Infer => measure(path, device, &energy, args, tokens_per_iter, |_, _| {
                tch::no_grad(|| {
                    let _ = model.forward_cached(&inputs, None, &layer_paths, CachedOutput::Hidden);
                });
                Ok(())
            })?,
            Mode::Generate => unreachable!("handled above"),
            Mode::Train => {
                let mut opt = AdamW::new(vs.variables().into_iter().collect(), &cfg.train);
                let lambda = cfg.sparsity.l1_coeff;
                let mut last = None;
                let mut row = measure(path, device, &energy, args, tokens_per_iter, |i, keep| {
                    let out = model.forward(&inputs, &layer_paths);
                    let ce = cross_entropy(&out.logits, &targets, Reduction::Sum);
                    let loss = (&ce + &out.l1_sum * lambda) / tokens_per_iter;
                    loss.backward();
                    let gn = opt.grad_norm().double_value(&[]);
                    if !gn.is_finite() {
                        bail!("{}: non-finite gradient norm at step {i}", path.name());
                    }
                    opt.clip(gn, cfg.train.grad_clip);
                    opt.step(args.lr);
                    opt.zero_grad();
                    if keep {
                        last = Some(layer_means(&out));
                    }
                    Ok(())
                })?;
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

/// `bench generate`: each path at each batch size, on the calibrated model.
fn run_generate(
    args: &BenchE2eArgs,
    model: &Llama,
    paths: &[FfnPath],
    energy: &Energy,
) -> Result<()> {
    use crate::generate::{generate_tokens, Sampler};
    let m = &model.cfg;
    let device = model.embed.device();
    if args.prompt_len == 0 || args.new_tokens == 0 {
        bail!("--prompt-len and --new-tokens must be >= 1");
    }
    if args.prompt_len + args.new_tokens > m.max_seq_len {
        bail!(
            "--prompt-len {} + --new-tokens {} exceeds the model's max_seq_len {}",
            args.prompt_len,
            args.new_tokens,
            m.max_seq_len
        );
    }
    if args.gen_batch.contains(&0) {
        bail!("--gen-batch: batch sizes must be >= 1");
    }
    println!(
        "generate: prompt {} random tokens, {} new tokens per sequence (greedy, no early stop), warm-up {} untimed run(s) of the same length per path",
        args.prompt_len, args.new_tokens, args.warmup.max(1)
    );
    for &b in &args.gen_batch {
        let b = b as i64;
        tch::manual_seed(1);
        let prompt = Tensor::randint(
            m.vocab_size as i64,
            [b, args.prompt_len as i64],
            (Kind::Int64, device),
        );
        let mut dense_out: Option<(Tensor, f64)> = None;
        for &path in paths {
            let layer_paths = vec![path; m.num_layers];
            // Untimed full-length runs first: measured, the first path of a process decodes
            // ~6x slower for its first ~10 s (93 vs 16 ms per step at 1.5b, batch 1, the same
            // whichever path goes first), so a short warm-up is not enough.
            let generate = || {
                generate_tokens(
                    model,
                    &prompt,
                    args.new_tokens,
                    Sampler::GREEDY,
                    &layer_paths,
                    true,
                    None,
                )
            };
            for _ in 0..args.warmup.max(1) {
                let _ = generate();
            }
            sync(device);
            cuda_runtime::reset_peak(device);
            let e0 = energy.total_mj();
            let ((tokens, stats), clock) = energy.with_clock(generate);
            let e1 = energy.total_mj();
            let decoded = (b as usize * stats.decode_steps) as f64;
            let tps = decoded / stats.decode_s;
            let agree = match &dense_out {
                None => String::new(),
                Some((d, _)) => {
                    let same = tokens.eq_tensor(d).to_kind(Kind::Float).mean(Kind::Float);
                    format!(
                        " | tokens equal to dense {:.1} %",
                        same.double_value(&[]) * 100.0
                    )
                }
            };
            let ratio = dense_out
                .as_ref()
                .map_or(String::from("1.000x"), |(_, d)| format!("{:.3}x", tps / d));
            let energy_s = e0.zip(e1).map_or(String::from("energy n/a"), |(a, z)| {
                // Prefill and decode together, per generated token.
                let j = (z - a) as f64 / 1e3;
                format!(
                    "{:.2} mJ/generated token (prefill incl.)",
                    j * 1e3 / (b as f64 * args.new_tokens as f64)
                )
            });
            let peak = cuda_runtime::peak_allocated_bytes(device)
                .map_or(String::from("peak n/a"), |p| {
                    format!("peak alloc {:.2} GiB", p as f64 / GIB)
                });
            let clock = clock.map_or(String::new(), |c| format!(" | SM clock {c:.0} MHz"));
            println!(
                "batch {b:>3} {:>6}: prefill {:8.2} ms | decode {:7.3} ms/step = {:9.1} tokens/s | {ratio} vs dense | {peak} | {energy_s}{clock}{agree}",
                path.name(),
                stats.prefill_s * 1e3,
                stats.decode_s * 1e3 / stats.decode_steps.max(1) as f64,
                tps,
            );
            // Where a decode step goes: layer 0's FFN alone on b tokens (synchronised, median
            // of 50), times the layer count, against the whole step. Its input is the normed
            // embedding of the last prompt token (it carries the imposed-sparsity channel).
            let blk = &model.blocks[0];
            let x = tch::no_grad(|| {
                let e = Tensor::embedding(
                    &model.embed,
                    &prompt.narrow(1, args.prompt_len as i64 - 1, 1),
                    -1,
                    false,
                    false,
                );
                crate::model::rms_norm(&e, &blk.post_norm, m.rms_norm_eps)
            });
            let mut times = Vec::with_capacity(50);
            tch::no_grad(|| {
                for i in 0..60 {
                    sync(device);
                    let t0 = Instant::now();
                    let _ = model.ffn(blk, &x, path, false);
                    sync(device);
                    if i >= 10 {
                        times.push(t0.elapsed().as_secs_f64() * 1e3);
                    }
                }
            });
            times.sort_by(f64::total_cmp);
            let ffn_ms = times[times.len() / 2];
            // The same FFN once per layer (each layer's weights), back to back as in a step:
            // host time to issue them, then until the GPU is done.
            let (issue_ms, done_ms) = tch::no_grad(|| {
                let mut best = (f64::INFINITY, f64::INFINITY);
                for _ in 0..5 {
                    sync(device);
                    let t0 = Instant::now();
                    for blk in &model.blocks {
                        let _ = model.ffn(blk, &x, path, false);
                    }
                    let issued = t0.elapsed().as_secs_f64() * 1e3;
                    sync(device);
                    let done = t0.elapsed().as_secs_f64() * 1e3;
                    if done < best.1 {
                        best = (issued, done);
                    }
                }
                best
            });
            println!(
                "           {} FFN calls (every layer) back to back: issued in {issue_ms:.2} ms, done in {done_ms:.2} ms",
                m.num_layers
            );
            println!(
                "           one FFN call on {b} token(s): {ffn_ms:.3} ms (synchronised); x {} layers = {:.2} ms of the {:.2} ms step",
                m.num_layers,
                ffn_ms * m.num_layers as f64,
                stats.decode_s * 1e3 / stats.decode_steps.max(1) as f64
            );
            if dense_out.is_none() {
                dense_out = Some((tokens, tps));
            }
        }
    }
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
    sync(device);
    let e0 = energy.total_mj();
    let t0 = Instant::now();
    for i in 0..args.steps {
        iter(args.warmup + i, i + 1 == args.steps)?;
    }
    sync(device);
    let s = t0.elapsed().as_secs_f64();
    let e1 = energy.total_mj();
    Ok(Row {
        path,
        ms: s * 1e3 / args.steps as f64,
        tokens_per_s: tokens_per_iter * args.steps as f64 / s,
        peak: cuda_runtime::peak_allocated_bytes(device),
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
        (Some(p), _) if p > 0 => format!("peak alloc {:.2} GiB", p as f64 / GIB),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    /// The calibration reaches the target mean actives per token on every layer (CPU).
    #[test]
    fn imposed_sparsity_hits_the_target() {
        tch::manual_seed(0);
        let cfg = ModelConfig {
            vocab_size: 101,
            hidden_size: 64,
            intermediate_size: 2048,
            num_layers: 3,
            num_heads: 4,
            num_kv_heads: None,
            max_seq_len: 128,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_embeddings: true,
            init_std: 0.02,
        };
        let vs = VarStore::new(Device::Cpu);
        let model = Llama::new(&vs, &cfg);
        let tokens = Tensor::randint(101, [4, 128], (Kind::Int64, Device::Cpu));
        let paths = [FfnPath::Dense; 3];
        let target = 0.01 * 2048.0;
        let got = impose_sparsity(&model, target, 24, || {
            tch::no_grad(|| layer_means(&model.forward(&tokens, &paths)))
        });
        for (l, g) in got.iter().enumerate() {
            assert!(
                (g - target).abs() < 0.1 * target,
                "layer {l}: {g} vs {target}"
            );
        }
    }
}
