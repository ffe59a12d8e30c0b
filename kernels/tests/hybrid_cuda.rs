//! The hybrid CUDA training kernels through `sparse_ffn(.., FfnPath::Hybrid)` (forward AND
//! backward, under tch autograd) against the dense oracle `dense_ffn` in fp32 on the same
//! (bf16-representable) inputs, every element. GPU only: without CUDA the tests skip with a
//! printed reason, or fail under `SPARSE_TRAIN_REQUIRE_GPU=1`.
//!
//! Inputs: `sparse_kernels::testing` (shared/design/anchors.md §3: per-unit bias, per-token
//! shift solved for a heavy-tailed target count), fp32 master weights holding bf16 values,
//! as the trainer has. Loss: `sum(y * r) + dl1 * l1_sum` with dl1 = 0.37, so the L1 term's
//! gradient is exercised. Tolerances (the kernels compute in bf16 with fp32 accumulation; y
//! and the gradients are rounded to bf16): y, dx, dWg, dWu, dWd^T: max|err| / max|ref| <=
//! 2e-2; l1_sum relative error <= 2e-3 (the gate value is stored as bf16, as dense bf16
//! torch does); active counts may differ from fp32 `g > 0` only where g is within rounding
//! of 0 (<= 0.1 % + 2).
mod common;

use common::{assert_counts_close, gpu_or_skip, run_with_grads};
use sparse_kernels::testing::{imposed_sparsity_layer_with_full_rows, relative_error};
use sparse_kernels::{dense_ffn, sparse_ffn, FfnOutput, FfnPath, FfnWeights};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 2e-2;
const L1_TOL: f64 = 2e-3;
const DL1: f64 = 0.37;
const D: i64 = 2048;
const H: i64 = 5632;

/// `[x, Wg, Wu, Wd^T]` in f32 holding bf16 values; `full_rows` tokens fire on every unit.
fn make_layer(n: i64, d: i64, h: i64, s: f64, full_rows: i64, dev: Device) -> [Tensor; 4] {
    imposed_sparsity_layer_with_full_rows(n, d, h, s, full_rows, dev)
        .expect("D >= 8")
        .to_f32()
}

/// Runs `path` (the dense oracle for `None`) under autograd on `sum(y * r) + dl1 * l1_sum`.
fn run(path: Option<FfnPath>, inputs: &[Tensor; 4], r: &Tensor) -> (FfnOutput, Vec<Tensor>) {
    run_with_grads(
        inputs,
        |x, w| match path {
            Some(p) => sparse_ffn(x, w, p),
            None => dense_ffn(x, w),
        },
        |out| (out.y.to_kind(Kind::Float) * r).sum(Kind::Float) + &out.l1_sum * DL1,
    )
}

/// One case at `N` tokens, width `D`, mean sparsity `s`, with `full_rows` all-H tokens.
fn case(name: &str, n: i64, d: i64, s: f64, full_rows: i64) {
    let Some((dev, _gpu)) = gpu_or_skip(name) else {
        return;
    };
    tch::manual_seed(n * 7 + (s * 1000.0) as i64);
    let inputs = make_layer(n, d, H, s, full_rows, dev);
    let r = Tensor::randn([n, d], (Kind::Float, dev));
    let (want, wgrads) = run(None, &inputs, &r);
    let (got, ggrads) = run(Some(FfnPath::Hybrid), &inputs, &r);
    let ry = relative_error(&got.y, &want.y);
    let l1w = want.l1_sum.double_value(&[]);
    let rl1 = (got.l1_sum.double_value(&[]) - l1w).abs() / l1w.abs().max(1e-30);
    let names = ["dx", "dWg", "dWu", "dWd^T"];
    let rg: Vec<f64> = ggrads
        .iter()
        .zip(&wgrads)
        .map(|(g, w)| relative_error(g, w))
        .collect();
    let apt = &want.active_per_token;
    let total = apt.sum(Kind::Int64).int64_value(&[]);
    println!(
        "{name:28} N={n:5} D={d} H={H} actives/tok {:.1} (max {}) overflow {:?} | y {ry:.2e} l1 {rl1:.2e} {}",
        total as f64 / n as f64,
        apt.max().int64_value(&[]),
        Vec::<i64>::try_from(&got.overflow_rows).unwrap(),
        names
            .iter()
            .zip(&rg)
            .map(|(n, e)| format!("{n} {e:.2e}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    assert_eq!(got.y.kind(), Kind::Float, "y in x's dtype without autocast");
    assert_eq!(got.l1_sum.kind(), Kind::Float);
    for (g, w) in ggrads.iter().zip(&inputs) {
        assert_eq!(g.kind(), w.kind(), "gradients in the parameters' dtype");
    }
    assert!(ry <= TOL, "{name}: y rel err {ry}");
    assert!(rl1 <= L1_TOL, "{name}: l1_sum rel err {rl1}");
    for (nm, e) in names.iter().zip(&rg) {
        assert!(*e <= TOL, "{name}: {nm} rel err {e}");
    }
    assert_counts_close("per token", &got.active_per_token, apt, total);
    assert_counts_close(
        "per unit",
        &got.active_per_unit,
        &want.active_per_unit,
        total,
    );
    // Deterministic: a second forward gives the same bits.
    let (again, _) = run(Some(FfnPath::Hybrid), &inputs, &r);
    assert!(again.y.equal(&got.y), "{name}: y not bit-identical");
}

/// One `#[test]` per case: `name: (N, D, sparsity, all-H rows)`.
macro_rules! hybrid_cases {
    ($($(#[$doc:meta])* $name:ident: ($n:expr, $d:expr, $s:expr, $full:expr);)*) => {
        $(
            $(#[$doc])*
            #[test]
            fn $name() {
                case(stringify!($name), $n, $d, $s, $full);
            }
        )*
    };
}

hybrid_cases! {
    hybrid_995_n1: (1, D, 0.995, 0);
    hybrid_995_n777: (777, D, 0.995, 0);
    hybrid_995_n4096: (4096, D, 0.995, 0);
    hybrid_99_n777: (777, D, 0.99, 0);
    hybrid_99_n4096: (4096, D, 0.99, 0);
    /// At 90 % the first-guess pool is too small: it grows and the forward reruns.
    hybrid_90_n777_pool_grows: (777, D, 0.90, 0);
    hybrid_995_n777_five_all_h_rows: (777, D, 0.995, 5);
    hybrid_995_n1_all_h_row: (1, D, 0.995, 1);
    /// D = 4096 runs the `_wide` kernels.
    hybrid_99_n300_wide: (300, 4096, 0.99, 0);
    /// D not a multiple of the weight-gradient kernel's 256-column slice.
    hybrid_99_n1000_d1344: (1000, 1344, 0.99, 0);
}

/// Under autocast over fp32 weights, y comes back in autocast's dtype (tch turns on
/// libtorch's default, fp16), as the dense matmuls give.
#[test]
fn hybrid_under_autocast_returns_autocast_dtype() {
    let Some((dev, _gpu)) = gpu_or_skip("hybrid_under_autocast_returns_autocast_dtype") else {
        return;
    };
    tch::manual_seed(5);
    let inputs = make_layer(256, D, H, 0.995, 0, dev);
    let w = FfnWeights::new(&inputs[1], &inputs[2], &inputs[3]);
    let (out, kind) = tch::autocast(true, || {
        (
            sparse_ffn(&inputs[0], &w, FfnPath::Hybrid),
            sparse_kernels::cuda_runtime::cuda_autocast_kind(),
        )
    });
    let kind = kind.expect("autocast is on inside tch::autocast");
    assert_eq!(out.y.kind(), kind, "y in autocast's dtype");
    let want = dense_ffn(&inputs[0], &w);
    let e = relative_error(&out.y, &want.y);
    println!("autocast N=256: y {:?} rel err {e:.2e}", out.y.kind());
    assert!(e <= TOL);
}

/// Deferred status checks (`cuda::DeferredChecks`): a shape of known sizes runs without its
/// host read and gives the synchronous forward's values and gradients bit for bit; a denser
/// layer of the same shape overflows the kept pool, which `finish` reports (not an error)
/// while growing the sizes, and the rerun equals the synchronous run bit for bit.
#[test]
fn deferred_checks_flag_an_overflow_and_the_rerun_is_exact() {
    use sparse_kernels::cuda::DeferredChecks;
    let Some((dev, _gpu)) = gpu_or_skip("deferred_checks_flag_an_overflow_and_the_rerun_is_exact")
    else {
        return;
    };
    // A token count no other test uses: the kept sizes are per shape.
    let n = 1234;
    tch::manual_seed(77);
    let sparse = make_layer(n, D, H, 0.995, 2, dev);
    let dense = make_layer(n, D, H, 0.90, 0, dev);
    let r = Tensor::randn([n, D], (Kind::Float, dev));
    let same = |label: &str, a: &(FfnOutput, Vec<Tensor>), b: &(FfnOutput, Vec<Tensor>)| {
        assert!(a.0.y.equal(&b.0.y), "{label}: y differs");
        assert!(a.0.l1_sum.equal(&b.0.l1_sum), "{label}: l1_sum differs");
        for (g, h) in a.1.iter().zip(&b.1) {
            assert!(g.equal(h), "{label}: a gradient differs");
        }
    };
    let synchronous = run(Some(FfnPath::Hybrid), &sparse, &r);
    let checks = DeferredChecks::begin(dev).unwrap();
    let deferred = run(Some(FfnPath::Hybrid), &sparse, &r);
    let settled = checks.finish().unwrap();
    assert!(!settled.overflowed, "a pool that fits reported an overflow");
    assert_eq!(settled.grown, 0);
    same("deferred at 99.5 %", &deferred, &synchronous);

    let checks = DeferredChecks::begin(dev).unwrap();
    let _overflowed = run(Some(FfnPath::Hybrid), &dense, &r);
    let settled = checks.finish().unwrap();
    assert!(
        settled.overflowed,
        "a pool of 99.5 % sizes held a 90 % layer"
    );
    assert_eq!(settled.grown, 1, "the shape's sizes grow");

    let checks = DeferredChecks::begin(dev).unwrap();
    let rerun = run(Some(FfnPath::Hybrid), &dense, &r);
    let settled = checks.finish().unwrap();
    assert!(!settled.overflowed, "the grown pool still overflows");
    let synchronous = run(Some(FfnPath::Hybrid), &dense, &r);
    same("rerun at 90 %", &rerun, &synchronous);
    let (want, _) = run(None, &dense, &r);
    let e = relative_error(&rerun.0.y, &want.y);
    println!("rerun at 90 %: y rel err {e:.2e} against the dense oracle");
    assert!(e <= TOL);
}

/// Entries from which a unit counts as heavy in these cases (a long walk of `hyb_bwd_w`).
const HEAVY_UNIT: i64 = 63;

/// Through masters (`FfnWeights::with_masters`, as the trainer calls it): bf16 copies run the
/// kernels and the weight gradients are added into the f32 masters' `.grad` by the kernels
/// themselves (hybrid: `hyb_bwd_w_acc`; dense: cuBLAS with beta = 1). Each master's gradient
/// is prefilled with random values G0 (of the oracle's scale): afterwards `.grad - G0` equals
/// the fp32 oracle's weight gradient, every element within TOL, the copies get no gradient,
/// and dx is the oracle's. `light_and_heavy` asks that the case holds units on both sides
/// of HEAVY_UNIT (skewed counts, as the trainer's).
fn masters_case(
    name: &str,
    path: FfnPath,
    n: i64,
    d: i64,
    s: f64,
    full: i64,
    light_and_heavy: bool,
) {
    let Some((dev, _gpu)) = gpu_or_skip(name) else {
        return;
    };
    tch::manual_seed(n * 13 + (s * 1000.0) as i64 + d);
    let inputs = make_layer(n, d, H, s, full, dev);
    let r = Tensor::randn([n, d], (Kind::Float, dev));
    let (want, wgrads) = run(None, &inputs, &r);
    let per_unit = &want.active_per_unit;
    let heavy = per_unit.ge(HEAVY_UNIT).sum(Kind::Int64).int64_value(&[]);
    let silent = per_unit.eq(0).sum(Kind::Int64).int64_value(&[]);
    if light_and_heavy {
        assert!(heavy > 0 && heavy < H, "{name}: {heavy} heavy units of {H}");
    }
    let masters: Vec<Tensor> = inputs[1..]
        .iter()
        .map(|t| t.detach().copy().set_requires_grad(true))
        .collect();
    let g0: Vec<Tensor> = masters
        .iter()
        .zip(&wgrads[1..])
        .map(|(m, w)| Tensor::randn_like(m) * w.abs().max().double_value(&[]))
        .collect();
    for (m, g) in masters.iter().zip(&g0) {
        (m * g).sum(Kind::Float).backward();
    }
    let copies: Vec<Tensor> = inputs[1..]
        .iter()
        .map(|t| t.to_kind(Kind::BFloat16))
        .collect();
    let x = inputs[0]
        .to_kind(Kind::BFloat16)
        .detach()
        .set_requires_grad(true);
    let w = FfnWeights::new(&copies[0], &copies[1], &copies[2]).with_masters([
        &masters[0],
        &masters[1],
        &masters[2],
    ]);
    let out = sparse_ffn(&x, &w, path);
    ((out.y.to_kind(Kind::Float) * &r).sum(Kind::Float) + &out.l1_sum * DL1).backward();
    let rx = relative_error(&x.grad(), &wgrads[0]);
    let rw: Vec<f64> = masters
        .iter()
        .zip(&g0)
        .zip(&wgrads[1..])
        .map(|((m, g), w)| relative_error(&(m.grad() - g), w))
        .collect();
    println!(
        "{name:36} {} N={n:5} D={d} units heavy {heavy} silent {silent} of {H} | dx {rx:.2e} dWg {:.2e} dWu {:.2e} dWd^T {:.2e}",
        path.name(),
        rw[0],
        rw[1],
        rw[2]
    );
    assert!(rx <= TOL, "{name}: dx rel err {rx}");
    for (nm, e) in ["dWg", "dWu", "dWd^T"].iter().zip(&rw) {
        assert!(*e <= TOL, "{name}: {nm} in the master, rel err {e}");
    }
    for c in &copies {
        assert!(!c.grad().defined(), "{name}: a copy got a gradient");
    }
}

macro_rules! masters_cases {
    ($($(#[$doc:meta])* $name:ident: ($path:expr, $n:expr, $d:expr, $s:expr, $full:expr, $both:expr);)*) => {
        $(
            $(#[$doc])*
            #[test]
            fn $name() {
                masters_case(stringify!($name), $path, $n, $d, $s, $full, $both);
            }
        )*
    };
}

masters_cases! {
    masters_hybrid_995_n1: (FfnPath::Hybrid, 1, D, 0.995, 0, false);
    /// Light and heavy units (the generator's per-unit bias), and silent ones.
    masters_hybrid_995_n8192: (FfnPath::Hybrid, 8192, D, 0.995, 0, true);
    masters_hybrid_995_n777_five_all_h_rows: (FfnPath::Hybrid, 777, D, 0.995, 5, false);
    /// Every unit heavy: the block walk throughout.
    masters_hybrid_90_n4096_heavy_units: (FfnPath::Hybrid, 4096, D, 0.90, 0, false);
    /// D = 4096 (the `_wide` token kernels; 16 slices in the weight-gradient kernel), and
    /// D = 1344, not a multiple of the 256-column slice.
    masters_hybrid_99_n300_wide: (FfnPath::Hybrid, 300, 4096, 0.99, 0, false);
    masters_hybrid_99_n1000_d1344: (FfnPath::Hybrid, 1000, 1344, 0.99, 0, false);
    /// The dense CUDA arm: the weight-gradient GEMMs accumulate into the masters.
    masters_dense_995_n777: (FfnPath::Dense, 777, D, 0.995, 2, false);
}
