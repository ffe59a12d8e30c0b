//! libtorch extensions tch does not have, and the helpers their C ABI shares.
//!
//! [`hooks`] is the `hooked_identity` autograd node, [`function`] autograd nodes made of Rust
//! closures, [`cuda_graph`] CUDA graphs (capture and replay of a step), [`profiler`] libtorch's
//! profiler (Chrome traces), [`cuda_runtime`] the CUDA runtime facts
//! (peak memory, current stream, autocast, grad mode). The `SparseFfn` autograd function of
//! [`crate::op`] crosses the same boundary: tensors as `torch::Tensor*` (tch's `C_tensor*`),
//! errors as a NUL-terminated message in a buffer of [`ERR_LEN`] bytes.
use std::ffi::{c_char, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

pub mod cuda_graph;
pub mod cuda_runtime;
pub mod function;
pub mod hooks;
pub mod profiler;

/// Bytes of the error buffers the bridges fill (C++: `sparse_bridge::kErrLen`, bridge/ffi_error.h).
pub(crate) const ERR_LEN: usize = 1024;

/// Copies `msg` into the bridge's error buffer `err` of `len` bytes, truncated and
/// NUL-terminated.
///
/// # Safety
/// `err` must point to `len >= 1` writable bytes.
pub(crate) unsafe fn write_err(err: *mut c_char, len: usize, msg: &str) {
    let n = msg.len().min(len - 1);
    std::ptr::copy_nonoverlapping(msg.as_ptr() as *const c_char, err, n);
    *err.add(n) = 0;
}

/// The message a bridge wrote into `err` (NUL-terminated within the buffer).
pub(crate) fn read_err(err: &[c_char; ERR_LEN]) -> String {
    // SAFETY: the bridges NUL-terminate the message within ERR_LEN, and the buffer starts
    // zeroed, so a NUL lies inside it either way.
    unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`), if it has one.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> Option<&str> {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
}

/// The message of a caught panic.
pub fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    panic_text(p.as_ref())
        .unwrap_or("panic without a message")
        .to_string()
}

/// Hands a tensor's handle over to C++ (which frees it).
pub(crate) fn into_raw(mut t: Tensor) -> *mut C_tensor {
    let p = t.as_mut_ptr();
    std::mem::forget(t);
    p
}
