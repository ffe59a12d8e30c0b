//! The dense FFN's gating kernels (`sparse_kernels::cuda::gating`) and the dense training arm
//! built on them (`FfnPath::Dense` with a gradient on CUDA) against references in f64, every
//! element. GPU only: without CUDA the tests skip with a printed reason, or fail under
//! `SPARSE_TRAIN_REQUIRE_GPU=1`.
//!
//! Error bounds:
//! - the kernels, from the same bf16 `g, u, dh` the reference reads: `h` is `relu(g) u` rounded
//!   once, so it must equal the f32 product rounded to bf16 bit for bit; the counts are exact;
//!   `l1_row` sums exact bf16 values in f32: relative 1e-5; `dg, du` are one fp32 expression
//!   rounded once: each element within 2^-8 of its magnitude (+ 1e-30).
//! - the whole arm against the unfused bf16 tch path it replaces (same inputs, the same
//!   cuBLAS pre-activations): max |err| / max |ref| <= 4 x 2^-8 = 1.6e-2 for y and every
//!   gradient, the counts equal; against f64 from the bf16 inputs no worse than the unfused
//!   path plus that bound (see `arm_case` for why f64 alone takes no fixed bound); the L1
//!   sum relative 2e-2; counts against the f64 pre-activations within the flips near 0.
//!
//! Outputs are poisoned (NaN, or 0xFF bytes for the counts) before the kernels write them.
mod common;

use common::{assert_counts_close, gpu_or_skip, run_with_grads};
use sparse_kernels::cuda::gating::{forward_blocks, gating_backward_into, gating_forward_into};
use sparse_kernels::testing::{imposed_sparsity_layer_with_full_rows, relative_error};
use sparse_kernels::{dense_ffn, try_sparse_ffn, FfnOutput, FfnPath, SparseFfnConfig};
use tch::{Device, Kind, Tensor};

fn bf16_randn(shape: &[i64], scale: f64, dev: Device) -> Tensor {
    (Tensor::randn(shape, (Kind::Float, dev)) * scale).to_kind(Kind::BFloat16)
}

fn nan_bf16(shape: &[i64], dev: Device) -> Tensor {
    Tensor::full(shape, f64::NAN, (Kind::BFloat16, dev))
}

/// The kernels alone on `g, u: [n, h]` with exact zeros and ties planted.
fn kernel_case(name: &str, n: i64, h: i64) {
    let Some((dev, _gpu)) = gpu_or_skip(name) else {
        return;
    };
    println!("{name}: N {n}, H {h}");
    tch::manual_seed(n * 7 + h);
    let g = bf16_randn(&[n, h], 1.0, dev) - 0.8;
    let u = bf16_randn(&[n, h], 1.0, dev);
    let g = g.to_kind(Kind::BFloat16);
    // Hard cases: exact zeros in g (relu's kink) and in u (h = 0 with g > 0), one row active
    // everywhere, one row silent everywhere.
    let _ = g.narrow(1, 0, 8.min(h)).fill_(0.0);
    let _ = u.narrow(1, h - 8, 8).fill_(0.0);
    let _ = g.narrow(0, 0, 1).fill_(1.5);
    if n > 1 {
        let _ = g.narrow(0, n - 1, 1).fill_(-1.0);
    }
    let blocks = forward_blocks(n);
    let out = nan_bf16(&[n, h], dev);
    let l1_row = Tensor::full([n], f64::NAN, (Kind::Float, dev));
    let row_cnt = Tensor::full([n], -1, (Kind::Int, dev));
    let blk_cnt = Tensor::full([blocks, h], 255, (Kind::Uint8, dev));
    gating_forward_into(&g, &u, [&out, &l1_row, &row_cnt, &blk_cnt]).unwrap();

    let (gf, uf) = (g.to_kind(Kind::Float), u.to_kind(Kind::Float));
    let want_h = (gf.relu() * &uf).to_kind(Kind::BFloat16);
    assert!(out.equal(&want_h), "{name}: h differs from bf16(relu(g) u)");
    let active = want_h.ne(0.0);
    let want_rows = active.sum_dim_intlist(-1, false, Kind::Int64);
    assert!(
        row_cnt.to_kind(Kind::Int64).equal(&want_rows),
        "{name}: row counts"
    );
    let want_units = active.sum_dim_intlist(0, false, Kind::Int64);
    let got_units = blk_cnt.sum_dim_intlist(0, false, Kind::Int64);
    assert!(got_units.equal(&want_units), "{name}: unit counts");
    let want_l1 = want_h
        .to_kind(Kind::Double)
        .abs()
        .sum_dim_intlist(-1, false, Kind::Double);
    let e = relative_error(&l1_row.to_kind(Kind::Double), &want_l1);
    println!(
        "  l1_row: {e:.2e} (bound 1e-5); active {}",
        active.sum(Kind::Int64).int64_value(&[])
    );
    assert!(e <= 1e-5, "{name}: l1_row {e:e}");

    let dh = bf16_randn(&[n, h], 0.1, dev);
    let lam = 0.37f64;
    let dl1 = Tensor::from_slice(&[lam as f32]).to_device(dev);
    let (dg, du, hv) = (
        nan_bf16(&[n, h], dev),
        nan_bf16(&[n, h], dev),
        nan_bf16(&[n, h], dev),
    );
    gating_backward_into(&g, &u, &dh, &dl1, [&dg, &du, &hv]).unwrap();
    assert!(
        hv.equal(&want_h),
        "{name}: the backward's h differs from the forward's"
    );
    let (g64, u64_, h64) = (
        g.to_kind(Kind::Double),
        u.to_kind(Kind::Double),
        want_h.to_kind(Kind::Double),
    );
    let e_in = dh.to_kind(Kind::Double) + h64.sign() * lam;
    let want_dg = &e_in * &u64_ * g64.gt(0.0).to_kind(Kind::Double);
    let want_du = &e_in * g64.relu();
    for (label, got, want) in [("dg", &dg, &want_dg), ("du", &du, &want_du)] {
        let err = (got.to_kind(Kind::Double) - want).abs();
        let bound = want.abs() * 2f64.powi(-8) + 1e-30;
        let over = err.gt_tensor(&bound).sum(Kind::Int64).int64_value(&[]);
        let nan = got.isnan().sum(Kind::Int64).int64_value(&[]);
        println!("  {label}: elements over one bf16 rounding {over}, NaN {nan}");
        assert!(
            over == 0 && nan == 0,
            "{name}: {label} {over} elements over the bound, {nan} NaN"
        );
    }
}

#[test]
fn gating_kernels_every_element() {
    kernel_case("gating_trainer_1p5b", 8192, 5632);
    kernel_case("gating_trainer_125m", 4096, 2048);
    kernel_case("gating_one_token", 1, 64);
    kernel_case("gating_rows_not_a_multiple_of_the_block", 37, 24);
    kernel_case("gating_wide_rows", 19, 16384);
}

/// The dense training arm (gating kernels between cuBLAS products) on the anchors' layer at
/// `sparsity`: against the unfused bf16 path it replaces (`dense_ffn`, tch ops on the same
/// bf16 inputs: the same cuBLAS pre-activations, so the same side of relu's kink) within a
/// few bf16 roundings, and against the f64 FFN no worse than that unfused path (beyond the
/// same roundings). The f64 comparison alone cannot take a fixed bound: where a computed
/// `g` lands on the other side of 0 than the exact one (a few elements in millions), that
/// token's whole `dg` term flips, for any bf16 or f32 computation of `g`.
fn arm_case(name: &str, n: i64, d: i64, h: i64, sparsity: f64, full_rows: i64) {
    let Some((dev, _gpu)) = gpu_or_skip(name) else {
        return;
    };
    println!("{name}: N {n}, D {d}, H {h}, sparsity {sparsity}, full rows {full_rows}");
    tch::manual_seed(n + d + h);
    let layer = imposed_sparsity_layer_with_full_rows(n, d, h, sparsity, full_rows, dev).unwrap();
    let inputs = [&layer.x, &layer.wg, &layer.wu, &layer.wd].map(|t| t.to_kind(Kind::BFloat16));
    let r = Tensor::randn([n, d], (Kind::Float, dev)).to_kind(Kind::BFloat16);
    let lam = 0.05;
    let config = SparseFfnConfig::default();
    let loss = |o: &FfnOutput| (&o.y * &r).sum(Kind::Float) + &o.l1_sum * lam;
    let (out, grads) = run_with_grads(
        &inputs,
        |x, w| try_sparse_ffn(x, w, FfnPath::Dense, &config).unwrap(),
        loss,
    );
    let (unfused, unfused_grads) = run_with_grads(&inputs, dense_ffn, loss);
    // f64 reference through tch autograd on the same values.
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_kind(Kind::Double).set_requires_grad(true))
        .collect();
    let g = leaves[0].mm(&leaves[1].tr());
    let u = leaves[0].mm(&leaves[2].tr());
    let hh = g.relu() * &u;
    let y = hh.mm(&leaves[3]);
    let l1 = hh.abs().sum(Kind::Double);
    ((&y * r.to_kind(Kind::Double)).sum(Kind::Double) + &l1 * lam).backward();
    let bound = 4.0 * 2f64.powi(-8);
    let exact: Vec<Tensor> = std::iter::once(y.detach())
        .chain(leaves.iter().map(|l| l.grad()))
        .collect();
    let ours: Vec<&Tensor> = std::iter::once(&out.y).chain(&grads).collect();
    let theirs: Vec<&Tensor> = std::iter::once(&unfused.y).chain(&unfused_grads).collect();
    for (i, label) in ["y", "dx", "dWg", "dWu", "dWd^T"].iter().enumerate() {
        let vs_unfused = relative_error(&ours[i].to_kind(Kind::Double), theirs[i]);
        let e = relative_error(&ours[i].to_kind(Kind::Double), &exact[i]);
        let e_unfused = relative_error(&theirs[i].to_kind(Kind::Double), &exact[i]);
        println!(
            "  {label}: vs unfused {vs_unfused:.2e} (bound {bound:.1e}); vs f64 {e:.2e}, the unfused path's {e_unfused:.2e}"
        );
        assert!(
            vs_unfused <= bound,
            "{name}: {label} vs unfused {vs_unfused:e}"
        );
        assert!(
            e <= e_unfused + bound,
            "{name}: {label} vs f64 {e:e}, unfused {e_unfused:e}"
        );
    }
    let l1_got = out.l1_sum.double_value(&[]);
    let l1_want = l1.double_value(&[]);
    println!("  l1: {l1_got} vs {l1_want}");
    assert!(
        (l1_got - l1_want).abs() <= 2e-2 * l1_want.abs(),
        "{name}: l1 {l1_got} vs {l1_want}"
    );
    let active = hh.detach().ne(0.0);
    let total = active.sum(Kind::Int64).int64_value(&[]);
    assert_counts_close(
        "per token",
        &out.active_per_token,
        &active.sum_dim_intlist(-1, false, Kind::Int64),
        total,
    );
    assert_counts_close(
        "per unit",
        &out.active_per_unit,
        &active.sum_dim_intlist(0, false, Kind::Int64),
        total,
    );
    // The unfused path's counts exactly: the same pre-activations.
    assert!(
        out.active_per_token.equal(&unfused.active_per_token)
            && out.active_per_unit.equal(&unfused.active_per_unit),
        "{name}: counts differ from the unfused path's"
    );
}

#[test]
fn dense_training_arm_equals_the_f64_ffn() {
    arm_case("dense_arm_1p5b_init", 4096, 2048, 5632, 0.5, 0);
    arm_case("dense_arm_99p5", 4096, 2048, 5632, 0.995, 3);
    arm_case("dense_arm_125m", 2048, 768, 2048, 0.9, 0);
    arm_case("dense_arm_one_token", 1, 64, 128, 0.5, 0);
    arm_case("dense_arm_odd", 777, 200, 328, 0.99, 2);
}
