// ATen's multi-tensor AdamW and gradient norms, which tch does not bind
// (kernels/src/fused/adamw.rs): `_fused_adamw_` updates a list of tensors in one kernel
// launch per chunk of the list, reading each gradient divided by `grad_scale` (how a global
// clipping factor enters the same pass); `_foreach_norm` takes every tensor's L2 norm in one.
#include <torch/torch.h>

#include "ffi_error.h"

namespace {

std::vector<torch::Tensor> list(torch::Tensor* const* ts, size_t n) {
  std::vector<torch::Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}

}  // namespace

extern "C" {

// One AdamW step (decoupled weight decay) over `n` parameters in place. `step` is the step
// number the bias corrections use (1 for the first update); `grad_scale` (a one-element f32
// tensor on the parameters' device, or null) divides every gradient as it is read.
int sparse_fused_adamw(torch::Tensor* const* params, torch::Tensor* const* grads,
                       torch::Tensor* const* exp_avgs, torch::Tensor* const* exp_avg_sqs,
                       size_t n, double lr, double beta1, double beta2, double weight_decay,
                       double eps, double step, torch::Tensor* grad_scale, char* err,
                       size_t err_len) {
  return sparse_bridge::catch_into_err(err, err_len, [&] {
    if (n == 0) return;
    auto p = list(params, n), g = list(grads, n), m = list(exp_avgs, n), v = list(exp_avg_sqs, n);
    // The kernel reads (never writes) the step count; one tensor serves every parameter.
    torch::Tensor s = torch::full({}, step, p[0].options().dtype(at::kFloat));
    std::vector<torch::Tensor> steps(n, s);
    std::optional<torch::Tensor> scale;
    if (grad_scale != nullptr) scale = *grad_scale;
    at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, scale, std::nullopt);
  });
}

// The L2 norm of each of `n` tensors into `out` (one f32 handle per tensor, owned by the
// caller).
int sparse_foreach_norm(torch::Tensor* const* tensors, size_t n, torch::Tensor** out, char* err,
                        size_t err_len) {
  return sparse_bridge::catch_into_err(err, err_len, [&] {
    auto norms = at::_foreach_norm(list(tensors, n), 2, at::kFloat);
    for (size_t i = 0; i < n; ++i) out[i] = new torch::Tensor(norms[i]);
  });
}

}  // extern "C"
