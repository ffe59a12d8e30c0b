//! Fused ops outside the FFN, for the training step and the decode step (our kernels, or
//! ATen kernels tch does not bind reached through the C++ bridge, and autograd functions
//! built from them):
//! - [`master_weights`]: matrix products and ops over compute-dtype weight copies made once
//!   per optimizer step, whose gradients accumulate straight into the fp32 master weights
//!   (inside the GEMM on CUDA), with one GEMM for several weights that read the same input.
//! - [`linear_cross_entropy`]: the LM head and its cross-entropy in row chunks, never holding
//!   the logits of the whole batch.
//! - [`rope`]: rotary embeddings fused with the head split of the stacked q/k/v GEMM (and,
//!   decoding, with the KV-cache write).
//! - [`attention`]: decode attention over the KV cache up to a position held on the device.
//! - [`linear`]: `x W^T` for inference, a decode step's few rows through the decode kernel.
//! - [`norm`]: the residual add fused with RMSNorm.
//! - [`adamw`]: ATen's multi-tensor AdamW and gradient norms.
use std::ffi::c_char;

use crate::torch::{read_err, ERR_LEN};

pub mod adamw;
pub mod attention;
pub mod linear;
pub mod linear_cross_entropy;
pub mod master_weights;
pub mod norm;
pub mod rope;

/// A fused op refused its inputs or failed inside libtorch; the message says which and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FusedError(pub String);

impl std::fmt::Display for FusedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FusedError {}

/// Runs one bridge entry point with a fresh error buffer: `Ok` on return code 0, its message
/// otherwise.
fn bridge_call(op: &str, f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<(), FusedError> {
    let mut err = [0 as c_char; ERR_LEN];
    match f(err.as_mut_ptr(), ERR_LEN) {
        0 => Ok(()),
        _ => Err(FusedError(format!("{op}: {}", read_err(&err)))),
    }
}
