// CUDA runtime facts that tch does not expose: the caching allocator's peak statistics and
// the current stream of a device (so our kernels launch in order with tch's work).
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cstdint>

extern "C" {

int64_t sparse_cuda_peak_allocated_bytes(int32_t device) {
  auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
  return stats.allocated_bytes[0].peak;  // StatType::AGGREGATE
}

int64_t sparse_cuda_peak_reserved_bytes(int32_t device) {
  auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
  return stats.reserved_bytes[0].peak;
}

void sparse_cuda_reset_peak(int32_t device) {
  c10::cuda::CUDACachingAllocator::resetPeakStats(device);
}

void* sparse_cuda_current_stream(int32_t device) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(device).stream());
}

}  // extern "C"
