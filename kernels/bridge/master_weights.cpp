// Autograd functions over compute-dtype weight copies made once per optimizer step, whose
// gradients land in the fp32 master weights' `.grad` directly (see master_grad.h and
// kernels/src/fused/master_weights.rs):
// - MasterLinear: y = x W^T for a W that stacks the rows of one or more masters (one GEMM for
//   q, k and v); the backward's weight products accumulate into each master's gradient.
// - CachedWeight: hands a cached copy to an op with its own backward and adds the gradient
//   that op returns for it into the master's (the sparse FFN's tch-autograd arm; its own
//   autograd function adds into the masters itself, sparse_ffn.cpp).
// Both return no gradient for their master inputs, so autograd's own accumulation for those
// leaves never runs for these uses.
#include <torch/torch.h>

#include "ffi_error.h"
#include "master_grad.h"

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct MasterLinear : public torch::autograd::Function<MasterLinear> {
  // x: [..., in] (any float dtype, cast to w's); w: [out, in]; masters: fp32 [out_i, in] whose
  // rows w stacks in order (sum of out_i = out).
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w,
                               at::TensorList masters) {
    Tensor xc = x.scalar_type() == w.scalar_type() ? x : x.to(w.scalar_type());
    ctx->save_for_backward({xc, w});
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["masters"] = std::vector<Tensor>(masters.begin(), masters.end());
    return {at::matmul(xc, w.t())};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor& xc = saved[0];
    const Tensor& w = saved[1];
    auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    auto masters = ctx->saved_data["masters"].toTensorVector();
    int64_t out = w.size(0), in = w.size(1);
    Tensor dy = grads[0].scalar_type() == w.scalar_type() ? grads[0]
                                                          : grads[0].to(w.scalar_type());
    Tensor dy2 = dy.reshape({-1, out});
    Tensor x2 = xc.reshape({-1, in});
    int64_t row = 0;
    for (const Tensor& m : masters) {
      int64_t rows = m.size(0);
      sparse_bridge::accumulate_product(m, dy2.narrow(1, row, rows).t(), x2);
      row += rows;
    }
    TORCH_CHECK(row == out, "MasterLinear: masters hold ", row, " rows, the weight ", out);
    Tensor dx = at::matmul(dy, w);
    variable_list result = {dx.scalar_type() == x_dtype ? dx : dx.to(x_dtype), Tensor()};
    result.resize(2 + masters.size());
    return result;
  }
};

struct CachedWeight : public torch::autograd::Function<CachedWeight> {
  static variable_list forward(AutogradContext* ctx, const Tensor& master, const Tensor& cached) {
    ctx->saved_data["master"] = master;
    return {cached};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (grads[0].defined()) {
      sparse_bridge::accumulate(ctx->saved_data["master"].toTensor(), grads[0]);
    }
    return {Tensor(), Tensor()};
  }
};

}  // namespace

extern "C" {

// y = x W^T (MasterLinear). `masters` holds `n_masters` tensors. `out` receives a new handle
// the caller owns. Returns 0, or 1 with a message in `err`.
int sparse_master_linear(torch::Tensor* x, torch::Tensor* w, torch::Tensor* const* masters,
                         size_t n_masters, torch::Tensor** out, char* err, size_t err_len) {
  return sparse_bridge::catch_into_err(err, err_len, [&] {
    std::vector<Tensor> ms;
    for (size_t i = 0; i < n_masters; ++i) ms.push_back(*masters[i]);
    *out = new Tensor(MasterLinear::apply(*x, *w, at::TensorList(ms))[0]);
  });
}

// `cached` as a differentiable stand-in for `master` (CachedWeight).
int sparse_cached_weight(torch::Tensor* master, torch::Tensor* cached, torch::Tensor** out,
                         char* err, size_t err_len) {
  return sparse_bridge::catch_into_err(err, err_len, [&] {
    *out = new Tensor(CachedWeight::apply(*master, *cached)[0]);
  });
}

// g += a @ b (add_product: on CUDA one GEMM with an fp32 output and beta = 1).
int sparse_add_product(torch::Tensor* g, torch::Tensor* a, torch::Tensor* b, char* err,
                       size_t err_len) {
  return sparse_bridge::catch_into_err(err, err_len,
                                       [&] { sparse_bridge::add_product(*g, *a, *b); });
}

}  // extern "C"
