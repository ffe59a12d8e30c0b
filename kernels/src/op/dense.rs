//! The dense arms: the oracle every path is checked against ([`dense_ffn`], tch ops and tch
//! autograd), its lean inference form, and the same function written as an explicit forward
//! and backward in f32 (the fallback `SparseFfn` runs where no kernel takes the call).
use tch::{Kind, Tensor};

use super::Inputs;
use crate::types::{FfnOutput, FfnWeights};

/// The dense oracle: tch ops, tch autograd.
pub fn dense_ffn(x: &Tensor, w: &FfnWeights) -> FfnOutput {
    let g = x.matmul(&w.gate.tr());
    let u = x.matmul(&w.up.tr());
    let h = g.relu() * u;
    let y = h.matmul(w.down_t);
    let l1_sum = h.abs().sum(Kind::Float);
    let (active_per_token, active_per_unit) = tch::no_grad(|| active_counts(&h));
    let overflow_rows = Tensor::zeros([2], (Kind::Int64, x.device()));
    FfnOutput {
        y,
        l1_sum,
        active_per_token,
        active_per_unit,
        overflow_rows,
    }
}

/// Active units per token and tokens per unit of `h: [N, H]` (int64). In a half-precision
/// dtype the indicator stays in that dtype (`|sign(h)|`, exact 0 and 1) and is summed in f32
/// inside the reduction (exact below 2^24), instead of counting a bool tensor, which ATen
/// first widens to an int64 copy of `[N, H]` for each sum.
fn active_counts(h: &Tensor) -> (Tensor, Tensor) {
    if matches!(h.kind(), Kind::BFloat16 | Kind::Half) {
        let active = h.sign().abs_();
        let count = |dim: i64| {
            active
                .sum_dim_intlist(dim, false, Kind::Float)
                .to_kind(Kind::Int64)
        };
        return (count(-1), count(0));
    }
    let active = h.ne(0.0);
    (
        active.sum_dim_intlist(-1, false, Kind::Int64),
        active.sum_dim_intlist(0, false, Kind::Int64),
    )
}

/// The dense FFN without statistics or L1 (inference; see
/// [`crate::SparseFfnConfig::statistics`]): three matrix products and the gating,
/// `l1_sum` NaN (a CPU scalar: no device work for a value nobody reads), empty counts.
pub fn dense_ffn_inference(x: &Tensor, w: &FfnWeights) -> FfnOutput {
    let h = x.matmul(&w.gate.tr()).relu_() * x.matmul(&w.up.tr());
    let empty = || Tensor::zeros([0], (Kind::Int64, x.device()));
    FfnOutput {
        y: h.matmul(w.down_t),
        l1_sum: Tensor::from(f32::NAN),
        active_per_token: empty(),
        active_per_unit: empty(),
        overflow_rows: empty(),
    }
}

/// The inputs in f32 and the two pre-activations, recomputed by the forward and the
/// backward (the fallback saves nothing but the inputs).
struct Recomputed {
    x: Tensor,
    gate: Tensor,
    up: Tensor,
    down_t: Tensor,
    g: Tensor,
    u: Tensor,
}

fn recompute(t: &Inputs) -> Recomputed {
    let f = |t: &Tensor| t.to_kind(Kind::Float);
    let (x, gate, up, down_t) = (f(t.x), f(t.gate), f(t.up), f(t.down_t));
    let g = x.matmul(&gate.tr());
    let u = x.matmul(&up.tr());
    Recomputed {
        x,
        gate,
        up,
        down_t,
        g,
        u,
    }
}

/// The fallback's forward: `[y, l1_sum, active_per_token, active_per_unit, overflow_rows]`,
/// `y` in x's dtype.
pub(super) fn forward(t: &Inputs) -> [Tensor; 5] {
    let r = recompute(t);
    let h = r.g.relu() * &r.u;
    let y = h.matmul(&r.down_t).to_kind(t.x.kind());
    let active = h.ne(0.0);
    [
        y,
        h.abs().sum(Kind::Float),
        active.sum_dim_intlist(-1, false, Kind::Int64),
        active.sum_dim_intlist(0, false, Kind::Int64),
        Tensor::zeros([2], (Kind::Int64, t.x.device())),
    ]
}

/// The fallback's backward: `[dx, dWg, dWu, dWd^T]` in their inputs' dtypes.
pub(super) fn backward(t: &Inputs, dy: &Tensor, dl1: &Tensor) -> [Tensor; 4] {
    let r = recompute(t);
    let dy = dy.to_kind(Kind::Float);
    let p = r.g.relu();
    let h = &p * &r.u;
    let dh = dy.matmul(&r.down_t.tr()) + h.sign() * dl1.to_kind(Kind::Float);
    let du = &dh * &p;
    let dg = dh * &r.u * r.g.gt(0.0);
    [
        (du.matmul(&r.up) + dg.matmul(&r.gate)).to_kind(t.x.kind()),
        dg.tr().matmul(&r.x).to_kind(t.gate.kind()),
        du.tr().matmul(&r.x).to_kind(t.up.kind()),
        h.tr().matmul(&dy).to_kind(t.down_t.kind()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The half-precision count path equals counting `h != 0`, with exact zeros, negatives
    /// and a row with every unit active.
    #[test]
    fn half_precision_counts_equal_the_bool_counts() {
        let _rng = crate::testing::lock_tch_rng();
        tch::manual_seed(4);
        let h = Tensor::randn([300, 70], (Kind::Float, Device::Cpu)).relu()
            * Tensor::randn([300, 70], (Kind::Float, Device::Cpu));
        let _ = h.narrow(0, 7, 1).fill_(-2.5);
        let (pt, pu) = active_counts(&h.to_kind(Kind::BFloat16));
        let (wt, wu) = active_counts(&h);
        assert!(pt.equal(&wt) && pu.equal(&wu));
        assert_eq!(pt.kind(), Kind::Int64);
        assert_eq!(pt.int64_value(&[7]), 70);
    }

    /// The fallback's explicit forward and backward match tch autograd through the oracle.
    #[test]
    fn dense_fallback_matches_oracle_gradients() {
        let _rng = crate::testing::lock_tch_rng();
        tch::manual_seed(11);
        let (n, d, h) = (37, 24, 70);
        let opts = (Kind::Float, Device::Cpu);
        let x = (Tensor::randn([n, d], opts) - 0.2).set_requires_grad(true);
        let ws: Vec<Tensor> = (0..3)
            .map(|_| (Tensor::randn([h, d], opts) * 0.3).set_requires_grad(true))
            .collect();
        let w = FfnWeights::new(&ws[0], &ws[1], &ws[2]);
        let out = dense_ffn(&x, &w);
        let r = Tensor::randn([n, d], opts);
        let dl1 = 0.37;
        ((&out.y * &r).sum(Kind::Float) + &out.l1_sum * dl1).backward();

        let t = Inputs {
            x: &x,
            gate: &ws[0],
            up: &ws[1],
            down_t: &ws[2],
        };
        let [y, l1, apt, apu, _] = tch::no_grad(|| forward(&t));
        let grads = tch::no_grad(|| backward(&t, &r, &Tensor::from(dl1 as f32)));
        assert!(y.allclose(&out.y, 1e-5, 1e-5, false));
        assert!(l1.allclose(&out.l1_sum, 1e-5, 1e-5, false));
        assert!(apt.equal(&out.active_per_token) && apu.equal(&out.active_per_unit));
        for (got, want) in grads.iter().zip([&x, &ws[0], &ws[1], &ws[2]]) {
            assert!(got.allclose(&want.grad(), 1e-4, 1e-4, false));
        }
    }
}
