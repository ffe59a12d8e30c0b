//! The residual add fused with RMSNorm: [`add_rms_norm`] returns the new fp32 residual
//! `x + delta` and its RMSNorm in the dtype of the next matrix product, in one kernel pass
//! forward and one backward on CUDA (`kernels/cuda/norm.cu`). Unfused that is an add, ATen's
//! fused RMSNorm, a cast, and in the backward a cast, the norm's backward, the add of the two
//! residual gradients and the cast of delta's gradient: about 2.5x the memory traffic.
//! Elsewhere (CPU, f32 out) the same function from ATen ops.
use tch::{Device, Kind, Tensor};

use super::FusedError;
use crate::cuda::norm::{
    add_rms_norm_backward_into, add_rms_norm_forward_into, norm_blocks, norm_supports,
};
use crate::torch::function::{apply_function, BackwardFn};

/// What [`add_rms_norm`] returns.
pub struct Normed {
    /// The residual stream after the add, `x + delta` (x's shape, f32).
    pub residual: Tensor,
    /// `w * residual / rms(residual)` in the requested dtype.
    pub normed: Tensor,
}

/// `residual = x + delta` (x alone when `delta` is `None`) and its RMSNorm with weight `w`,
/// `eps`, in dtype `out` (HF's formula, fp32 arithmetic, one rounding to `out`), for
/// `x: [..., D]` f32, `delta` of x's shape. Differentiable in x, delta and w.
pub fn add_rms_norm(
    x: &Tensor,
    delta: Option<&Tensor>,
    w: &Tensor,
    eps: f64,
    out: Kind,
) -> Result<Normed, FusedError> {
    let size = x.size();
    let d = *size.last().unwrap_or(&0);
    if w.size() != [d] || delta.is_some_and(|t| t.size() != size) {
        return Err(FusedError(format!(
            "add_rms_norm: x {size:?}, delta {:?} and w {:?} must agree",
            delta.map(|t| t.size()),
            w.size()
        )));
    }
    let fused_ok = matches!(x.device(), Device::Cuda(_))
        && x.kind() == Kind::Float
        && w.kind() == Kind::Float
        && out == Kind::BFloat16
        && delta.is_none_or(|t| t.kind() == Kind::BFloat16)
        && norm_supports(d);
    if !fused_ok {
        let residual = match delta {
            Some(t) => x + t,
            None => x.shallow_clone(),
        };
        let normed = residual.rms_norm([d], Some(w), eps).to_kind(out);
        return Ok(Normed { residual, normed });
    }
    let x2 = x.reshape([-1, d]);
    let delta2 = delta.map(|t| t.reshape([-1, d]));
    let mut inputs = vec![&x2];
    if let Some(t) = &delta2 {
        inputs.push(t);
    }
    inputs.push(w);
    let has_delta = delta.is_some();
    let forward = |t: &[Tensor]| -> Result<(Vec<Tensor>, BackwardFn), String> {
        let x = t[0].contiguous();
        let delta = has_delta.then(|| t[1].contiguous());
        let w = t[t.len() - 1].detach().contiguous();
        let (n, dev) = (x.size()[0], x.device());
        let x_new = Tensor::empty([n, d], (Kind::Float, dev));
        let y = Tensor::empty([n, d], (Kind::BFloat16, dev));
        let rstd = Tensor::empty([n], (Kind::Float, dev));
        add_rms_norm_forward_into(&x, delta.as_ref(), &w, eps, [&x_new, &y, &rstd])
            .map_err(|e| e.to_string())?;
        // A detached alias: the backward keeps the output's values without holding the output
        // itself (whose gradient edge points back at this node).
        let saved = x_new.detach();
        let backward: BackwardFn = Box::new(move |g: &[Option<Tensor>]| {
            let g_x_new = g[0].as_ref().map(|t| t.to_kind(Kind::Float).contiguous());
            let g_y = match &g[1] {
                Some(t) => t.to_kind(Kind::BFloat16).contiguous(),
                None => Tensor::zeros([n, d], (Kind::BFloat16, dev)),
            };
            let g_x = Tensor::empty([n, d], (Kind::Float, dev));
            let g_delta = has_delta.then(|| Tensor::empty([n, d], (Kind::BFloat16, dev)));
            let dw_part = Tensor::empty([norm_blocks(n), d], (Kind::Float, dev));
            add_rms_norm_backward_into(
                g_x_new.as_ref(),
                &g_y,
                &saved,
                &w,
                &rstd,
                &g_x,
                g_delta.as_ref(),
                &dw_part,
            )
            .map_err(|e| e.to_string())?;
            let dw = dw_part.sum_dim_intlist(0, false, Kind::Float);
            let mut grads = vec![Some(g_x)];
            if has_delta {
                grads.push(g_delta);
            }
            grads.push(Some(dw));
            Ok(grads)
        });
        Ok((vec![x_new, y], backward))
    };
    let out = apply_function(&inputs, 2, &forward)
        .map_err(|e| FusedError(format!("add_rms_norm: {e}")))?;
    Ok(Normed {
        residual: out[0].view(size.as_slice()),
        normed: out[1].view(size.as_slice()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU form against HF's formula in f64, values and the gradients of x, delta and w.
    #[test]
    fn unfused_equals_the_formula_in_f64() {
        tch::manual_seed(6);
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([3, 4, 16], opts).set_requires_grad(true);
        let delta = Tensor::randn([3, 4, 16], opts).set_requires_grad(true);
        let w = (Tensor::randn([16], opts) + 1.0).set_requires_grad(true);
        let got = add_rms_norm(&x, Some(&delta), &w, 1e-5, Kind::Float).unwrap();
        let (gr, gn) = (
            Tensor::randn([3, 4, 16], opts),
            Tensor::randn([3, 4, 16], opts),
        );
        ((&got.residual * &gr).sum(Kind::Float) + (&got.normed * &gn).sum(Kind::Float)).backward();
        let f = |t: &Tensor| t.detach().to_kind(Kind::Double).set_requires_grad(true);
        let (x6, d6, w6) = (f(&x), f(&delta), f(&w));
        let r = &x6 + &d6;
        let n = &w6 * &r * (r.square().mean_dim(-1, true, Kind::Double) + 1e-5).rsqrt();
        ((&r * gr.to_kind(Kind::Double)).sum(Kind::Double)
            + (&n * gn.to_kind(Kind::Double)).sum(Kind::Double))
        .backward();
        for (name, a, b) in [
            ("residual", got.residual.shallow_clone(), r.detach()),
            ("normed", got.normed.shallow_clone(), n.detach()),
            ("dx", x.grad(), x6.grad()),
            ("ddelta", delta.grad(), d6.grad()),
            ("dw", w.grad(), w6.grad()),
        ] {
            let err = (a.to_kind(Kind::Double) - &b).abs().max().double_value(&[]);
            assert!(err < 1e-4, "{name}: {err:e}");
        }
        assert!(add_rms_norm(&x, None, &Tensor::ones([15], opts), 1e-5, Kind::Float).is_err());
    }
}
