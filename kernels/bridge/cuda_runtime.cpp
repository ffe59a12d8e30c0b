// CUDA runtime facts that tch does not expose: the caching allocator's peak statistics and
// the current stream of a device (so our kernels launch in order with tch's work), the
// CUDA autocast state and the grad mode. No C++ exception may cross into Rust (it aborts the process): every
// entry point catches and reports failure as -1 / nullptr. The allocator's statistics need
// CUDA initialised in the process (the caching allocator is set up lazily on the first CUDA
// tensor); before that resetPeakStats/getDeviceStats throw "Allocator not initialized".
#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cstdint>

extern "C" {

int64_t sparse_cuda_peak_allocated_bytes(int32_t device) {
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
    return stats.allocated_bytes[0].peak;  // StatType::AGGREGATE
  } catch (...) {
    return -1;
  }
}

int64_t sparse_cuda_allocated_bytes(int32_t device) {
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
    return stats.allocated_bytes[0].current;
  } catch (...) {
    return -1;
  }
}

int64_t sparse_cuda_peak_reserved_bytes(int32_t device) {
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
    return stats.reserved_bytes[0].peak;
  } catch (...) {
    return -1;
  }
}

int32_t sparse_cuda_reset_peak(int32_t device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(device);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Returns the caching allocator's unused cached blocks to the driver (so a later peak of
// reserved bytes counts what that work holds, not an earlier one's cache).
int32_t sparse_cuda_empty_cache() {
  try {
    c10::cuda::CUDACachingAllocator::emptyCache();
    return 0;
  } catch (...) {
    return -1;
  }
}

void* sparse_cuda_current_stream(int32_t device) {
  try {
    return static_cast<void*>(c10::cuda::getCurrentCUDAStream(device).stream());
  } catch (...) {
    return nullptr;
  }
}

// -1 when CUDA autocast is off, else its dtype as a c10::ScalarType code.
int32_t sparse_cuda_autocast_dtype() {
  try {
    if (!at::autocast::is_autocast_enabled(at::kCUDA)) return -1;
    return static_cast<int32_t>(at::autocast::get_autocast_dtype(at::kCUDA));
  } catch (...) {
    return -1;
  }
}

// 1 when autograd records operations on this thread (grad mode on), else 0.
int32_t sparse_grad_mode_enabled() { return c10::GradMode::is_enabled() ? 1 : 0; }

}  // extern "C"
