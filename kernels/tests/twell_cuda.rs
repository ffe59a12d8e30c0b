//! The TwELL CUDA kernels through `sparse_ffn` against an fp32 reference on the same bf16
//! inputs, every element (GPU only: without CUDA the tests skip with a printed reason, or
//! fail under `SPARSE_TRAIN_REQUIRE_GPU=1`).
mod common;

use common::{assert_counts_close, gpu_or_skip, run_with_grads};
use sparse_kernels::testing::relative_error;
use sparse_kernels::{dense_ffn, sparse_ffn, try_sparse_ffn, FfnPath, FfnWeights, SparseFfnConfig};
use tch::{Device, Kind, Tensor};

fn case(dev: Device, n: i64, d: i64, h: i64, shift: f64, heavy_rows: i64) {
    tch::manual_seed(n + h);
    let opts = (Kind::Float, dev);
    let x = Tensor::randn([n, d], opts);
    let wg = Tensor::randn([h, d], opts) / (d as f64).sqrt() + shift / (d as f64);
    // Some tokens see every unit positive (full tiles: exercises the spill).
    if heavy_rows > 0 {
        let _ = x.narrow(0, 0, heavy_rows).fill_(1.0);
    }
    let wu = Tensor::randn([h, d], opts) / (d as f64).sqrt();
    let wd = Tensor::randn([h, d], opts) / (h as f64).sqrt();
    let bf = |t: &Tensor| t.to_kind(Kind::BFloat16);
    let (x, wg, wu, wd) = (bf(&x), bf(&wg), bf(&wu), bf(&wd));
    let w = FfnWeights::new(&wg, &wu, &wd);
    let out = tch::no_grad(|| sparse_ffn(&x, &w, FfnPath::Twell));
    let f = |t: &Tensor| t.to_kind(Kind::Float);
    let g = f(&x).matmul(&f(&wg).tr());
    let want = (g.relu() * f(&x).matmul(&f(&wu).tr())).matmul(&f(&wd));
    let rel = relative_error(&out.y, &want);
    println!("N={n} D={d} H={h}: max|err|/max|ref| = {rel:.2e}");
    assert!(rel < 2e-2, "N={n}: relative error {rel}");
    let apt = g.gt(0.0).sum_dim_intlist(-1, false, Kind::Int64);
    let apu = g.gt(0.0).sum_dim_intlist(0, false, Kind::Int64);
    let total = apt.sum(Kind::Int64).int64_value(&[]);
    for (label, got, want) in [
        ("per token", &out.active_per_token, &apt),
        ("per unit", &out.active_per_unit, &apu),
    ] {
        // At most 2 gate values within rounding of 0 flip in any one token or unit.
        let worst = (got - want).abs().max().int64_value(&[]);
        assert!(worst <= 2, "N={n}: a count {label} is off by {worst}");
        assert_counts_close(label, got, want, total);
    }
    assert!(out.l1_sum.isnan().int64_value(&[]) == 1);
    // Statistics off (inference): the same kernels, the same y, no counts.
    let off = SparseFfnConfig {
        statistics: false,
        ..SparseFfnConfig::default()
    };
    let quiet = tch::no_grad(|| try_sparse_ffn(&x, &w, FfnPath::Twell, &off)).unwrap();
    let rel = relative_error(&quiet.y, &want);
    assert!(rel < 2e-2, "N={n}, statistics off: relative error {rel}");
    assert_eq!(quiet.active_per_token.numel(), 0);
}

#[test]
fn twell_kernels_match_dense_on_gpu() {
    let Some((dev, _gpu)) = gpu_or_skip("twell_kernels_match_dense_on_gpu") else {
        return;
    };
    for (n, d, h, shift, heavy) in [
        (1, 2048, 5632, -2.5, 0),
        (8, 512, 1000, -2.0, 0),
        // The skinny decode gate up to its 64 tokens: a decode batch, an odd count with
        // heavy rows, every row heavy (full tiles), and an H that is not a tile multiple.
        (32, 2048, 5632, -2.5, 2),
        (17, 2048, 5632, -2.5, 5),
        (64, 1024, 5632, -2.5, 64),
        (33, 512, 1000, 0.0, 33),
        (777, 1024, 5632, -2.5, 3),
        (256, 2048, 5632, 0.0, 256),
        (4096, 2048, 5632, -2.5, 40),
        // Past the worst-case spill size: a bounded spill buffer that holds, and one that
        // overflows (6500 tokens x 22 spilled tiles > 131072 slots) and is regrown and rerun.
        (32768, 2048, 5632, -2.5, 40),
        (32768, 2048, 5632, -2.5, 6500),
    ] {
        case(dev, n, d, h, shift, heavy);
    }
}

/// With a gradient needed the TwELL path runs the exact differentiable fallback (f32 dense
/// ops inside `SparseFfn`): y, l1_sum and all four gradients equal tch autograd through the
/// dense oracle.
#[test]
fn twell_with_grad_falls_back_exactly() {
    let Some((dev, _gpu)) = gpu_or_skip("twell_with_grad_falls_back_exactly") else {
        return;
    };
    tch::manual_seed(17);
    let opts = (Kind::Float, dev);
    let inputs = [
        Tensor::randn([33, 64], opts),
        Tensor::randn([100, 64], opts) * 0.2,
        Tensor::randn([100, 64], opts) * 0.2,
        Tensor::randn([100, 64], opts) * 0.2,
    ];
    let run = |twell: bool| {
        run_with_grads(
            &inputs,
            |x, w| {
                if twell {
                    sparse_ffn(x, w, FfnPath::Twell)
                } else {
                    dense_ffn(x, w)
                }
            },
            |out| out.y.sum(Kind::Float) + &out.l1_sum,
        )
    };
    let (got, got_grads) = run(true);
    let (want, want_grads) = run(false);
    assert!(got.y.allclose(&want.y, 1e-4, 1e-4, false));
    assert!(got.l1_sum.allclose(&want.l1_sum, 1e-4, 1e-4, false));
    for (name, (g, w)) in ["dx", "dWg", "dWu", "dWd^T"]
        .iter()
        .zip(got_grads.iter().zip(&want_grads))
    {
        assert!(g.defined(), "{name}: no gradient");
        assert!(
            g.allclose(w, 1e-4, 1e-4, false),
            "{name} differs from autograd"
        );
    }
}
