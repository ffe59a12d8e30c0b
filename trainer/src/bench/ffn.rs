//! `sparse-train bench ffn`: the TwELL inference FFN against dense cuBLAS (through tch) on
//! one GPU, side by side in one process, on the sparse inputs of
//! shared/design/anchors.md §3 (per-neuron bias, per-token shift solved so that
//! `sum_j Phi(t_i + b_j) = k_i`, heavy-tailed `k_i`, 4 layers of weights used in rotation).
//!
//! Timing: per repeat, `synchronize; t0; 4 calls (one per layer); synchronize; t1`, the
//! repeat's time divided by 4; the median over repeats is printed. Dense =
//! `(relu(x Wg^T) * (x Wu^T)) Wd^T` in bf16 through tch (cuBLAS). TwELL = the kernels of
//! kernels/cuda/twell.cu called directly (`sparse_kernels::cuda::twell_ffn`, no statistics);
//! the column "op" is the same forward through `sparse_ffn(.., FfnPath::Twell)` under
//! no_grad, which also computes the active-unit statistics (one synchronising
//! `masked_select`); "op nostat" the op with `statistics: false`, as inference runs it;
//! "decode ms" (N <= 8) the decode kernels a captured decode step runs at N <= 2
//! (`sparse_kernels::cuda::decode::decode_ffn`: no packed format, two launches).
//! Before timing, each layer's TwELL (and decode) output is checked against an fp32 dense
//! reference on the same bf16 inputs: max|err| / max|ref| above 2e-2 is an error.
//!
//! `--mode train`: per layer `loss = sum(y * dy) + 1e-4 * l1_sum` and the gradients of x, Wg,
//! Wu, Wd^T (bf16 leaves). Dense = tch bf16 autograd (cuBLAS); hybrid = `sparse_ffn(..,
//! FfnPath::Hybrid)` (the SparseFfn autograd function running kernels/cuda/hybrid.cu);
//! "kernels" = `hybrid_forward` + `hybrid_backward` called directly (no loss ops, no
//! autograd), the weight gradients added into fp32 `[H, D]` buffers as the trainer adds them
//! into its masters' `.grad` (`WeightGrads::AddInto`). Checked first against fp32 autograd (y and grads <= 2e-2 of max|ref|, l1 <=
//! 2e-3). Memory: the caching allocator's peak above the live inputs during one layer's
//! fwd+bwd (y, the saved activations, dx and the weight gradients included), and the bytes the
//! hybrid forward keeps for its backward.
use anyhow::{bail, Context, Result};
use sparse_kernels::cuda::decode::{decode_ffn, decode_supports};
use sparse_kernels::cuda::{twell_ffn, TwellKernels, TwellLaunch};
use sparse_kernels::testing::{imposed_sparsity_layer, Layer};
use sparse_kernels::{FfnPath, FfnWeights};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Arguments of `sparse-train bench ffn`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchFfnArgs {
    /// Model shape: `125m`, `0.5b`, `1b`, `1.5b`, `2b`, `tiny`, or `D,H`.
    #[arg(long, default_value = "1.5b")]
    pub shape: String,
    /// Token counts N to run (comma separated), e.g. `16384,4096` or `1,8,64` (decode).
    #[arg(long, value_delimiter = ',', default_value = "16384")]
    pub tokens: Vec<usize>,
    /// Target fraction of inactive FFN units (mean over tokens).
    #[arg(long, default_value_t = 0.995)]
    pub sparsity: f64,
    /// `infer` (TwELL forward) or `train` (hybrid forward + backward).
    #[arg(long, default_value = "infer")]
    pub mode: String,
    /// Timed repeats (each runs the 4 layers once).
    #[arg(long, default_value_t = 50)]
    pub repeats: usize,
    /// Untimed warm-up repeats.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Only the correctness checks, no timing.
    #[arg(long)]
    pub check_only: bool,
    /// Seed of the input generator.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// CUDA device index.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

/// `(D, H)` of a shape name or `D,H`.
pub fn parse_shape(s: &str) -> Result<(i64, i64)> {
    Ok(match s {
        "tiny" => (128, 512),
        "125m" => (768, 2048),
        "0.5b" | "1b" | "1.5b" | "2b" => (2048, 5632),
        other => {
            let v: Vec<&str> = other.split(',').collect();
            if v.len() != 2 {
                bail!("--shape `{other}`: expected a model name (125m, 0.5b, 1b, 1.5b, 2b, tiny) or D,H");
            }
            (v[0].trim().parse()?, v[1].trim().parse()?)
        }
    })
}

fn dense_bf16(l: &Layer) -> Tensor {
    let h = l.x.matmul(&l.wg.tr()).relu() * l.x.matmul(&l.wu.tr());
    h.matmul(&l.wd)
}

fn reference_f32(l: &Layer) -> (Tensor, Tensor) {
    let f = |t: &Tensor| t.to_kind(Kind::Float);
    let x = f(&l.x);
    let g = x.matmul(&f(&l.wg).tr());
    let y = (g.relu() * x.matmul(&f(&l.wu).tr())).matmul(&f(&l.wd));
    (y, g.gt(0.0).sum_dim_intlist(-1, false, Kind::Int64))
}

/// Checks the TwELL kernels (direct and through `sparse_ffn`) on one layer; returns
/// (max|err|/max|ref|, worst row's max|err|/max|ref row|, mean and max actives per token).
fn check(l: &Layer, launch: TwellLaunch) -> Result<(f64, f64, f64, i64)> {
    let (want, apt) = reference_f32(l);
    let (y, _) = twell_ffn(&l.x, &l.wg, &l.wu, &l.wd, launch, false)?;
    let err = (y.to_kind(Kind::Float) - &want).abs();
    let scale = want.abs().max().double_value(&[]).max(1e-30);
    let rel = err.max().double_value(&[]) / scale;
    let row_ref = want.abs().amax([1], false).clamp_min(1e-30);
    let row_rel = (err.amax([1], false) / row_ref).max().double_value(&[]);
    let w = FfnWeights::new(&l.wg, &l.wu, &l.wd);
    let out = tch::no_grad(|| {
        sparse_kernels::try_sparse_ffn(&l.x, &w, FfnPath::Twell, &Default::default())
    })?;
    // Bitwise equal unless the up+down kernel ran out of partial-sum slots (then which
    // tokens are split depends on arrival order): compare to the reference's tolerance.
    let op_rel = (out.y.to_kind(Kind::Float) - &want)
        .abs()
        .max()
        .double_value(&[])
        / scale;
    if op_rel > 2e-2 {
        bail!("sparse_ffn(.., Twell): max|err|/max|ref| = {op_rel:.3e} > 2e-2");
    }
    // The kernel's fp32 accumulation order differs from cuBLAS's: gate values within
    // rounding of 0 may flip sign, nothing more.
    let diff = (&out.active_per_token - &apt).abs();
    let (flips, total) = (
        diff.sum(Kind::Int64).int64_value(&[]),
        apt.sum(Kind::Int64).int64_value(&[]),
    );
    if diff.max().int64_value(&[]) > 2 || flips > total / 1000 + 2 {
        bail!("sparse_ffn(.., Twell): active_per_token off the fp32 reference's relu(g) > 0 by {flips} of {total}");
    }
    let mean = apt.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    Ok((rel, row_rel, mean, apt.max().int64_value(&[])))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median ms per layer call of `f` over the 4 rotated layers.
fn time_ms<L>(
    device: Device,
    warmup: usize,
    repeats: usize,
    layers: &[L],
    mut f: impl FnMut(&L) -> Result<Tensor>,
) -> Result<f64> {
    let mut times = Vec::with_capacity(repeats);
    for r in 0..warmup + repeats {
        tch::Cuda::synchronize(device_index(device));
        let t0 = Instant::now();
        for l in layers {
            let _ = f(l)?;
        }
        tch::Cuda::synchronize(device_index(device));
        if r >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3 / layers.len() as f64);
        }
    }
    Ok(median(times))
}

fn device_index(d: Device) -> i64 {
    match d {
        Device::Cuda(i) => i as i64,
        _ => 0,
    }
}

fn gpu_name(kernels: &TwellKernels, device: Device) -> String {
    std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version",
            "--format=csv,noheader",
            "-i",
        ])
        .arg(device_index(device).to_string())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .replace(", ", ", driver ")
        })
        .unwrap_or_else(|| kernels.device_name().to_string())
}

/// What both modes of `bench ffn` start from: the checked arguments, the shape, the device
/// and its TwELL kernels.
struct FfnBenchSetup {
    d: i64,
    h: i64,
    device: Device,
    tw: std::sync::Arc<TwellKernels>,
}

/// Layers of weights each token count is timed on, used in rotation.
const LAYERS: usize = 4;

impl FfnBenchSetup {
    fn new(args: &BenchFfnArgs) -> Result<FfnBenchSetup> {
        if !(0.0..1.0).contains(&args.sparsity) {
            bail!("--sparsity {} must be in [0, 1)", args.sparsity);
        }
        if args.repeats == 0 || args.tokens.is_empty() {
            bail!("need --repeats >= 1 and at least one --tokens value");
        }
        if !tch::Cuda::is_available() {
            bail!("bench ffn needs a CUDA device (tch sees none)");
        }
        if args.tokens.iter().any(|&n| (n as i64) < 1) {
            bail!("--tokens: N must be >= 1");
        }
        let (d, h) = parse_shape(&args.shape)?;
        let device = Device::Cuda(args.device);
        let tw = TwellKernels::for_device(device).context("loading the TwELL kernels")?;
        Ok(FfnBenchSetup { d, h, device, tw })
    }

    /// The token counts of `--tokens`, each with its [`LAYERS`] layers made by `make(n)`
    /// after seeding with `--seed + n` (the same inputs whatever else is timed).
    fn layers_per_count<'a, L: 'a>(
        args: &'a BenchFfnArgs,
        mut make: impl FnMut(i64) -> Result<L> + 'a,
    ) -> impl Iterator<Item = Result<(i64, Vec<L>)>> + 'a {
        args.tokens.iter().map(move |&n| {
            let n = n as i64;
            tch::manual_seed(args.seed + n);
            let layers = (0..LAYERS).map(|_| make(n)).collect::<Result<Vec<_>>>()?;
            Ok((n, layers))
        })
    }

    /// `GPU ... (driver), shape ..., sparsity ...` for the header line.
    fn describe(&self, args: &BenchFfnArgs) -> String {
        format!(
            "GPU {} ({}), shape {} (D = {}, H = {}), sparsity {:.2} %",
            gpu_name(&self.tw, self.device),
            self.tw.device_name(),
            args.shape,
            self.d,
            self.h,
            args.sparsity * 100.0
        )
    }

    /// The gate kernel in use and the image it came from.
    fn gate_kernel(&self) -> String {
        format!(
            "{} (image {})",
            if self.tw.uses_wgmma() {
                "wgmma (sm_90a)"
            } else {
                "mma.sync"
            },
            self.tw.image()
        )
    }
}

/// Runs `sparse-train bench ffn`.
pub fn run_ffn(args: &BenchFfnArgs) -> Result<()> {
    if args.mode == "train" {
        return run_ffn_train(args);
    }
    if args.mode != "infer" {
        bail!("--mode `{}`: expected infer or train", args.mode);
    }
    let setup = FfnBenchSetup::new(args)?;
    let FfnBenchSetup { d, h, device, .. } = setup;
    println!(
        "bench ffn: {}, bf16, gate kernel {}",
        setup.describe(args),
        setup.gate_kernel()
    );
    println!(
        "{:>6} | {:>13} | {:>9} {:>9} | {:>9} | {:>9} | {:>8} | {:>9} | {:>9} | {:>9} {:>9}",
        "N",
        "actives/tok",
        "err/max",
        "worst row",
        "dense ms",
        "TwELL ms",
        "dense/TW",
        "op ms",
        "op nostat",
        "decode ms",
        "dense/dec"
    );
    let counts = FfnBenchSetup::layers_per_count(args, |n| {
        Ok(imposed_sparsity_layer(n, d, h, args.sparsity, device)?)
    });
    for counted in counts {
        let (n, layers) = counted?;
        let launch = TwellLaunch::for_tokens(n);
        let mut worst = (0.0f64, 0.0f64, 0.0f64, 0i64);
        for l in &layers {
            let c = check(l, launch)?;
            worst = (
                worst.0.max(c.0),
                worst.1.max(c.1),
                worst.2 + c.2 / 4.0,
                worst.3.max(c.3),
            );
        }
        let acts = format!("{:.1} ({})", worst.2, worst.3);
        let decode_sized = decode_supports(n, d);
        if decode_sized {
            for l in &layers {
                let (want, _) = reference_f32(l);
                let y = decode_ffn(&l.x, &l.wg, &l.wu, &l.wd)?;
                let e = sparse_kernels::testing::relative_error(&y, &want);
                if e > 2e-2 {
                    bail!("N = {n}: decode FFN off the fp32 reference: max|err|/max|ref| = {e:.3e} > 2e-2");
                }
            }
        }
        if worst.0 > 2e-2 {
            bail!(
                "N = {n}: TwELL output off the fp32 reference: max|err|/max|ref| = {:.3e} > 2e-2",
                worst.0
            );
        }
        if args.check_only {
            println!(
                "{n:>6} | {acts:>13} | {:>9.2e} {:>9.2e} | check only: OK",
                worst.0, worst.1
            );
            continue;
        }
        let (w, r) = (args.warmup, args.repeats);
        let dense = time_ms(device, w, r, &layers, |l| Ok(dense_bf16(l)))?;
        let twell = time_ms(device, w, r, &layers, |l| {
            Ok(twell_ffn(&l.x, &l.wg, &l.wu, &l.wd, launch, false)?.0)
        })?;
        let op_with = |statistics: bool| {
            let config = sparse_kernels::SparseFfnConfig {
                statistics,
                ..Default::default()
            };
            time_ms(device, w, r, &layers, |l| {
                let wts = FfnWeights::new(&l.wg, &l.wu, &l.wd);
                Ok(tch::no_grad(|| {
                    sparse_kernels::try_sparse_ffn(&l.x, &wts, FfnPath::Twell, &config)
                })?
                .y)
            })
        };
        let op = op_with(true)?;
        let op_quiet = op_with(false)?;
        let decode = if decode_sized {
            let ms = time_ms(device, w, r, &layers, |l| {
                Ok(decode_ffn(&l.x, &l.wg, &l.wu, &l.wd)?)
            })?;
            format!("{ms:>9.4} {:>8.2}x", dense / ms)
        } else {
            format!("{:>9} {:>9}", "-", "-")
        };
        println!(
            "{n:>6} | {acts:>13} | {:>9.2e} {:>9.2e} | {dense:>9.4} | {twell:>9.4} | {:>7.2}x | {op:>9.4} | {op_quiet:>9.4} | {decode}",
            worst.0,
            worst.1,
            dense / twell
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// --mode train: dense bf16 autograd fwd+bwd vs the hybrid kernels through `sparse_ffn`.

/// Seed of the upstream gradient `dy` and the L1 weight used by the train mode.
const TRAIN_DL1: f64 = 1e-4;

/// One layer's training inputs: the layer's tensors as bf16 leaves requiring grad, `dy`, and
/// the fp32 buffers the kernels-only form adds its weight gradients into (dWg, dWu, dWd^T).
struct TrainLayer {
    leaves: [Tensor; 4],
    dy: Tensor,
    weight_grads: [Tensor; 3],
}

/// Loss `sum(y * dy) + dl1 * l1_sum`; returns the gradients of `x, Wg, Wu, Wd^T` (not
/// accumulated into `.grad`).
fn grads_of(y: &Tensor, l1_sum: &Tensor, dy: &Tensor, leaves: &[Tensor; 4]) -> Result<Vec<Tensor>> {
    let loss = (y * dy).sum(Kind::Float) + l1_sum * TRAIN_DL1;
    Ok(Tensor::f_run_backward(&[loss], leaves, false, false)?)
}

/// Dense training FFN in bf16 through tch autograd (cuBLAS): y, l1 = sum |h|, backward.
fn dense_train(l: &TrainLayer) -> Result<Vec<Tensor>> {
    let [x, wg, wu, wd] = &l.leaves;
    let h = x.matmul(&wg.tr()).relu() * x.matmul(&wu.tr());
    let y = h.matmul(wd);
    let l1 = h.abs().sum(Kind::Float);
    grads_of(&y, &l1, &l.dy, &l.leaves)
}

/// `sparse_ffn` on the hybrid path over the leaves `[x, Wg, Wu, Wd^T]`.
fn hybrid_ffn(leaves: &[Tensor; 4]) -> Result<sparse_kernels::FfnOutput> {
    let [x, gate, up, down_t] = leaves;
    let w = FfnWeights::new(gate, up, down_t);
    Ok(sparse_kernels::try_sparse_ffn(
        x,
        &w,
        FfnPath::Hybrid,
        &Default::default(),
    )?)
}

/// The hybrid path through `sparse_ffn` (the SparseFfn autograd function, CUDA kernels).
fn hybrid_train(l: &TrainLayer) -> Result<Vec<Tensor>> {
    let out = hybrid_ffn(&l.leaves)?;
    grads_of(&out.y, &out.l1_sum, &l.dy, &l.leaves)
}

/// The hybrid kernels called directly (no autograd, no loss ops): forward, backward, the
/// weight gradients added into the layer's fp32 buffers; returns dx.
fn hybrid_kernels_only(l: &TrainLayer, dl1: &Tensor) -> Result<Tensor> {
    let [x, wg, wu, wd] = &l.leaves;
    let _g = tch::no_grad_guard();
    let f = sparse_kernels::cuda::hybrid_forward(x, wg, wu, wd)?;
    let [gg, gu, gd] = &l.weight_grads;
    let into = sparse_kernels::cuda::WeightGrads::AddInto([gg, gu, gd]);
    let (dx, _) = sparse_kernels::cuda::hybrid_backward(&f.state, x, wg, wu, wd, &l.dy, dl1, into)?;
    Ok(dx)
}

/// Peak bytes allocated above what was live before `f` (one call), and what `f` returned is
/// kept alive until the peak is read.
fn peak_delta<T>(device: Device, f: impl FnOnce() -> Result<T>) -> Result<(u64, T)> {
    use sparse_kernels::cuda_runtime::{peak_allocated_bytes, reset_peak};
    tch::Cuda::synchronize(device_index(device));
    reset_peak(device);
    // Right after a reset the peak equals what is allocated now.
    let base = peak_allocated_bytes(device).unwrap_or(0);
    let out = f()?;
    tch::Cuda::synchronize(device_index(device));
    let peak = peak_allocated_bytes(device).unwrap_or(0);
    Ok((peak.saturating_sub(base), out))
}

/// Checks that the caching allocator's peak statistic moves (it read 0 on an earlier run).
/// The allocator is set up lazily by the first CUDA tensor; before that its statistics
/// calls throw (the bridge now catches that), so a tensor is allocated first.
fn peak_stat_works(device: Device) -> Result<bool> {
    let _init = Tensor::f_zeros([1], (Kind::Float, device))?;
    if !sparse_kernels::cuda_runtime::reset_peak(device) {
        return Ok(false);
    }
    let (delta, t) = peak_delta(device, || {
        Ok(Tensor::f_empty([64 << 20], (Kind::Uint8, device))?)
    })?;
    drop(t);
    Ok(delta >= 64 << 20)
}

/// max|err| / max|ref| of the hybrid path (y and the four gradients) against fp32 autograd
/// of the dense function on the same bf16 values.
/// Errors of the hybrid path against the fp32 reference (y, l1, dx, dWg, dWu, dWd^T), and of
/// the dense bf16 path (cuBLAS) for the four gradients: near g = 0 a bf16 gate decides the
/// ReLU differently from fp32, and since dg = dh * u * [g > 0] jumps there, a single tie moves
/// a rarely-active unit's weight gradient by O(1/tokens-it-fired-on) in either bf16 path.
fn check_train(l: &TrainLayer) -> Result<([f64; 6], [f64; 4])> {
    let f32leaves: Vec<Tensor> = l
        .leaves
        .iter()
        .map(|t| t.detach().to_kind(Kind::Float).set_requires_grad(true))
        .collect();
    let [x, wg, wu, wd] = [&f32leaves[0], &f32leaves[1], &f32leaves[2], &f32leaves[3]];
    let h = x.matmul(&wg.tr()).relu() * x.matmul(&wu.tr());
    let y = h.matmul(wd);
    let l1 = h.abs().sum(Kind::Float);
    let dyf = l.dy.to_kind(Kind::Float);
    let loss = (&y * &dyf).sum(Kind::Float) + &l1 * TRAIN_DL1;
    let want = Tensor::f_run_backward(&[loss], &f32leaves, false, false)?;
    let out = hybrid_ffn(&l.leaves)?;
    let got = grads_of(&out.y, &out.l1_sum, &l.dy, &l.leaves)?;
    let rel = |a: &Tensor, b: &Tensor| {
        (a.to_kind(Kind::Float) - b).abs().max().double_value(&[])
            / b.abs().max().double_value(&[]).max(1e-30)
    };
    let l1w = l1.double_value(&[]);
    let dense = dense_train(l)?;
    Ok((
        [
            rel(&out.y, &y.detach()),
            (out.l1_sum.double_value(&[]) - l1w).abs() / l1w.abs().max(1e-30),
            rel(&got[0], &want[0]),
            rel(&got[1], &want[1]),
            rel(&got[2], &want[2]),
            rel(&got[3], &want[3]),
        ],
        [0, 1, 2, 3].map(|i| rel(&dense[i], &want[i])),
    ))
}

/// `sparse-train bench ffn --mode train`.
fn run_ffn_train(args: &BenchFfnArgs) -> Result<()> {
    use sparse_kernels::cuda::HybridKernels;
    let setup = FfnBenchSetup::new(args)?;
    let FfnBenchSetup { d, h, device, .. } = setup;
    let hk = HybridKernels::for_device(device).context("loading the hybrid kernels")?;
    if !hk.supports(1, d, h) {
        bail!("the hybrid kernels do not take D = {d}, H = {h}");
    }
    let peak_ok = peak_stat_works(device)?;
    println!(
        "bench ffn --mode train: {}, bf16 leaves, loss = sum(y * dy) + {TRAIN_DL1:e} * l1_sum, \
         gate kernel {}",
        setup.describe(args),
        setup.gate_kernel()
    );
    println!(
        "  times: ms per layer fwd+bwd, median of {} repeats x 4 layers; memory: peak bytes \
         allocated above the live inputs during one layer's fwd+bwd (caching allocator, \
         incl. y, dx, dW; peak statistic {})",
        args.repeats,
        if peak_ok {
            "checked: works"
        } else {
            "BROKEN: reads no 64 MiB allocation"
        }
    );
    println!(
        "{:>6} | {:>13} | {:>8} {:>8} {:>8} | {:>9} | {:>9} {:>9} | {:>8} {:>8} | {:>21} | {:>10}",
        "N",
        "actives/tok",
        "err y",
        "err dW",
        "err l1",
        "dense ms",
        "hybrid ms",
        "kernels",
        "d/hyb",
        "d/kern",
        "peak MiB dense->hyb",
        "saved MiB"
    );
    let counts = FfnBenchSetup::layers_per_count(args, |n| {
        let l = imposed_sparsity_layer(n, d, h, args.sparsity, device)?;
        Ok(TrainLayer {
            leaves: [l.x, l.wg, l.wu, l.wd].map(|t| t.set_requires_grad(true)),
            dy: Tensor::randn([n, d], (Kind::Float, device)).to_kind(Kind::BFloat16),
            weight_grads: [(); 3].map(|_| Tensor::zeros([h, d], (Kind::Float, device))),
        })
    });
    for counted in counts {
        let (n, layers) = counted?;
        let dl1 = Tensor::full([1], TRAIN_DL1, (Kind::Float, device));
        let mut errs = [0.0f64; 6];
        let mut dense_errs = [0.0f64; 4];
        for l in &layers {
            let (e, de) = check_train(l)?;
            for (a, b) in errs.iter_mut().zip(e) {
                *a = a.max(b);
            }
            for (a, b) in dense_errs.iter_mut().zip(de) {
                *a = a.max(b);
            }
        }
        let err_dw = errs[2..].iter().cloned().fold(0.0, f64::max);
        // Each gradient within 2e-2 of fp32, or no further than twice what dense bf16 is.
        let grads_ok = (0..4).all(|i| errs[2 + i] <= 2e-2f64.max(2.0 * dense_errs[i]));
        println!(
            "  N = {n}: gradient error vs fp32, hybrid {:.2e} {:.2e} {:.2e} {:.2e}, dense bf16 {:.2e} {:.2e} {:.2e} {:.2e}",
            errs[2], errs[3], errs[4], errs[5], dense_errs[0], dense_errs[1], dense_errs[2], dense_errs[3]
        );
        if errs[0] > 2e-2 || !grads_ok || errs[1] > 2e-3 {
            bail!(
                "N = {n}: hybrid off the fp32 reference: y {:.2e}, l1 {:.2e}, grads {err_dw:.2e} (dense bf16 {:.2e})",
                errs[0],
                errs[1],
                dense_errs.iter().cloned().fold(0.0, f64::max)
            );
        }
        let f = layers[0].leaves.iter().take(2).collect::<Vec<_>>();
        let apt = tch::no_grad(|| {
            f[0].matmul(&f[1].tr())
                .gt(0.0)
                .sum_dim_intlist(-1, false, Kind::Int64)
        });
        let acts = format!(
            "{:.1} ({})",
            apt.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]),
            apt.max().int64_value(&[])
        );
        if args.check_only {
            println!(
                "{n:>6} | {acts:>13} | {:>8.1e} {err_dw:>8.1e} {:>8.1e} | check only: OK",
                errs[0], errs[1]
            );
            continue;
        }
        let (w, r) = (args.warmup, args.repeats);
        let dense = time_ms(device, w, r, &layers, |l| Ok(dense_train(l)?.remove(0)))?;
        let hybrid = time_ms(device, w, r, &layers, |l| Ok(hybrid_train(l)?.remove(0)))?;
        let kern = time_ms(device, w, r, &layers, |l| hybrid_kernels_only(l, &dl1))?;
        let dense2 = time_ms(device, w, r, &layers, |l| Ok(dense_train(l)?.remove(0)))?;
        // Memory of layer 0: one fwd+bwd each, outputs kept until the peak is read.
        let l0 = &layers[0];
        let (pd, _g) = peak_delta(device, || dense_train(l0))?;
        let (ph, _g) = peak_delta(device, || hybrid_train(l0))?;
        let saved = {
            let [x, wg, wu, wd] = &l0.leaves;
            let _ng = tch::no_grad_guard();
            sparse_kernels::cuda::hybrid_forward(x, wg, wu, wd)?
                .state
                .saved_bytes()
        };
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        println!(
            "{n:>6} | {acts:>13} | {:>8.1e} {err_dw:>8.1e} {:>8.1e} | {dense:>9.4} | {hybrid:>9.4} {kern:>9.4} | {:>7.2}x {:>7.2}x | {:>9.1} -> {:>8.1} | {:>10.2}",
            errs[0],
            errs[1],
            dense / hybrid,
            dense / kern,
            mib(pd),
            mib(ph),
            mib(saved as u64),
        );
        println!("       dense rerun after the sparse runs: {dense2:.4} ms");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse() {
        assert_eq!(parse_shape("1.5b").unwrap(), (2048, 5632));
        assert_eq!(parse_shape("64,300").unwrap(), (64, 300));
        assert!(parse_shape("huge").is_err());
    }
}
