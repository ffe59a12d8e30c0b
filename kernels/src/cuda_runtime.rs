//! CUDA facts tch does not expose (C++ side: `bridge/cuda_runtime.cpp`): the caching
//! allocator's peak memory and the device's current stream.
use tch::Device;

extern "C" {
    fn sparse_cuda_peak_allocated_bytes(device: i32) -> i64;
    fn sparse_cuda_peak_reserved_bytes(device: i32) -> i64;
    fn sparse_cuda_reset_peak(device: i32);
    fn sparse_cuda_current_stream(device: i32) -> *mut std::ffi::c_void;
}

fn cuda_index(device: Device) -> Option<i32> {
    match device {
        Device::Cuda(i) if tch::Cuda::is_available() => Some(i as i32),
        _ => None,
    }
}

/// Peak bytes held by live tensors on `device` since the last reset (`None` off CUDA).
pub fn peak_allocated_bytes(device: Device) -> Option<u64> {
    // SAFETY: the device index is valid (CUDA is available and tch created the device).
    cuda_index(device).map(|d| unsafe { sparse_cuda_peak_allocated_bytes(d) } as u64)
}

/// Peak bytes reserved by the caching allocator on `device` since the last reset.
pub fn peak_reserved_bytes(device: Device) -> Option<u64> {
    // SAFETY: as above.
    cuda_index(device).map(|d| unsafe { sparse_cuda_peak_reserved_bytes(d) } as u64)
}

/// Starts a new peak-memory window on `device` (no-op off CUDA).
pub fn reset_peak(device: Device) {
    if let Some(d) = cuda_index(device) {
        // SAFETY: as above.
        unsafe { sparse_cuda_reset_peak(d) }
    }
}

/// The `cudaStream_t` tch's work on `device` is queued on (`None` off CUDA).
pub fn current_stream(device: Device) -> Option<*mut std::ffi::c_void> {
    // SAFETY: as above.
    cuda_index(device).map(|d| unsafe { sparse_cuda_current_stream(d) })
}
