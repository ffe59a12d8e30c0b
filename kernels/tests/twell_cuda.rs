//! The TwELL CUDA kernels through `sparse_ffn` against the dense oracle (GPU only: skips with
//! a printed reason on a machine without CUDA).
use sparse_kernels::{sparse_ffn, try_sparse_ffn, FfnPath, FfnWeights, SparseFfnConfig};
use tch::{Device, Kind, Tensor};

fn case(n: i64, d: i64, h: i64, shift: f64, heavy_rows: i64) {
    let dev = Device::Cuda(0);
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
    let w = FfnWeights {
        gate: &wg,
        up: &wu,
        down_t: &wd,
    };
    let out = tch::no_grad(|| sparse_ffn(&x, &w, FfnPath::Twell));
    let f = |t: &Tensor| t.to_kind(Kind::Float);
    let g = f(&x).matmul(&f(&wg).tr());
    let want = (g.relu() * f(&x).matmul(&f(&wu).tr())).matmul(&f(&wd));
    let err = (f(&out.y) - &want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]).max(1e-12);
    let apt = g.gt(0.0).sum_dim_intlist(-1, false, Kind::Int64);
    println!("N={n} D={d} H={h}: max|err|/max|ref| = {:.2e}", err / scale);
    assert!(err / scale < 2e-2, "N={n}: relative error {}", err / scale);
    // Gate values within rounding of 0 may flip sign (other fp32 accumulation order).
    let apu = g.gt(0.0).sum_dim_intlist(0, false, Kind::Int64);
    let total = apt.sum(Kind::Int64).int64_value(&[]);
    for (got, want) in [(&out.active_per_token, &apt), (&out.active_per_unit, &apu)] {
        let diff = (got - want).abs();
        let flips = diff.sum(Kind::Int64).int64_value(&[]);
        println!("  active-count flips {flips} of {total}");
        assert!(
            diff.max().int64_value(&[]) <= 2 && flips <= total / 1000 + 2,
            "active counts differ: {flips} of {total}"
        );
    }
    assert!(out.l1_sum.isnan().int64_value(&[]) == 1);
    // Statistics off (inference): the same kernels, the same y, no counts.
    let off = SparseFfnConfig {
        statistics: false,
        ..SparseFfnConfig::default()
    };
    let quiet = tch::no_grad(|| try_sparse_ffn(&x, &w, FfnPath::Twell, &off)).unwrap();
    let err = (f(&quiet.y) - &want).abs().max().double_value(&[]);
    assert!(
        err / scale < 2e-2,
        "N={n}, statistics off: relative error {}",
        err / scale
    );
    assert_eq!(quiet.active_per_token.numel(), 0);
}

#[test]
fn twell_kernels_match_dense_on_gpu() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA device (the TwELL kernels need a GPU)");
        return;
    }
    if !sparse_kernels::cuda::has_embedded_cubins()
        && std::env::var_os("SPARSE_TRAIN_CUBINS").is_none()
    {
        println!("skipped: built without nvcc and SPARSE_TRAIN_CUBINS unset: no cubins");
        return;
    }
    for (n, d, h, shift, heavy) in [
        (1, 2048, 5632, -2.5, 0),
        (8, 512, 1000, -2.0, 0),
        (777, 1024, 5632, -2.5, 3),
        (256, 2048, 5632, 0.0, 256),
        (4096, 2048, 5632, -2.5, 40),
        // Past the worst-case spill size: a bounded spill buffer that holds, and one that
        // overflows (6500 tokens x 22 spilled tiles > 131072 slots) and is regrown and rerun.
        (32768, 2048, 5632, -2.5, 40),
        (32768, 2048, 5632, -2.5, 6500),
    ] {
        case(n, d, h, shift, heavy);
    }
}

#[test]
fn twell_with_grad_falls_back_exactly() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA device");
        return;
    }
    let dev = Device::Cuda(0);
    let opts = (Kind::Float, dev);
    let x = Tensor::randn([33, 64], opts).set_requires_grad(true);
    let ws: Vec<Tensor> = (0..3)
        .map(|_| (Tensor::randn([100, 64], opts) * 0.2).set_requires_grad(true))
        .collect();
    let w = FfnWeights {
        gate: &ws[0],
        up: &ws[1],
        down_t: &ws[2],
    };
    let out = sparse_ffn(&x, &w, FfnPath::Twell);
    let dense = sparse_kernels::ffn::dense_ffn(&x, &w);
    assert!(out.y.allclose(&dense.y, 1e-4, 1e-4, false));
    (out.y.sum(Kind::Float) + out.l1_sum).backward();
    assert!(x.grad().defined());
}
