//! Mixed precision without per-micro-batch weight casts (C++ side:
//! `bridge/master_weights.cpp`). The caller makes compute-dtype copies of the fp32 master
//! weights once per optimizer step (Megatron's practice); [`master_linear`] multiplies by a
//! copy and [`cached_weight`] hands one to an op with its own backward, and the gradients
//! land in the masters' `.grad` directly. On CUDA the weight-gradient GEMM accumulates in
//! fp32 into `.grad` itself (cuBLAS beta = 1), so no bf16 gradient, cast or add is left per
//! micro-batch. Neither returns a gradient to autograd for the masters: a master used
//! through these ops and also elsewhere gets both contributions, added in backward order.
use tch::Tensor;
use torch_sys::C_tensor;

use super::{bridge_call, FusedError};

extern "C" {
    fn sparse_master_linear(
        x: *mut C_tensor,
        w: *mut C_tensor,
        masters: *const *mut C_tensor,
        n_masters: usize,
        out: *mut *mut C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> i32;
    fn sparse_add_product(
        g: *mut C_tensor,
        a: *mut C_tensor,
        b: *mut C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> i32;
    fn sparse_cached_weight(
        master: *mut C_tensor,
        cached: *mut C_tensor,
        out: *mut *mut C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> i32;
}

fn ptr(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

/// `x W^T` for `x: [..., in]` (cast to W's dtype) and `w: [out, in]`, a copy of the masters'
/// rows stacked in order (`masters[i]: [out_i, in]`, the out_i summing to out). Backward:
/// the gradient of x in x's dtype, and each master's block of `dy^T x` added to its `.grad`.
pub fn master_linear(x: &Tensor, w: &Tensor, masters: &[&Tensor]) -> Result<Tensor, FusedError> {
    let rows: i64 = masters.iter().map(|m| m.size()[0]).sum();
    let (ws, xs) = (w.size(), x.size());
    if ws.len() != 2 || ws[0] != rows || xs.last() != Some(&ws[1]) {
        return Err(FusedError(format!(
            "master_linear: weight {ws:?} must be [sum of the masters' rows = {rows}, in] for x {xs:?}"
        )));
    }
    let ms: Vec<*mut C_tensor> = masters.iter().map(|m| ptr(m)).collect();
    let mut out = std::ptr::null_mut();
    bridge_call("master_linear", |err, len| {
        // SAFETY: live tch handles, borrowed by the bridge; on success `out` is a fresh handle.
        unsafe { sparse_master_linear(ptr(x), ptr(w), ms.as_ptr(), ms.len(), &mut out, err, len) }
    })?;
    // SAFETY: a fresh handle from the bridge, owned from here on.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `g += a b` in place for `a: [rows, N]`, `b: [N, in]`: on CUDA with a compute-dtype `a`, `b`
/// and an f32 `g`, one GEMM with an f32 output and beta = 1 (no product tensor, no add);
/// elsewhere the product in the operands' dtype, then one add.
pub fn add_product(g: &Tensor, a: &Tensor, b: &Tensor) -> Result<(), FusedError> {
    let (gs, as_, bs) = (g.size(), a.size(), b.size());
    if gs.len() != 2 || as_.len() != 2 || bs.len() != 2 || as_[1] != bs[0] || gs != [as_[0], bs[1]]
    {
        return Err(FusedError(format!(
            "add_product: {gs:?} += {as_:?} x {bs:?} does not fit"
        )));
    }
    bridge_call("add_product", |err, len| {
        // SAFETY: live tch handles, borrowed by the bridge, which writes into g's storage.
        unsafe { sparse_add_product(ptr(g), ptr(a), ptr(b), err, len) }
    })
}

/// `cached` (a copy of `master`, any dtype) as a differentiable stand-in for `master`: the
/// gradient an op returns for it is added into `master`'s `.grad`.
pub fn cached_weight(master: &Tensor, cached: &Tensor) -> Result<Tensor, FusedError> {
    if master.size() != cached.size() {
        return Err(FusedError(format!(
            "cached_weight: copy {:?} of a master {:?}",
            cached.size(),
            master.size()
        )));
    }
    let mut out = std::ptr::null_mut();
    bridge_call("cached_weight", |err, len| {
        // SAFETY: as in `master_linear`.
        unsafe { sparse_cached_weight(ptr(master), ptr(cached), &mut out, err, len) }
    })?;
    // SAFETY: as in `master_linear`.
    Ok(unsafe { Tensor::from_ptr(out) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Two micro-batches through one stacked GEMM equal plain autograd through three
    /// separate products, values and every gradient, f32 on the CPU.
    #[test]
    fn master_linear_equals_separate_products_and_accumulates() {
        tch::manual_seed(5);
        let opts = (Kind::Float, Device::Cpu);
        let masters: Vec<Tensor> = [6, 4, 4]
            .iter()
            .map(|&r| Tensor::randn([r, 10], opts).set_requires_grad(true))
            .collect();
        let refs: Vec<Tensor> = masters
            .iter()
            .map(|m| m.detach().copy().set_requires_grad(true))
            .collect();
        let stacked = tch::no_grad(|| Tensor::cat(&masters, 0));
        let views: Vec<&Tensor> = masters.iter().collect();
        for _ in 0..2 {
            let x = Tensor::randn([3, 5, 10], opts).set_requires_grad(true);
            let x_ref = x.detach().copy().set_requires_grad(true);
            let dy = Tensor::randn([3, 5, 14], opts);
            let y = master_linear(&x, &stacked, &views).unwrap();
            let y_ref = Tensor::cat(
                &refs
                    .iter()
                    .map(|w| x_ref.matmul(&w.tr()))
                    .collect::<Vec<_>>(),
                -1,
            );
            assert!(y.allclose(&y_ref, 1e-6, 1e-6, false));
            (&y * &dy).sum(Kind::Float).backward();
            (&y_ref * &dy).sum(Kind::Float).backward();
            assert!(x.grad().allclose(&x_ref.grad(), 1e-5, 1e-5, false));
        }
        for (m, r) in masters.iter().zip(&refs) {
            assert!(m.grad().allclose(&r.grad(), 1e-5, 1e-5, false));
        }
    }

    /// The gradient an op returns for the cached copy lands in the master, in its dtype.
    #[test]
    fn cached_weight_routes_the_gradient_to_the_master() {
        let master = Tensor::ones([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let cached = tch::no_grad(|| master.to_kind(Kind::Double) * 2.0);
        let x = Tensor::from_slice(&[1.0f64, 2.0, 3.0]);
        for _ in 0..2 {
            let w = cached_weight(&master, &cached).unwrap();
            assert!(w.requires_grad());
            w.matmul(&x).sum(Kind::Double).backward();
        }
        let want = Tensor::from_slice(&[2.0f32, 4.0, 6.0, 2.0, 4.0, 6.0]).view([2, 3]);
        assert_eq!(master.grad().kind(), Kind::Float);
        assert!(master.grad().equal(&want));
        assert!(cached_weight(&master, &Tensor::ones([3, 2], (Kind::Float, Device::Cpu))).is_err());
    }
}
