//! The fused ops outside the FFN (`sparse_kernels::fused`) on CUDA against references in
//! f64 computed from the same values, every element. GPU only: without CUDA the tests skip
//! with a printed reason, or fail under `SPARSE_TRAIN_REQUIRE_GPU=1`.
//!
//! Inputs are bf16-representable (as the bf16 weight copies and activations are), so the
//! references see exactly what the kernels see. Error bounds, as max |err| / max |ref|:
//! - bf16 outputs of fp32-accumulated GEMMs (y, dx): one bf16 rounding, 2^-8 = 3.9e-3, and
//!   fp32 accumulation far below it: bound 8e-3.
//! - fp32 weight gradients accumulated by cuBLAS into `.grad` (beta = 1): bf16 inputs exact,
//!   fp32 sums over N terms: bound 1e-4 (sqrt(N) eps_f32 is ~1e-5 at N = 8192).
//! - the cross-entropy sum in fp32 from fp32 logits: relative 1e-5; its input and weight
//!   gradients go through `softmax - onehot` rounded to bf16 once: bound 1e-2.
//! - AdamW in fp32 against f64: 1e-5 absolute on O(1) weights after three steps; per-tensor
//!   norms relative 1e-5.
//!
//! Output buffers the ops accumulate into are poisoned first with known random values, and
//! the check is against those values plus the reference (an overwrite fails).
mod common;

use common::{gpu_or_skip, hf_rotate, rope_tables};
use sparse_kernels::cuda_runtime;
use sparse_kernels::fused::adamw::{foreach_norm, fused_adamw, AdamWStep, AdamWTensor};
use sparse_kernels::fused::linear_cross_entropy::linear_cross_entropy;
use sparse_kernels::fused::master_weights::{cached_weight, master_linear};
use sparse_kernels::testing::{adamw_reference_step, relative_error};
use tch::{Device, Kind, Reduction, Tensor};

/// Random values exactly representable in bf16, as f32 on `dev`.
fn bf16_values(shape: &[i64], scale: f64, dev: Device) -> Tensor {
    (Tensor::randn(shape, (Kind::Float, dev)) * scale)
        .to_kind(Kind::BFloat16)
        .to_kind(Kind::Float)
}

fn f64_of(t: &Tensor) -> Tensor {
    t.to_kind(Kind::Double)
}

fn check(label: &str, got: &Tensor, want: &Tensor, bound: f64) {
    let e = relative_error(&got.to_kind(Kind::Double), want);
    println!("  {label}: max|err|/max|ref| = {e:.3e} (bound {bound:.0e})");
    assert!(e <= bound, "{label}: {e:e} > {bound:e}");
}

/// One stacked master_linear over `masters_rows` at N tokens of width `d`, two micro-batches.
fn master_linear_case(name: &str, n: i64, d: i64, rows: &[i64]) {
    let Some((dev, _gpu)) = gpu_or_skip(name) else {
        return;
    };
    println!("{name}: N {n}, D {d}, rows {rows:?}");
    tch::manual_seed(n + d);
    let masters: Vec<Tensor> = rows
        .iter()
        .map(|&r| bf16_values(&[r, d], 0.05, dev).set_requires_grad(true))
        .collect();
    // Poisoned gradient buffers: the op must add into them.
    let poison: Vec<Tensor> = masters
        .iter()
        .map(|m| Tensor::randn(m.size(), (Kind::Float, dev)))
        .collect();
    for (m, p) in masters.iter().zip(&poison) {
        let mut g = m.grad();
        if !g.defined() {
            // A first backward makes the buffer; then it is overwritten with the poison.
            (m * 0.0).sum(Kind::Float).backward();
            g = m.grad();
        }
        tch::no_grad(|| g.copy_(p));
    }
    let stacked = tch::no_grad(|| Tensor::cat(&masters, 0).to_kind(Kind::BFloat16));
    let refs: Vec<&Tensor> = masters.iter().collect();
    let out: i64 = rows.iter().sum();
    let mut dw_want: Vec<Tensor> = poison.iter().map(f64_of).collect();
    for micro in 0..2 {
        let x = bf16_values(&[n, d], 1.0, dev).set_requires_grad(true);
        let dy = bf16_values(&[n, out], 1.0, dev);
        let y = master_linear(&x, &stacked, &refs).unwrap();
        assert_eq!(y.kind(), Kind::BFloat16);
        (y.to_kind(Kind::Float) * &dy).sum(Kind::Float).backward();
        let w64 = f64_of(&stacked);
        check(
            &format!("micro {micro} y"),
            &y,
            &f64_of(&x).matmul(&w64.tr()),
            8e-3,
        );
        check(
            &format!("micro {micro} dx"),
            &x.grad(),
            &f64_of(&dy).matmul(&w64),
            8e-3,
        );
        assert_eq!(x.grad().kind(), Kind::Float);
        let mut row = 0;
        for (want, &r) in dw_want.iter_mut().zip(rows) {
            *want = &*want + f64_of(&dy.narrow(1, row, r)).tr().matmul(&f64_of(&x));
            row += r;
        }
    }
    for (i, (m, want)) in masters.iter().zip(&dw_want).enumerate() {
        // The poison is O(1) and the products O(sqrt N): measured against the products' scale.
        let prod = want - f64_of(&poison[i]);
        let e = (f64_of(&m.grad()) - want).abs().max().double_value(&[])
            / prod.abs().max().double_value(&[]);
        println!("  master {i} dW: max|err|/max|ref| = {e:.3e} (bound 1e-4)");
        assert!(e <= 1e-4, "master {i}: {e:e}");
    }
}

#[test]
fn master_linear_qkv_at_the_trainer_shape() {
    master_linear_case(
        "master_linear_qkv_at_the_trainer_shape",
        8192,
        2048,
        &[2048, 2048, 2048],
    );
}

#[test]
fn master_linear_odd_shapes() {
    master_linear_case("master_linear_odd_shapes", 1000, 80, &[96, 32, 8]);
    master_linear_case("master_linear_one_token", 1, 48, &[24]);
}

#[test]
fn cached_weight_adds_a_bf16_gradient_into_the_fp32_master() {
    let Some((dev, _gpu)) = gpu_or_skip("cached_weight_adds_a_bf16_gradient_into_the_fp32_master")
    else {
        return;
    };
    tch::manual_seed(1);
    let master = bf16_values(&[300, 72], 1.0, dev).set_requires_grad(true);
    let copy = tch::no_grad(|| master.to_kind(Kind::BFloat16));
    let x = bf16_values(&[72, 5], 1.0, dev).to_kind(Kind::BFloat16);
    let mut want = Tensor::zeros([300, 72], (Kind::Double, dev));
    for _ in 0..2 {
        let w = cached_weight(&master, &copy).unwrap();
        let r = bf16_values(&[300, 5], 1.0, dev);
        (w.matmul(&x).to_kind(Kind::Float) * &r)
            .sum(Kind::Float)
            .backward();
        // The gradient the matmul returns for w is bf16 (rounded once): r x^T.
        want += f64_of(
            &r.matmul(&x.to_kind(Kind::Float).tr())
                .to_kind(Kind::BFloat16),
        );
    }
    assert_eq!(master.grad().kind(), Kind::Float);
    check("dW", &master.grad(), &want, 1e-6);
}

/// One linear_cross_entropy case against the f64 head: loss, kept count, dx and dW, with
/// ignored targets; `scale` sets the logits' spread (large: a sharp softmax).
fn cross_entropy_case(name: &str, n: i64, d: i64, v: i64, chunk: i64, scale: f64) {
    let Some((dev, _gpu)) = gpu_or_skip(name) else {
        return;
    };
    println!("{name}: N {n}, D {d}, V {v}, chunk {chunk}, logit scale {scale}");
    tch::manual_seed(n + v);
    let x = bf16_values(&[n, d], 1.0, dev).set_requires_grad(true);
    let master = bf16_values(&[v, d], scale / (d as f64).sqrt(), dev).set_requires_grad(true);
    let copy = tch::no_grad(|| master.to_kind(Kind::BFloat16));
    let targets = Tensor::randint(v, [n], (Kind::Int64, dev));
    let ignored = (n / 7).min(5);
    if ignored > 0 {
        let _ = targets.narrow(0, 0, ignored).fill_(-100);
    }
    let got = linear_cross_entropy(&x, &copy, &master, &targets, chunk).unwrap();
    assert_eq!(got.kept.int64_value(&[]), n - ignored);
    (&got.loss_sum * 0.5).backward();

    let x64 = f64_of(&x.detach()).set_requires_grad(true);
    let w64 = f64_of(&master.detach()).set_requires_grad(true);
    let want = x64.matmul(&w64.tr()).cross_entropy_loss::<Tensor>(
        &targets,
        None,
        Reduction::Sum,
        -100,
        0.0,
    );
    (&want * 0.5).backward();
    let rel = (got.loss_sum.double_value(&[]) - want.double_value(&[])).abs()
        / want.double_value(&[]).abs();
    println!("  loss: relative error {rel:.3e} (bound 1e-5)");
    assert!(rel <= 1e-5, "loss: {rel:e}");
    check("dx", &x.grad(), &x64.grad(), 1e-2);
    check("dW", &master.grad(), &w64.grad(), 1e-2);
    assert_eq!(master.grad().kind(), Kind::Float);
    if ignored > 0 {
        assert_eq!(
            x.grad().narrow(0, 0, ignored).abs().max().double_value(&[]),
            0.0
        );
    }
}

#[test]
fn linear_cross_entropy_at_the_trainer_shape() {
    cross_entropy_case(
        "linear_cross_entropy_at_the_trainer_shape",
        8192,
        2048,
        49152,
        1024,
        1.0,
    );
}

#[test]
fn linear_cross_entropy_hard_cases() {
    // N not a multiple of the chunk, a vocabulary not a multiple of anything, sharp logits.
    cross_entropy_case("linear_cross_entropy_ragged", 2500, 72, 1000, 1024, 1.0);
    cross_entropy_case("linear_cross_entropy_sharp", 777, 64, 50304, 256, 30.0);
    cross_entropy_case("linear_cross_entropy_one_token", 1, 48, 130, 1024, 1.0);
    // Rows too wide for a block's shared memory (the kernel that reads them three times),
    // 16-byte aligned and not.
    cross_entropy_case("linear_cross_entropy_wide_rows", 300, 64, 70000, 128, 1.0);
    cross_entropy_case(
        "linear_cross_entropy_wide_odd_rows",
        129,
        32,
        65537,
        64,
        5.0,
    );
}

/// The row kernel alone (`cuda::cross_entropy::cross_entropy_rows_into`) against f64, every
/// element, outputs poisoned with NaN first: per-row loss within 1e-5 (|lse| + 1) (fp32
/// log-sum-exp), `softmax - onehot` within one bf16 rounding (2^-8 |ref|) plus 1e-30; ignored
/// rows exactly 0, a target past the vocabulary a NaN loss. Shapes: one row, V not a multiple
/// of 4, rows in shared memory and rows too wide for it, sharp logits.
#[test]
fn cross_entropy_rows_kernel_every_element() {
    use sparse_kernels::cuda::cross_entropy::cross_entropy_rows_into;
    let Some((dev, _gpu)) = gpu_or_skip("cross_entropy_rows_kernel_every_element") else {
        return;
    };
    for (rows, v, scale) in [
        (1i64, 7i64, 1.0),
        (6, 50304, 1.0),
        (300, 49152, 3.0),
        (5, 70000, 1.0),
        (4, 65537, 1.0),
        (9, 1001, 30.0),
    ] {
        tch::manual_seed(rows * 131 + v);
        let logits = Tensor::randn([rows, v], (Kind::Float, dev)) * scale;
        let targets = Tensor::randint(v, [rows], (Kind::Int64, dev));
        if rows > 2 {
            let _ = targets.narrow(0, 1, 1).fill_(-100);
            let _ = targets.narrow(0, 2, 1).fill_(v);
        }
        let g = Tensor::full([rows, v], f64::NAN, (Kind::BFloat16, dev));
        let loss = Tensor::full([rows], f64::NAN, (Kind::Float, dev));
        cross_entropy_rows_into(&logits, &targets, Some(&g), &loss).unwrap();

        let l64 = f64_of(&logits);
        let lse = l64.logsumexp([1], true);
        let t_host: Vec<i64> = Vec::try_from(targets.to_device(Device::Cpu)).unwrap();
        let probs = (&l64 - &lse).exp();
        let loss_host: Vec<f32> = Vec::try_from(loss.to_device(Device::Cpu)).unwrap();
        let lse_host: Vec<f64> = Vec::try_from(lse.view([-1]).to_device(Device::Cpu)).unwrap();
        let l64_host = l64.to_device(Device::Cpu);
        let mut worst_loss = 0f64;
        for (r, &t) in t_host.iter().enumerate() {
            let (got, r64) = (loss_host[r] as f64, r as i64);
            if t < 0 {
                assert_eq!(got, 0.0, "V {v}: ignored row {r} has loss {got}");
                let _ = probs.narrow(0, r64, 1).fill_(0.0);
            } else if t >= v {
                assert!(
                    got.is_nan(),
                    "V {v}: row {r} with target {t} has loss {got}"
                );
                let _ = probs.narrow(0, r64, 1).fill_(f64::NAN);
            } else {
                let want = lse_host[r] - l64_host.double_value(&[r64, t]);
                let err = (got - want).abs() / (lse_host[r].abs() + 1.0);
                worst_loss = worst_loss.max(err);
                assert!(err <= 1e-5, "V {v}: row {r} loss {got} vs {want}");
                let _ = probs
                    .narrow(0, r64, 1)
                    .narrow(1, t, 1)
                    .g_sub_(&Tensor::from(1.0));
            }
        }
        // Rows with a NaN reference are skipped by the element check (their loss is NaN,
        // which the step refuses); every other element is within its bound.
        let got = f64_of(&g);
        let valid = probs.isnan().logical_not();
        let err = (&got - &probs).abs();
        let bound = probs.abs() * (1.0 / 256.0) + 1e-30;
        let over = err.gt_tensor(&bound).logical_and(&valid);
        let n_over = over.sum(Kind::Int64).int64_value(&[]);
        let finite = got.isfinite().logical_or(&valid.logical_not()).all();
        let worst = (err.where_self(&valid, &Tensor::from(0.0)) / (probs.abs() + 1e-30))
            .where_self(&valid, &Tensor::from(0.0))
            .max()
            .double_value(&[]);
        println!(
            "  rows {rows}, V {v}: loss err {worst_loss:.2e} (bound 1e-5); grad worst relative {worst:.2e} (bound 3.9e-3)"
        );
        assert!(
            finite.int64_value(&[]) == 1,
            "V {v}: a NaN gradient element survived"
        );
        assert_eq!(
            n_over, 0,
            "V {v}: {n_over} gradient elements past the bound"
        );
    }
}

/// The fused head never holds the batch's logits: at N 8192 x V 49152 its peak extra memory,
/// forward and backward (the [V, D] fp32 weight gradient, one chunk's logits and its bf16
/// `softmax - onehot`, ~0.75 GiB), stays below the size of the fp32 logits `[N, V]` alone
/// (1.5 GiB; the unfused head holds those several times over).
#[test]
fn linear_cross_entropy_never_holds_the_batch_logits() {
    let Some((dev, _gpu)) = gpu_or_skip("linear_cross_entropy_never_holds_the_batch_logits") else {
        return;
    };
    let (n, d, v) = (8192i64, 2048i64, 49152i64);
    let x = bf16_values(&[n, d], 1.0, dev).set_requires_grad(true);
    let master = bf16_values(&[v, d], 0.02, dev).set_requires_grad(true);
    let copy = tch::no_grad(|| master.to_kind(Kind::BFloat16));
    let targets = Tensor::randint(v, [n], (Kind::Int64, dev));
    tch::Cuda::synchronize(0);
    assert!(cuda_runtime::reset_peak(dev));
    let base = cuda_runtime::allocated_bytes(dev).unwrap() as i64;
    let out = linear_cross_entropy(&x, &copy, &master, &targets, 1024).unwrap();
    out.loss_sum.backward();
    tch::Cuda::synchronize(0);
    let peak = cuda_runtime::peak_allocated_bytes(dev).unwrap() as i64 - base;
    let logits = n * v * 4;
    println!(
        "  peak extra {:.3} GiB; fp32 logits would be {:.3} GiB",
        peak as f64 / (1u64 << 30) as f64,
        logits as f64 / (1u64 << 30) as f64
    );
    assert!(peak < logits, "peak extra {peak} bytes vs logits {logits}");
}

#[test]
fn fused_adamw_and_norms_on_cuda_equal_the_formula_in_f64() {
    let Some((dev, _gpu)) = gpu_or_skip("fused_adamw_and_norms_on_cuda_equal_the_formula_in_f64")
    else {
        return;
    };
    tch::manual_seed(3);
    let opts = (Kind::Float, dev);
    // A large tensor (many multi-tensor chunks), an odd one and a scalar-like one.
    let shapes: [&[i64]; 3] = [&[2048, 1031], &[7, 3], &[1]];
    let params: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, opts)).collect();
    let moments: Vec<[Tensor; 2]> = params
        .iter()
        .map(|p| [p.zeros_like(), p.zeros_like()])
        .collect();
    let mut want: Vec<[Tensor; 3]> = params
        .iter()
        .map(|p| [f64_of(p), f64_of(&p.zeros_like()), f64_of(&p.zeros_like())])
        .collect();
    let (b1, b2, eps, wd, lr) = (0.9, 0.95, 1e-8, 0.1, 3e-3);
    for step in 1..=3u64 {
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| Tensor::randn(p.size(), opts))
            .collect();
        let norms = foreach_norm(&grads.iter().collect::<Vec<_>>()).unwrap();
        for (g, nrm) in grads.iter().zip(&norms) {
            let w = f64_of(g)
                .square()
                .sum(Kind::Double)
                .sqrt()
                .double_value(&[]);
            let e = (nrm.double_value(&[]) - w).abs() / w;
            assert!(e <= 1e-5, "norm off by {e:e}");
        }
        let divisor = if step == 2 { 2.5 } else { 1.0 };
        let g64: Vec<Tensor> = grads.iter().map(|g| f64_of(g) / divisor).collect();
        let list: Vec<AdamWTensor> = (0..params.len())
            .map(|i| AdamWTensor {
                param: &params[i],
                grad: &grads[i],
                exp_avg: &moments[i][0],
                exp_avg_sq: &moments[i][1],
            })
            .collect();
        let h = AdamWStep {
            lr,
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
            step,
        };
        let s = Tensor::from_slice(&[divisor as f32]).to_device(dev);
        fused_adamw(&list, &h, Some(&s)).unwrap();
        for (state, g) in want.iter_mut().zip(&g64) {
            adamw_reference_step(state, g, &h);
        }
    }
    for (i, (p, [w, _, _])) in params.iter().zip(&want).enumerate() {
        let err = (f64_of(p) - w).abs().max().double_value(&[]);
        println!("  tensor {i}: max |err| {err:.3e} (bound 1e-5)");
        assert!(err <= 1e-5, "tensor {i}: {err:e}");
    }
}

/// The RoPE kernels into NaN-poisoned outputs, every element against HF's formula in f64:
/// the forward (q and k rotated, v copied, head-major) and the backward (inverse rotation into
/// the qkv rows), then the autograd op against its unfused ATen form. bf16 outputs of fp32
/// arithmetic on bf16 inputs: one rounding, bound 8e-3 of max |ref|.
fn rope_case(name: &str, b: i64, t: i64, nh: i64, nkv: i64, hd: i64, pos0: i64) {
    let Some((dev, _gpu)) = gpu_or_skip(name) else {
        return;
    };
    use sparse_kernels::cuda::rope::{rope_qkv_backward_into, rope_qkv_forward_into, RopeShape};
    use sparse_kernels::fused::rope::rope_qkv;
    println!("{name}: B {b}, T {t}, heads {nh}/{nkv}, hd {hd}, pos0 {pos0}");
    tch::manual_seed(b * 1000 + t + hd);
    let (cos, sin, sin_hf) = rope_tables(pos0 + t + 3, hd, dev);
    let w = (nh + 2 * nkv) * hd;
    let qkv = bf16_values(&[b, t, w], 1.0, dev).to_kind(Kind::BFloat16);
    let s = RopeShape {
        batch: b,
        t_len: t,
        heads: nh,
        kv_heads: nkv,
        head_dim: hd,
        pos0,
    };
    let nan = |shape: &[i64]| Tensor::full(shape, f64::NAN, (Kind::BFloat16, dev));
    // The kernels write token-major [B, T, heads, hd]; compared as [B, heads, T, hd] views.
    let (q, k, v) = (
        nan(&[b, t, nh, hd]),
        nan(&[b, t, nkv, hd]),
        nan(&[b, t, nkv, hd]),
    );
    rope_qkv_forward_into(&qkv, (&cos, &sin), &s, [&q, &k, &v]).unwrap();
    let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
    let x = f64_of(&qkv).view([b, t, nh + 2 * nkv, hd]);
    let (c, sh) = (cos.narrow(0, pos0, t), sin_hf.narrow(0, pos0, t));
    let want_q = hf_rotate(&x.narrow(2, 0, nh), &c, &sh);
    let want_k = hf_rotate(&x.narrow(2, nh, nkv), &c, &sh);
    let want_v = x.narrow(2, nh + nkv, nkv).transpose(1, 2);
    for (label, got, want) in [("q", &q, &want_q), ("k", &k, &want_k), ("v", &v, &want_v)] {
        assert_eq!(
            got.isnan().sum(Kind::Int64).int64_value(&[]),
            0,
            "{label}: unwritten elements"
        );
        check(label, got, want, 8e-3);
    }
    // Backward: the inverse rotation, against autograd through the f64 formula.
    let grad = |n: i64| bf16_values(&[b, t, n, hd], 1.0, dev).to_kind(Kind::BFloat16);
    let (dq_tm, dk_tm, dv_tm) = (grad(nh), grad(nkv), grad(nkv));
    let dqkv = nan(&[b, t, w]);
    rope_qkv_backward_into([&dq_tm, &dk_tm, &dv_tm], (&cos, &sin), &s, &dqkv).unwrap();
    let (dq, dk, dv) = (
        dq_tm.transpose(1, 2),
        dk_tm.transpose(1, 2),
        dv_tm.transpose(1, 2),
    );
    let x64 = f64_of(&qkv).set_requires_grad(true);
    let xv = x64.view([b, t, nh + 2 * nkv, hd]);
    let loss = (hf_rotate(&xv.narrow(2, 0, nh), &c, &sh) * f64_of(&dq)).sum(Kind::Double)
        + (hf_rotate(&xv.narrow(2, nh, nkv), &c, &sh) * f64_of(&dk)).sum(Kind::Double)
        + (xv.narrow(2, nh + nkv, nkv).transpose(1, 2) * f64_of(&dv)).sum(Kind::Double);
    loss.backward();
    assert_eq!(
        dqkv.isnan().sum(Kind::Int64).int64_value(&[]),
        0,
        "dqkv: unwritten elements"
    );
    check("dqkv", &dqkv, &x64.grad(), 8e-3);
    // The autograd op (kernels) against its ATen form on the same bf16 values in f32.
    let leaf = qkv.detach().set_requires_grad(true);
    let [fq, fk, fv] = rope_qkv(&leaf, (&cos, &sin), nh, nkv, pos0).unwrap();
    ((fq.to_kind(Kind::Float) * dq.to_kind(Kind::Float)).sum(Kind::Float)
        + (fk.to_kind(Kind::Float) * dk.to_kind(Kind::Float)).sum(Kind::Float)
        + (fv.to_kind(Kind::Float) * dv.to_kind(Kind::Float)).sum(Kind::Float))
    .backward();
    check("op q", &fq, &want_q, 8e-3);
    check("op dqkv", &leaf.grad(), &x64.grad(), 8e-3);
}

#[test]
fn rope_at_the_trainer_shape() {
    rope_case("rope_at_the_trainer_shape", 4, 2048, 32, 32, 64, 0);
}

#[test]
fn rope_hard_cases() {
    // Grouped heads and an offset; one token; a wide head; an odd token count.
    rope_case("rope_grouped_offset", 3, 37, 8, 2, 64, 5);
    rope_case("rope_one_token", 1, 1, 4, 4, 32, 11);
    rope_case("rope_wide_head", 2, 129, 6, 3, 128, 0);
    rope_case("rope_odd_tokens", 5, 7, 2, 1, 8, 2);
}

/// The residual add + RMSNorm kernels into NaN-poisoned outputs, every element against the
/// formula in f64 on the same values: the residual (fp32 add of a bf16 delta: exact to f32
/// rounding, bound 1e-6), the bf16 normed rows (one rounding, 8e-3), and the backward's fp32
/// gradients of x (and delta, its bf16) and w (1e-4: fp32 sums over D and N terms; delta's
/// 8e-3), then the autograd op with and without the residual branch.
fn norm_case(name: &str, n: i64, d: i64, with_delta: bool, with_residual_grad: bool) {
    let Some((dev, _gpu)) = gpu_or_skip(name) else {
        return;
    };
    use sparse_kernels::cuda::norm::{
        add_rms_norm_backward_into, add_rms_norm_forward_into, norm_blocks,
    };
    use sparse_kernels::fused::norm::add_rms_norm;
    println!("{name}: N {n}, D {d}, delta {with_delta}, residual gradient {with_residual_grad}");
    tch::manual_seed(n + d);
    let x = Tensor::randn([n, d], (Kind::Float, dev)) * 3.0;
    let delta = with_delta.then(|| bf16_values(&[n, d], 1.0, dev).to_kind(Kind::BFloat16));
    let w = Tensor::randn([d], (Kind::Float, dev)) * 0.2 + 1.0;
    let nan = |shape: &[i64], kind| Tensor::full(shape, f64::NAN, (kind, dev));
    let (x_new, y, rstd) = (
        nan(&[n, d], Kind::Float),
        nan(&[n, d], Kind::BFloat16),
        nan(&[n], Kind::Float),
    );
    add_rms_norm_forward_into(&x, delta.as_ref(), &w, 1e-5, [&x_new, &y, &rstd]).unwrap();
    let x64 = f64_of(&x).set_requires_grad(true);
    let d64 = delta.as_ref().map(|t| f64_of(t).set_requires_grad(true));
    let w64 = f64_of(&w).set_requires_grad(true);
    let r = match &d64 {
        Some(t) => &x64 + t,
        None => &x64 * 1.0,
    };
    let want_y = &w64 * &r * (r.square().mean_dim(-1, true, Kind::Double) + 1e-5).rsqrt();
    for (label, t) in [("x_new", &x_new), ("y", &y), ("rstd", &rstd)] {
        assert_eq!(
            t.isnan().sum(Kind::Int64).int64_value(&[]),
            0,
            "{label}: unwritten elements"
        );
    }
    check("residual", &x_new, &r.detach(), 1e-6);
    check("normed", &y, &want_y.detach(), 8e-3);
    // Backward into poisoned buffers.
    let g_y = bf16_values(&[n, d], 1.0, dev).to_kind(Kind::BFloat16);
    let g_res = with_residual_grad.then(|| Tensor::randn([n, d], (Kind::Float, dev)));
    let g_x = nan(&[n, d], Kind::Float);
    let g_delta = with_delta.then(|| nan(&[n, d], Kind::BFloat16));
    let dw_part = nan(&[norm_blocks(n), d], Kind::Float);
    add_rms_norm_backward_into(
        g_res.as_ref(),
        &g_y,
        &x_new,
        &w,
        &rstd,
        &g_x,
        g_delta.as_ref(),
        &dw_part,
    )
    .unwrap();
    let mut loss = (&want_y * f64_of(&g_y)).sum(Kind::Double);
    if let Some(g) = &g_res {
        loss += (&r * f64_of(g)).sum(Kind::Double);
    }
    loss.backward();
    assert_eq!(
        g_x.isnan().sum(Kind::Int64).int64_value(&[]),
        0,
        "g_x: unwritten elements"
    );
    check("dx", &g_x, &x64.grad(), 1e-4);
    if let (Some(gd), Some(d6)) = (&g_delta, &d64) {
        check("ddelta", gd, &d6.grad(), 8e-3);
    }
    check(
        "dw",
        &dw_part.sum_dim_intlist(0, false, Kind::Float),
        &w64.grad(),
        1e-4,
    );
    // The autograd op: residual and normed, their gradients into x, delta and w.
    let xl = x.detach().set_requires_grad(true);
    let dl = delta.as_ref().map(|t| t.detach().set_requires_grad(true));
    let wl = w.detach().set_requires_grad(true);
    let out = add_rms_norm(&xl, dl.as_ref(), &wl, 1e-5, Kind::BFloat16).unwrap();
    let mut l = (out.normed.to_kind(Kind::Float) * g_y.to_kind(Kind::Float)).sum(Kind::Float);
    if let Some(g) = &g_res {
        l += (&out.residual * g).sum(Kind::Float);
    }
    l.backward();
    check("op dx", &xl.grad(), &x64.grad(), 1e-4);
    check("op dw", &wl.grad(), &w64.grad(), 1e-4);
    if let (Some(dl), Some(d6)) = (&dl, &d64) {
        check("op ddelta", &dl.grad(), &d6.grad(), 8e-3);
    }
}

#[test]
fn add_rms_norm_at_the_trainer_shape() {
    norm_case("add_rms_norm_at_the_trainer_shape", 8192, 2048, true, true);
}

#[test]
fn add_rms_norm_hard_cases() {
    // No residual branch (the first layer), no gradient reaching the residual (the final
    // norm), one row, rows not a multiple of a block's, the widest D, the narrowest.
    norm_case("add_rms_norm_no_delta", 300, 768, false, true);
    norm_case("add_rms_norm_no_residual_gradient", 333, 2048, true, false);
    norm_case("add_rms_norm_one_row", 1, 1024, true, true);
    norm_case("add_rms_norm_widest", 37, 8192, true, true);
    norm_case("add_rms_norm_narrowest", 17, 4, true, true);
}
