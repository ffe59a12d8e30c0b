// CUDA graphs through libtorch's at::cuda::CUDAGraph (tch has none): a graph owns a side
// stream from libtorch's pool; `enter` makes it the device's current stream (after the work
// already queued on the previous one), `exit` restores the previous stream (which then waits
// for the side stream). Warm-ups, the capture and the replays all run between the two, so
// every launch of the step, ATen's and ours (which launch on the current stream), lands on
// one stream. Allocations during the capture come from the graph's private memory pool and
// stay valid while the graph lives; libtorch registers the default CUDA generator, so random
// draws in a replay advance its Philox offset as eager ones would.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDAStream.h>

#include <memory>
#include <optional>

#include "ffi_error.h"

using sparse_bridge::catch_into_err;

struct SparseCudaGraph {
  c10::DeviceIndex device;
  c10::cuda::CUDAStream stream;
  std::optional<c10::cuda::CUDAStream> outer;
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  bool capturing = false;
  bool captured = false;
};

namespace {
// `waiter` waits (on the device) for the work queued on `on` so far.
// (c10::Event goes through libc10_cuda's registered device implementation, so this file
// needs no CUDA runtime library of its own.)
void stream_wait(const c10::cuda::CUDAStream& waiter, const c10::cuda::CUDAStream& on) {
  c10::Event event(c10::DeviceType::CUDA);
  event.record(on.unwrap());
  event.block(waiter.unwrap());
}
}  // namespace

extern "C" {

int sparse_cuda_graph_new(int32_t device, SparseCudaGraph** out, char* err, size_t err_len) {
  return catch_into_err(err, err_len, [&] {
    auto d = static_cast<c10::DeviceIndex>(device);
    auto stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, d);
    *out = new SparseCudaGraph{d, stream, std::nullopt, std::make_unique<at::cuda::CUDAGraph>()};
  });
}

int sparse_cuda_graph_enter(SparseCudaGraph* g, char* err, size_t err_len) {
  return catch_into_err(err, err_len, [&] {
    TORCH_CHECK(!g->outer.has_value(), "the graph's stream is already current");
    auto outer = c10::cuda::getCurrentCUDAStream(g->device);
    stream_wait(g->stream, outer);
    c10::cuda::setCurrentCUDAStream(g->stream);
    g->outer = outer;
  });
}

int sparse_cuda_graph_exit(SparseCudaGraph* g, char* err, size_t err_len) {
  return catch_into_err(err, err_len, [&] {
    TORCH_CHECK(g->outer.has_value(), "the graph's stream is not current");
    stream_wait(*g->outer, g->stream);
    c10::cuda::setCurrentCUDAStream(*g->outer);
    g->outer.reset();
  });
}

int sparse_cuda_graph_capture_begin(SparseCudaGraph* g, char* err, size_t err_len) {
  return catch_into_err(err, err_len, [&] {
    TORCH_CHECK(g->outer.has_value(), "capture runs on the graph's stream: enter it first");
    TORCH_CHECK(!g->captured && !g->capturing, "the graph was captured already");
    g->graph->capture_begin();
    g->capturing = true;
  });
}

int sparse_cuda_graph_capture_end(SparseCudaGraph* g, char* err, size_t err_len) {
  return catch_into_err(err, err_len, [&] {
    TORCH_CHECK(g->capturing, "no capture in progress");
    g->capturing = false;
    g->graph->capture_end();
    g->captured = true;
  });
}

int sparse_cuda_graph_replay(SparseCudaGraph* g, char* err, size_t err_len) {
  return catch_into_err(err, err_len, [&] {
    TORCH_CHECK(g->captured, "replay before a completed capture");
    g->graph->replay();
  });
}

void sparse_cuda_graph_free(SparseCudaGraph* g) {
  try {
    if (g->outer.has_value()) c10::cuda::setCurrentCUDAStream(*g->outer);
    delete g;
  } catch (...) {
  }
}

}  // extern "C"
