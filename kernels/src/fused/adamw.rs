//! ATen's multi-tensor AdamW and per-tensor gradient norms (C++ side: `bridge/adamw.cpp`),
//! which tch does not bind. [`fused_adamw`] updates every tensor of a list in one pass over
//! parameter, gradient and moments (one launch per chunk of the list on CUDA), dividing each
//! gradient by `grad_scale` as it reads it: a global clipping factor computed on the device
//! enters the update with no extra pass and no host round trip.
use tch::Tensor;
use torch_sys::C_tensor;

use super::{bridge_call, FusedError};

extern "C" {
    fn sparse_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        step: f64,
        grad_scale: *mut C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> i32;
    fn sparse_foreach_norm(
        tensors: *const *mut C_tensor,
        n: usize,
        out: *mut *mut C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> i32;
}

/// AdamW's hyper-parameters for one update.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The update's number (1 for the first), for the bias corrections.
    pub step: u64,
}

/// One tensor AdamW updates, in place.
pub struct AdamWTensor<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
}

fn ptrs(ts: impl Iterator<Item = *const Tensor>) -> Vec<*mut C_tensor> {
    // SAFETY: the pointers come from live references (see the callers).
    ts.map(|t| unsafe { (*t).as_ptr() as *mut C_tensor })
        .collect()
}

/// One AdamW update (decoupled weight decay, as `torch.optim.AdamW(fused=True)`) of every
/// tensor in `tensors`, in place; each gradient is divided by `grad_scale` (a one-element f32
/// tensor on their device) when given.
pub fn fused_adamw(
    tensors: &[AdamWTensor],
    h: &AdamWStep,
    grad_scale: Option<&Tensor>,
) -> Result<(), FusedError> {
    let p = ptrs(tensors.iter().map(|t| t.param as *const Tensor));
    let g = ptrs(tensors.iter().map(|t| t.grad as *const Tensor));
    let m = ptrs(tensors.iter().map(|t| t.exp_avg as *const Tensor));
    let v = ptrs(tensors.iter().map(|t| t.exp_avg_sq as *const Tensor));
    let scale = grad_scale.map_or(std::ptr::null_mut(), |s| s.as_ptr() as *mut C_tensor);
    bridge_call("fused_adamw", |err, len| {
        // SAFETY: live tch handles borrowed for the call; the bridge updates them in place.
        unsafe {
            sparse_fused_adamw(
                p.as_ptr(),
                g.as_ptr(),
                m.as_ptr(),
                v.as_ptr(),
                tensors.len(),
                h.lr,
                h.beta1,
                h.beta2,
                h.weight_decay,
                h.eps,
                h.step as f64,
                scale,
                err,
                len,
            )
        }
    })
}

/// The L2 norm of each tensor (f32 scalars on their device), in one multi-tensor pass.
pub fn foreach_norm(tensors: &[&Tensor]) -> Result<Vec<Tensor>, FusedError> {
    if tensors.is_empty() {
        return Ok(Vec::new());
    }
    let ts = ptrs(tensors.iter().map(|t| *t as *const Tensor));
    let mut out = vec![std::ptr::null_mut(); tensors.len()];
    bridge_call("foreach_norm", |err, len| {
        // SAFETY: live handles borrowed for the call; on success `out` holds one fresh handle
        // per tensor, taken over below.
        unsafe { sparse_foreach_norm(ts.as_ptr(), ts.len(), out.as_mut_ptr(), err, len) }
    })?;
    // SAFETY: fresh handles from the bridge.
    Ok(out
        .into_iter()
        .map(|p| unsafe { Tensor::from_ptr(p) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::adamw_reference_step;
    use tch::{Device, Kind};

    /// Three updates of two tensors against AdamW written out in f64, one of them with a
    /// gradient scale of 4 (a clipping factor of 1/4).
    #[test]
    fn fused_adamw_equals_the_formula_in_f64() {
        tch::manual_seed(2);
        let opts = (Kind::Float, Device::Cpu);
        let params = [Tensor::randn([7, 3], opts), Tensor::randn([5], opts)];
        let mut want: Vec<[Tensor; 3]> = params
            .iter()
            .map(|p| {
                [
                    p.to_kind(Kind::Double),
                    p.zeros_like().to_kind(Kind::Double),
                    p.zeros_like().to_kind(Kind::Double),
                ]
            })
            .collect();
        let moments: Vec<[Tensor; 2]> = params
            .iter()
            .map(|p| [p.zeros_like(), p.zeros_like()])
            .collect();
        let (b1, b2, eps, wd, lr) = (0.9, 0.95, 1e-8, 0.1, 1e-2);
        for step in 1..=3u64 {
            let grads: Vec<Tensor> = params
                .iter()
                .map(|p| Tensor::randn(p.size(), opts))
                .collect();
            let scale = if step == 2 { 4.0 } else { 1.0 };
            // Read before the update, which leaves the divided gradients in place.
            let g64: Vec<Tensor> = grads
                .iter()
                .map(|g| g.to_kind(Kind::Double) / scale)
                .collect();
            let list: Vec<AdamWTensor> = (0..2)
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
            let s = Tensor::from_slice(&[scale as f32]);
            fused_adamw(&list, &h, Some(&s)).unwrap();
            for (state, g) in want.iter_mut().zip(&g64) {
                adamw_reference_step(state, g, &h);
            }
        }
        for (p, [w, _, _]) in params.iter().zip(&want) {
            let err = (p.to_kind(Kind::Double) - w).abs().max().double_value(&[]);
            assert!(err < 1e-6, "parameter off by {err:e}");
        }
    }

    #[test]
    fn foreach_norm_is_each_l2_norm() {
        let a = Tensor::from_slice(&[3.0f32, 4.0]);
        let b = Tensor::from_slice(&[1.0f32, 2.0, 2.0]).view([3, 1]);
        let n = foreach_norm(&[&a, &b]).unwrap();
        assert_eq!(n[0].double_value(&[]), 5.0);
        assert_eq!(n[1].double_value(&[]), 3.0);
        assert!(foreach_norm(&[]).unwrap().is_empty());
    }
}
