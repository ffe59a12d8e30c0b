//! Every sparse path equals the dense oracle under tch autograd: `y`, `l1_sum`, the activity
//! statistics and the gradients of `x`, `Wg`, `Wu`, `Wd^T`, for the loss
//! `(y * r).sum() + c * l1_sum`.
//!
//! Inputs: `x: [N, D]` random with column 0 a per-token shift feature and `Wg[:, 0] = 1`, so
//! the gate pre-activation is `g = g0 + shift_t`. The shift sets the density of `relu(g)`
//! (a quantile of `g0`), and makes token 0 fully active and token 1 empty when `N >= 3`.
//!
//! Tolerances, as `max |got - want| <= tol * max(|want|, 1e-3)` per tensor:
//! - hybrid, f32: 1e-4 (f32 reference vs torch's differently ordered f32 sums);
//! - TwELL, f32: 1e-2 (TwELL stores gate values as bf16, relative rounding <= 2^-9);
//! - bf16 inputs (both paths, against the oracle run in f32 on the same bf16 values): 2e-2
//!   (`y` and the gradients are returned in bf16).
//!
//! Statistics (`active_per_token`, `active_per_unit`) must match exactly.
use sparse_kernels::format::{EllTailConfig, TwellConfig, TwellError};
use sparse_kernels::testing::cuda_device_or_skip;
use sparse_kernels::{
    dense_ffn, try_sparse_ffn, FfnError, FfnOutput, FfnPath, FfnWeights, SparseFfnConfig,
};
use tch::{Device, Kind, Tensor};

const L1_COEFF: f64 = 0.3;

/// Small formats so that moderate shapes hit tile overflow, tail rows and a full tail.
fn tiny_formats() -> SparseFfnConfig {
    SparseFfnConfig {
        twell: TwellConfig {
            tile: 16,
            compression: 4,
        },
        ell_tail: EllTailConfig {
            ell_width: 4,
            tail_capacity: 2,
        },
        ell_tail_transposed: EllTailConfig {
            ell_width: 8,
            tail_capacity: 3,
        },
        statistics: true,
    }
}

/// Leaf tensors `x: [n, d]`, `Wg, Wu, Wd^T: [h, d]` (f32) with `density` of the gate active.
fn problem(n: i64, d: i64, h: i64, density: f64, seed: i64) -> [Tensor; 4] {
    tch::manual_seed(seed);
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([n, d], opts);
    let gate = Tensor::randn([h, d], opts) * 0.5;
    let _ = gate.narrow(1, 0, 1).fill_(1.0);
    let g0 = x.narrow(1, 1, d - 1).matmul(&gate.narrow(1, 1, d - 1).tr());
    let sorted = g0.flatten(0, -1).sort(0, false).0;
    let total = n * h;
    let shift = if density >= 1.0 {
        -sorted.double_value(&[0]) + 1.0
    } else {
        let k = ((1.0 - density) * total as f64).floor() as i64;
        -sorted.double_value(&[k.min(total - 1)])
    };
    let mut shifts = vec![shift as f32; n as usize];
    if n >= 3 {
        shifts[0] = (-g0.get(0).min().double_value(&[]) + 1.0) as f32;
        shifts[1] = (-g0.get(1).max().double_value(&[]) - 1.0) as f32;
    }
    x.narrow(1, 0, 1)
        .copy_(&Tensor::from_slice(&shifts).view([n, 1]));
    let up = Tensor::randn([h, d], opts) * 0.5;
    let down_t = Tensor::randn([h, d], opts) * 0.5;
    [x, gate, up, down_t].map(|t| t.set_requires_grad(true))
}

struct Run {
    out: FfnOutput,
    /// Gradients of `x, Wg, Wu, Wd^T`.
    grads: Vec<Tensor>,
}

fn run(leaves: &[Tensor; 4], path: FfnPath, config: &SparseFfnConfig, r: &Tensor) -> Run {
    let w = weights(leaves);
    let out = try_sparse_ffn(&leaves[0], &w, path, config).unwrap();
    let loss = (out.y.to_kind(Kind::Float) * r).sum(Kind::Float) + &out.l1_sum * L1_COEFF;
    let grads = Tensor::run_backward(&[loss], leaves, false, false);
    Run { out, grads }
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.size(), want.size(), "{name}: shape");
    let (got, want) = (got.to_kind(Kind::Float), want.to_kind(Kind::Float));
    let err = (&got - &want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]).max(1e-3);
    assert!(
        err <= tol * scale,
        "{name}: max error {err:e} > {tol:e} * {scale:e}"
    );
}

fn compare(label: &str, got: &Run, want: &Run, tol: f64) {
    assert_close(&format!("{label} y"), &got.out.y, &want.out.y, tol);
    assert_close(
        &format!("{label} l1_sum"),
        &got.out.l1_sum,
        &want.out.l1_sum,
        tol,
    );
    assert_eq!(
        got.out.l1_sum.size(),
        Vec::<i64>::new(),
        "{label}: l1_sum is a scalar"
    );
    assert!(
        got.out.active_per_token.equal(&want.out.active_per_token),
        "{label} active_per_token"
    );
    assert!(
        got.out.active_per_unit.equal(&want.out.active_per_unit),
        "{label} active_per_unit"
    );
    for (i, name) in ["dx", "dWg", "dWu", "dWd^T"].iter().enumerate() {
        assert_close(
            &format!("{label} {name}"),
            &got.grads[i],
            &want.grads[i],
            tol,
        );
    }
}

fn tolerance(path: FfnPath) -> f64 {
    match path {
        FfnPath::Twell => 1e-2,
        _ => 1e-4,
    }
}

#[test]
fn sparse_paths_match_dense_oracle_from_dense_to_999_per_mille_sparse() {
    let shapes = [(1, 8, 5), (37, 16, 300), (130, 12, 70), (260, 10, 24)];
    let densities = [1.0, 0.5, 0.1, 0.01, 0.001];
    let configs = [SparseFfnConfig::default(), tiny_formats()];
    let mut seed = 0;
    for &(n, d, h) in &shapes {
        for &density in &densities {
            seed += 1;
            let leaves = problem(n, d, h, density, seed);
            let r = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
            let want = run(&leaves, FfnPath::Dense, &SparseFfnConfig::default(), &r);
            for (ci, config) in configs.iter().enumerate() {
                for path in [FfnPath::Twell, FfnPath::Hybrid] {
                    let label = format!(
                        "{} N={n} D={d} H={h} density={density} config={ci}",
                        path.name()
                    );
                    compare(
                        &label,
                        &run(&leaves, path, config, &r),
                        &want,
                        tolerance(path),
                    );
                }
            }
        }
    }
}

#[test]
fn overflow_beyond_tail_capacity_is_exact_and_counted() {
    let (n, d, h) = (40, 8, 40);
    let leaves = problem(n, d, h, 1.0, 99);
    let r = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
    let want = run(&leaves, FfnPath::Dense, &SparseFfnConfig::default(), &r);
    let config = tiny_formats();
    let hybrid = run(&leaves, FfnPath::Hybrid, &config, &r);
    compare("hybrid, full tail", &hybrid, &want, 1e-4);
    assert_eq!(
        Vec::<i64>::try_from(&hybrid.out.overflow_rows).unwrap(),
        [n - 1, n - 3],
        "token 1 is empty, the others full"
    );
    let twell = run(&leaves, FfnPath::Twell, &config, &r);
    compare("twell, all rows overflow", &twell, &want, 1e-2);
    assert_eq!(
        Vec::<i64>::try_from(&twell.out.overflow_rows).unwrap(),
        [n - 1, 0]
    );
    assert_eq!(
        Vec::<i64>::try_from(&want.out.overflow_rows).unwrap(),
        [0, 0]
    );
}

#[test]
fn bf16_inputs_return_bf16_and_match_the_f32_oracle() {
    let (n, d, h) = (45, 16, 90);
    let leaves = problem(n, d, h, 0.1, 5);
    let bf: [Tensor; 4] = std::array::from_fn(|i| {
        leaves[i]
            .detach()
            .to_kind(Kind::BFloat16)
            .set_requires_grad(true)
    });
    let widened: [Tensor; 4] =
        std::array::from_fn(|i| bf[i].detach().to_kind(Kind::Float).set_requires_grad(true));
    let r = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
    let want = run(&widened, FfnPath::Dense, &SparseFfnConfig::default(), &r);
    for path in [FfnPath::Twell, FfnPath::Hybrid] {
        let got = run(&bf, path, &tiny_formats(), &r);
        assert_eq!(got.out.y.kind(), Kind::BFloat16);
        assert_eq!(got.out.l1_sum.kind(), Kind::Float);
        assert!(got.grads.iter().all(|g| g.kind() == Kind::BFloat16));
        compare(&format!("{} bf16", path.name()), &got, &want, 2e-2);
    }
}

#[test]
fn gradients_flow_through_preceding_ops_and_unused_outputs() {
    let leaves = problem(20, 8, 33, 0.3, 8);
    let a = Tensor::randn([20, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let w = weights(&leaves);
    for path in [FfnPath::Twell, FfnPath::Hybrid] {
        let out = try_sparse_ffn(&(&a * 2.0), &w, path, &SparseFfnConfig::default()).unwrap();
        let got = Tensor::run_backward(&[&out.l1_sum], &[&a], false, false);
        let dense = dense_ffn(&(&a * 2.0), &w);
        let want = Tensor::run_backward(&[&dense.l1_sum], &[&a], false, false);
        assert_close(
            &format!("{} d(l1)/da", path.name()),
            &got[0],
            &want[0],
            tolerance(path),
        );
    }
}

/// The weights of `problem`'s leaves.
fn weights(leaves: &[Tensor; 4]) -> FfnWeights<'_> {
    FfnWeights::new(&leaves[1], &leaves[2], &leaves[3])
}

/// Under no_grad, each of `paths` with `config` gives the oracle's `y`, without grad.
fn assert_no_grad_y_matches_oracle(
    leaves: &[Tensor; 4],
    paths: &[FfnPath],
    config: &SparseFfnConfig,
    what: &str,
) {
    let w = weights(leaves);
    tch::no_grad(|| {
        let want = dense_ffn(&leaves[0], &w);
        for &path in paths {
            let got = try_sparse_ffn(&leaves[0], &w, path, config).unwrap();
            assert!(!got.y.requires_grad());
            assert_close(
                &format!("{} {what}", path.name()),
                &got.y,
                &want.y,
                tolerance(path),
            );
        }
    });
}

#[test]
fn inference_without_grad_matches_oracle() {
    let leaves = problem(50, 16, 64, 0.05, 4);
    assert_no_grad_y_matches_oracle(
        &leaves,
        &[FfnPath::Twell, FfnPath::Hybrid],
        &SparseFfnConfig::default(),
        "no-grad y",
    );
}

/// With statistics off (inference), every path still gives the oracle's `y`; the dense path
/// then skips the L1 term and the counts (NaN, empty), and with a gradient needed the flag
/// is ignored (the L1 term is part of the loss).
#[test]
fn statistics_off_keeps_y_and_drops_the_counts() {
    let leaves = problem(50, 16, 64, 0.05, 4);
    let w = weights(&leaves);
    let off = SparseFfnConfig {
        statistics: false,
        ..SparseFfnConfig::default()
    };
    assert_no_grad_y_matches_oracle(
        &leaves,
        &[FfnPath::Dense, FfnPath::Twell, FfnPath::Hybrid],
        &off,
        "y without statistics",
    );
    tch::no_grad(|| {
        let dense = try_sparse_ffn(&leaves[0], &w, FfnPath::Dense, &off).unwrap();
        assert!(dense.l1_sum.double_value(&[]).is_nan());
        assert_eq!(dense.active_per_token.numel(), 0);
        assert_eq!(dense.active_per_unit.numel(), 0);
    });
    let x = leaves[0].set_requires_grad(true);
    let got = try_sparse_ffn(&x, &w, FfnPath::Dense, &off).unwrap();
    let want = dense_ffn(&x, &w);
    assert_close("dense l1 with grad", &got.l1_sum, &want.l1_sum, 1e-6);
    assert!(got.active_per_token.equal(&want.active_per_token));
}

#[test]
fn bad_inputs_give_typed_errors() {
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([3, 4], opts);
    let w4 = Tensor::randn([6, 4], opts);
    let w5 = Tensor::randn([6, 5], opts);
    let config = SparseFfnConfig::default();
    let bad = FfnWeights::new(&w4, &w5, &w4);
    match try_sparse_ffn(&x, &bad, FfnPath::Hybrid, &config) {
        Err(FfnError::WeightShape { name: "Wu", .. }) => {}
        other => panic!("expected a Wu shape error, got {:?}", other.err()),
    }
    let xi = Tensor::zeros([3, 4], (Kind::Int64, Device::Cpu));
    let ok = FfnWeights::new(&w4, &w4, &w4);
    assert!(matches!(
        try_sparse_ffn(&xi, &ok, FfnPath::Twell, &config),
        Err(FfnError::Dtype { name: "x", .. })
    ));
    let wide = Tensor::ones([65_537, 1], opts);
    let x1 = Tensor::ones([2, 1], opts);
    let w = FfnWeights::new(&wide, &wide, &wide);
    match try_sparse_ffn(&x1, &w, FfnPath::Twell, &config) {
        Err(FfnError::Twell(TwellError::TooManyCols { cols: 65_537 })) => {}
        other => panic!("expected TooManyCols, got {:?}", other.err()),
    }
    let wide_ok = try_sparse_ffn(&x1, &w, FfnPath::Hybrid, &config).unwrap();
    assert_eq!(wide_ok.active_per_unit.size(), [65_537]);
}

/// With masters (`FfnWeights::with_masters`), the copies get no gradient and the masters'
/// `.grad` holds exactly what autograd gives leaves used directly, over two calls (the second
/// adds to the first), on every path, with the copies separate tensors or the masters
/// themselves (the f32 trainer's case). Bit for bit: both add the same f32 gradient.
#[test]
fn masters_receive_the_weight_gradients_the_leaves_would() {
    let config = tiny_formats();
    for path in [FfnPath::Dense, FfnPath::Twell, FfnPath::Hybrid] {
        for copies_are_masters in [false, true] {
            let leaves = problem(13, 6, 40, 0.2, 31);
            let r = Tensor::randn([13, 6], (Kind::Float, Device::Cpu));
            let masters: Vec<Tensor> = leaves[1..]
                .iter()
                .map(|t| t.detach().copy().set_requires_grad(true))
                .collect();
            let copies: Vec<Tensor> = match copies_are_masters {
                true => masters.iter().map(Tensor::shallow_clone).collect(),
                false => masters.iter().map(|m| m.detach().copy()).collect(),
            };
            let x = leaves[0].detach().copy().set_requires_grad(true);
            for _ in 0..2 {
                let w = FfnWeights::new(&copies[0], &copies[1], &copies[2]).with_masters([
                    &masters[0],
                    &masters[1],
                    &masters[2],
                ]);
                let out = try_sparse_ffn(&x, &w, path, &config).unwrap();
                ((out.y.to_kind(Kind::Float) * &r).sum(Kind::Float) + &out.l1_sum * L1_COEFF)
                    .backward();
            }
            let label = format!("{} copies_are_masters={copies_are_masters}", path.name());
            // The leaves' gradients, accumulated by autograd over the same two calls.
            let want: Vec<Tensor> = (0..2)
                .map(|_| run(&leaves, path, &config, &r).grads)
                .reduce(|a, b| a.iter().zip(&b).map(|(a, b)| a + b).collect())
                .unwrap();
            assert!(x.grad().equal(&want[0]), "{label}: dx");
            for (i, name) in ["dWg", "dWu", "dWd^T"].iter().enumerate() {
                assert!(
                    masters[i].grad().equal(&want[i + 1]),
                    "{label}: {name} in the master"
                );
                if !copies_are_masters {
                    assert!(
                        !copies[i].grad().defined(),
                        "{label}: the copy got a gradient"
                    );
                }
            }
        }
    }
}

/// A master whose shape is not its copy's is refused, naming it.
#[test]
fn a_master_of_the_wrong_shape_is_refused() {
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([3, 4], opts);
    let (w, wrong) = (Tensor::randn([6, 4], opts), Tensor::randn([6, 5], opts));
    let ws = FfnWeights::new(&w, &w, &w).with_masters([&w, &w, &wrong]);
    match try_sparse_ffn(&x, &ws, FfnPath::Hybrid, &SparseFfnConfig::default()) {
        Err(FfnError::WeightShape {
            name: "the master of Wd^T",
            ..
        }) => {}
        other => panic!("expected a master shape error, got {:?}", other.err()),
    }
}

/// On CUDA tensors that no kernel takes (here D = 48, not a multiple of 64; TwELL with a
/// gradient) the op runs its dense-ops fallback inside the autograd function; it must still
/// equal the oracle (f32: 1e-4, bf16 against the f32 oracle: 2e-2). The kernels themselves
/// are checked in twell_cuda.rs and hybrid_cuda.rs. Skipped without CUDA (fails under
/// `SPARSE_TRAIN_REQUIRE_GPU=1`).
#[test]
fn cuda_tensors_match_dense_oracle() {
    let Some(dev) = cuda_device_or_skip("cuda_tensors_match_dense_oracle") else {
        return;
    };
    let leaves = problem(300, 48, 520, 0.02, 21);
    let r = Tensor::randn([300, 48], (Kind::Float, Device::Cpu)).to_device(dev);
    for (kind, tol) in [(Kind::Float, 1e-4), (Kind::BFloat16, 2e-2)] {
        let on_dev: [Tensor; 4] = std::array::from_fn(|i| {
            leaves[i]
                .detach()
                .to_device(dev)
                .to_kind(kind)
                .set_requires_grad(true)
        });
        let widened: [Tensor; 4] = std::array::from_fn(|i| {
            on_dev[i]
                .detach()
                .to_kind(Kind::Float)
                .set_requires_grad(true)
        });
        let want = run(&widened, FfnPath::Dense, &SparseFfnConfig::default(), &r);
        for path in [FfnPath::Twell, FfnPath::Hybrid] {
            let got = run(&on_dev, path, &SparseFfnConfig::default(), &r);
            assert_eq!(got.out.y.device(), dev);
            assert_eq!(got.out.y.kind(), kind);
            compare(&format!("{} cuda {kind:?}", path.name()), &got, &want, tol);
        }
    }
}
