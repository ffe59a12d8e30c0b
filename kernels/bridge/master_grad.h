// Gradients of fp32 master weights written straight into their `.grad`, for the autograd
// functions whose weight operand is a compute-dtype copy made once per optimizer step
// (master_weights.cpp, linear_cross_entropy.cpp, sparse_ffn.cpp). On CUDA a bf16 product accumulates into
// the fp32 gradient inside the GEMM (cuBLAS beta = 1, fp32 output): no bf16 gradient tensor,
// no cast, no separate add per micro-batch.
#pragma once

#include <torch/torch.h>

namespace sparse_bridge {

// The gradient buffer of `master`, zero-filled when it has none yet.
inline torch::Tensor& master_grad(const torch::Tensor& master) {
  torch::Tensor& g = master.mutable_grad();
  if (!g.defined()) g = torch::zeros_like(master, at::MemoryFormat::Contiguous);
  return g;
}

// g += alpha * a @ b, with a: [rows, N], b: [N, in] in the compute dtype.
inline void add_product(torch::Tensor& g, const torch::Tensor& a, const torch::Tensor& b,
                        double alpha = 1.0) {
  if (a.is_cuda() && a.scalar_type() != g.scalar_type() && g.is_contiguous()) {
    at::addmm_out(g, g, a, b, g.scalar_type(), 1.0, alpha);
  } else if (a.scalar_type() == g.scalar_type()) {
    // Same dtype (the f32 CPU trainer): the product, then one add, as autograd would.
    g.add_(at::mm(a, b), alpha);
  } else {
    g.add_(at::mm(a, b).to(g.scalar_type()), alpha);
  }
}

// master.grad += alpha * a @ b (add_product into the master's gradient buffer).
inline void accumulate_product(const torch::Tensor& master, const torch::Tensor& a,
                               const torch::Tensor& b, double alpha = 1.0) {
  add_product(master_grad(master), a, b, alpha);
}

// master.grad += alpha * d (d in any floating dtype; the add reads it once).
inline void accumulate(const torch::Tensor& master, const torch::Tensor& d, double alpha = 1.0) {
  master_grad(master).add_(d, alpha);
}

}  // namespace sparse_bridge
