//! The LM head and its cross-entropy in row chunks (C++ side: `bridge/linear_cross_entropy.cpp`,
//! after Liger's fused linear cross-entropy): per chunk the fp32 logits, their log-sum-exp
//! and loss terms, and (when a gradient is wanted) `softmax - onehot`, from which the input
//! gradient and the weight's fp32 gradient product are taken in the same pass. The logits of
//! the whole batch `[N, V]` never exist: peak extra memory is one chunk's `[chunk, V]` in
//! fp32 and compute dtype, plus the `[V, D]` fp32 weight gradient. On CUDA with bf16 inputs a
//! chunk's log-sum-exp, loss and `softmax - onehot` are one kernel
//! (`crate::cuda::cross_entropy`), which the bridge calls back into Rust for.
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use super::{bridge_call, FusedError};
use crate::cuda::cross_entropy::cross_entropy_rows_into;
use crate::torch::cuda_runtime::grad_mode_enabled;
use crate::torch::{panic_message, write_err};

type RowsKernel = unsafe extern "C" fn(
    logits: *mut C_tensor,
    targets: *mut C_tensor,
    g: *mut C_tensor,
    loss: *mut C_tensor,
    err: *mut c_char,
    err_len: usize,
) -> i32;

extern "C" {
    fn sparse_linear_cross_entropy(
        x: *mut C_tensor,
        w: *mut C_tensor,
        master: *mut C_tensor,
        targets: *mut C_tensor,
        chunk: i64,
        with_grad: i32,
        rows_kernel: Option<RowsKernel>,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// The bridge's per-chunk call on CUDA: [`cross_entropy_rows_into`] over the handles it
/// passes (owned, taken here; `g` null when no gradient is wanted).
///
/// # Safety
/// Every non-null pointer is an owned tensor handle; `err` holds `err_len` bytes.
unsafe extern "C" fn rows_kernel(
    logits: *mut C_tensor,
    targets: *mut C_tensor,
    g: *mut C_tensor,
    loss: *mut C_tensor,
    err: *mut c_char,
    err_len: usize,
) -> i32 {
    let logits = Tensor::from_ptr(logits);
    let targets = Tensor::from_ptr(targets);
    let g = (!g.is_null()).then(|| Tensor::from_ptr(g));
    let loss = Tensor::from_ptr(loss);
    let run = || cross_entropy_rows_into(&logits, &targets, g.as_ref(), &loss);
    let msg = match catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(())) => return 0,
        Ok(Err(e)) => e.to_string(),
        Err(p) => format!("panicked: {}", panic_message(p)),
    };
    write_err(err, err_len, &msg);
    1
}

/// Rows per chunk: `[chunk, V]` fp32 logits of about 256 MiB at a 64k vocabulary.
pub const DEFAULT_CHUNK: i64 = 1024;

/// What [`linear_cross_entropy`] returns.
pub struct CrossEntropySum {
    /// Sum over the kept positions of `-log softmax(x W^T)[target]` (f32 scalar,
    /// differentiable in x and the master).
    pub loss_sum: Tensor,
    /// Positions kept (targets >= 0), int64 scalar.
    pub kept: Tensor,
}

/// Cross-entropy of `x W^T` against `targets` for `x: [..., D]`, `w: [V, D]` (the
/// compute-dtype copy of `master`, or `master` itself) and `targets: [...]` (int64, < 0 to
/// ignore a position), `chunk` rows at a time. The gradient of the master comes back through
/// autograd in the master's dtype.
pub fn linear_cross_entropy(
    x: &Tensor,
    w: &Tensor,
    master: &Tensor,
    targets: &Tensor,
    chunk: i64,
) -> Result<CrossEntropySum, FusedError> {
    let d = *x.size().last().unwrap_or(&0);
    let x2 = x.reshape([-1, d]);
    let t = targets.reshape([-1]);
    if t.kind() != Kind::Int64 {
        return Err(FusedError(format!(
            "linear_cross_entropy: targets must be int64, got {:?}",
            t.kind()
        )));
    }
    if master.size() != w.size() {
        return Err(FusedError(format!(
            "linear_cross_entropy: weight {:?} is not a copy of the master {:?}",
            w.size(),
            master.size()
        )));
    }
    let with_grad = grad_mode_enabled() && (x.requires_grad() || master.requires_grad());
    let ptr = |t: &Tensor| t.as_ptr() as *mut C_tensor;
    let mut out = [std::ptr::null_mut(); 2];
    bridge_call("linear_cross_entropy", |err, len| {
        // SAFETY: live tch handles borrowed by the bridge; on success `out` holds 2 fresh
        // handles, taken over below.
        unsafe {
            sparse_linear_cross_entropy(
                ptr(&x2),
                ptr(w),
                ptr(master),
                ptr(&t),
                chunk,
                with_grad as i32,
                Some(rows_kernel),
                out.as_mut_ptr(),
                err,
                len,
            )
        }
    })?;
    // SAFETY: fresh handles from the bridge.
    let [loss_sum, kept] = out.map(|p| unsafe { Tensor::from_ptr(p) });
    Ok(CrossEntropySum { loss_sum, kept })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Reduction};

    /// Against the unfused head in f64 (logits, log-softmax, NLL, autograd): the summed loss,
    /// the kept count and the gradients of x and the weight, with ignored targets and a last
    /// chunk shorter than the others.
    #[test]
    fn equals_the_unfused_head_in_f64_with_ignored_targets() {
        tch::manual_seed(9);
        let opts = (Kind::Float, Device::Cpu);
        let (n, d, v) = (37, 16, 29);
        let x = Tensor::randn([n, d], opts).set_requires_grad(true);
        let w = (Tensor::randn([v, d], opts) * 0.5).set_requires_grad(true);
        let targets = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
        let _ = targets.narrow(0, 3, 2).fill_(-100);
        let got = linear_cross_entropy(&x, &w, &w, &targets, 8).unwrap();
        assert_eq!(got.kept.int64_value(&[]), n - 2);
        (&got.loss_sum * 0.25).backward();

        let x64 = x.detach().to_kind(Kind::Double).set_requires_grad(true);
        let w64 = w.detach().to_kind(Kind::Double).set_requires_grad(true);
        let want = x64.matmul(&w64.tr()).cross_entropy_loss::<Tensor>(
            &targets,
            None,
            Reduction::Sum,
            -100,
            0.0,
        );
        (&want * 0.25).backward();
        let close = |name: &str, a: &Tensor, b: &Tensor| {
            let err = (a.to_kind(Kind::Double) - b).abs().max().double_value(&[]);
            let scale = b.abs().max().double_value(&[]);
            assert!(
                err <= 1e-5 * scale.max(1.0),
                "{name}: error {err:e} of {scale:e}"
            );
        };
        close("loss", &got.loss_sum, &want);
        close("dx", &x.grad(), &x64.grad());
        close("dw", &w.grad(), &w64.grad());
        // Ignored rows get no gradient at all.
        assert_eq!(x.grad().narrow(0, 3, 2).abs().max().double_value(&[]), 0.0);
    }

    /// Without grad mode it computes the loss alone, and its backward is refused clearly.
    #[test]
    fn no_grad_computes_the_loss_only() {
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([5, 4], opts);
        let w = Tensor::randn([7, 4], opts);
        let t = Tensor::from_slice(&[0i64, 6, 3, 2, 1]);
        let a = tch::no_grad(|| linear_cross_entropy(&x, &w, &w, &t, 2).unwrap());
        let b = x
            .matmul(&w.tr())
            .cross_entropy_loss::<Tensor>(&t, None, Reduction::Sum, -100, 0.0);
        assert!(a.loss_sum.allclose(&b, 1e-5, 1e-5, false));
        assert!(!a.loss_sum.requires_grad());
        let bad = linear_cross_entropy(&x, &w, &w, &t.to_kind(Kind::Int), 2);
        assert!(bad.err().unwrap().0.contains("int64"));
    }
}
