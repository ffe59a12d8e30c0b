// libtorch's Kineto profiler, which tch does not expose: start, named ranges, and stop with
// the Chrome trace written to a file (Perfetto, chrome://tracing). Rust side:
// src/torch/profiler.rs.
#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstdint>
#include <memory>
#include <set>
#include <string>

#include "ffi_error.h"

namespace {
// A named range: the record function holds a view of its name, so the name lives beside it.
struct Range {
  explicit Range(const char* n) : name(n), record(at::RecordScope::USER_SCOPE) {}
  std::string name;
  at::RecordFunction record;
};
}  // namespace

extern "C" {

// Starts recording CPU ops with their input shapes, and CUDA kernels and copies when
// `cuda` is non-zero. 0, or 1 with the message in `err`.
int sparse_profiler_start(int32_t cuda, char* err) {
  return sparse_bridge::catch_into_err(err, sparse_bridge::kErrLen, [&] {
    using torch::profiler::impl::ActivityType;
    using torch::profiler::impl::ProfilerConfig;
    using torch::profiler::impl::ProfilerState;
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda != 0) activities.insert(ActivityType::CUDA);
    ProfilerConfig config(ProfilerState::KINETO, /*report_input_shapes=*/true,
                          /*profile_memory=*/false, /*with_stack=*/false,
                          /*with_flops=*/false, /*with_modules=*/false);
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
  });
}

// Stops recording and writes the Chrome trace to `path`.
int sparse_profiler_stop(const char* path, char* err) {
  return sparse_bridge::catch_into_err(err, sparse_bridge::kErrLen, [&] {
    auto result = torch::autograd::profiler::disableProfiler();
    TORCH_CHECK(result, "the profiler was not running");
    result->save(std::string(path));
  });
}

// Opens a named range on this thread; nullptr when no profiler records (closing it is then
// a no-op), so a range costs one check when profiling is off.
void* sparse_profiler_range_open(const char* name) {
  try {
    if (!at::hasCallbacks()) return nullptr;
    auto range = std::make_unique<Range>(name);
    if (!range->record.isActive()) return nullptr;
    range->record.before(range->name);
    return range.release();
  } catch (...) {
    return nullptr;
  }
}

void sparse_profiler_range_close(void* range) {
  if (range == nullptr) return;
  try {
    std::unique_ptr<Range> r(static_cast<Range*>(range));
    r->record.end();
  } catch (...) {
  }
}

}  // extern "C"
