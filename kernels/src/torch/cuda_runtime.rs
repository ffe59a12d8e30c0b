//! CUDA facts tch does not expose (C++ side: `bridge/cuda_runtime.cpp`): the caching
//! allocator's peak memory and the device's current stream.
use tch::Device;

extern "C" {
    fn sparse_cuda_peak_allocated_bytes(device: i32) -> i64;
    fn sparse_cuda_peak_reserved_bytes(device: i32) -> i64;
    fn sparse_cuda_allocated_bytes(device: i32) -> i64;
    fn sparse_cuda_reset_peak(device: i32) -> i32;
    fn sparse_cuda_empty_cache() -> i32;
    fn sparse_cuda_current_stream(device: i32) -> *mut std::ffi::c_void;
    fn sparse_cuda_autocast_dtype() -> i32;
    fn sparse_grad_mode_enabled() -> i32;
}

/// Whether autograd records operations on this thread (false inside `tch::no_grad`).
pub fn grad_mode_enabled() -> bool {
    // SAFETY: reads libtorch's thread-local grad mode; cannot throw.
    unsafe { sparse_grad_mode_enabled() != 0 }
}

fn cuda_index(device: Device) -> Option<i32> {
    match device {
        Device::Cuda(i) if tch::Cuda::is_available() => Some(i as i32),
        _ => None,
    }
}

/// Peak bytes held by live tensors on `device` since the last reset (`None` off CUDA, or
/// when the allocator has no statistics yet: CUDA not initialised in this process).
pub fn peak_allocated_bytes(device: Device) -> Option<u64> {
    // SAFETY: the C++ side catches every exception (bad index, allocator not initialised).
    let v = cuda_index(device).map(|d| unsafe { sparse_cuda_peak_allocated_bytes(d) })?;
    u64::try_from(v).ok()
}

/// Bytes held by live tensors on `device` now (`None` as for [`peak_allocated_bytes`]).
pub fn allocated_bytes(device: Device) -> Option<u64> {
    // SAFETY: as above.
    let v = cuda_index(device).map(|d| unsafe { sparse_cuda_allocated_bytes(d) })?;
    u64::try_from(v).ok()
}

/// Peak bytes reserved by the caching allocator on `device` since the last reset.
pub fn peak_reserved_bytes(device: Device) -> Option<u64> {
    // SAFETY: as above.
    let v = cuda_index(device).map(|d| unsafe { sparse_cuda_peak_reserved_bytes(d) })?;
    u64::try_from(v).ok()
}

/// Hands the caching allocator's unused blocks back to the driver (a no-op without CUDA, or
/// before CUDA is initialised: returns false then).
pub fn empty_cache() -> bool {
    // SAFETY: catches every exception on the C++ side.
    tch::Cuda::is_available() && unsafe { sparse_cuda_empty_cache() == 0 }
}

/// Starts a new peak-memory window on `device` (no-op off CUDA). Returns false when the
/// allocator refused (CUDA not initialised yet: allocate a CUDA tensor first).
pub fn reset_peak(device: Device) -> bool {
    match cuda_index(device) {
        // SAFETY: as above.
        Some(d) => unsafe { sparse_cuda_reset_peak(d) == 0 },
        None => false,
    }
}

/// The `cudaStream_t` tch's work on `device` is queued on (`None` off CUDA). A null
/// pointer is the legacy default stream, tch's usual current stream: a valid stream, not a
/// failure.
pub fn current_stream(device: Device) -> Option<*mut std::ffi::c_void> {
    // SAFETY: as above.
    cuda_index(device).map(|d| unsafe { sparse_cuda_current_stream(d) })
}

/// The dtype of CUDA autocast on this thread, `None` when it is off.
pub fn cuda_autocast_kind() -> Option<tch::Kind> {
    // SAFETY: reads libtorch's thread-local autocast state; catches every exception.
    match unsafe { sparse_cuda_autocast_dtype() } {
        -1 => None,
        5 => Some(tch::Kind::Half),
        15 => Some(tch::Kind::BFloat16),
        _ => Some(tch::Kind::Float),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn grad_mode_follows_no_grad() {
        assert!(super::grad_mode_enabled());
        assert!(!tch::no_grad(super::grad_mode_enabled));
        assert!(super::grad_mode_enabled());
    }
}
