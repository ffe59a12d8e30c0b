// Linear + cross-entropy over the LM head in row chunks, never holding the logits of the
// whole batch (kernels/src/fused/linear_cross_entropy.rs). Per chunk of `chunk` rows: the
// logits in fp32 (on CUDA straight from the bf16 GEMM), their log-sum-exp, the loss terms, and,
// when a gradient is wanted, softmax - onehot in the compute dtype, from which the chunk's
// input gradient and its weight-gradient product are taken at once (the weight's product
// accumulating in fp32 into one buffer). The backward only scales those two by the incoming
// gradient (the weight's in fp32, returned for the fp32 master). Targets < 0 are ignored.
// On CUDA with bf16 inputs the log-sum-exp, loss and softmax - onehot of a chunk are one
// kernel (kernels/cuda/cross_entropy.cu), launched by the Rust callback `rows_kernel`.
#include <torch/torch.h>

#include "ffi_error.h"

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Per-row loss of fp32 logit rows into `loss` and, when `g` is not null, bf16 softmax -
// onehot into `g` (owned handles, taken by the callee). Returns 0, or 1 with a message in
// `err`.
typedef int32_t (*CrossEntropyRows)(Tensor* logits, Tensor* targets, Tensor* g, Tensor* loss,
                                    char* err, size_t err_len);

void run_rows_kernel(CrossEntropyRows rows_kernel, const Tensor& logits, const Tensor& targets,
                     const Tensor* g, const Tensor& loss) {
  char err[1024] = {0};
  int32_t rc = rows_kernel(new Tensor(logits), new Tensor(targets),
                           g == nullptr ? nullptr : new Tensor(*g), new Tensor(loss), err,
                           sizeof err);
  TORCH_CHECK(rc == 0, "cross-entropy kernel: ", err);
}

// x_c [C, D] @ w^T -> fp32 [C, V].
Tensor logits_f32(const Tensor& xc, const Tensor& w) {
  if (xc.is_cuda() && xc.scalar_type() != at::kFloat) return at::mm(xc, w.t(), at::kFloat);
  return at::mm(xc, w.t()).to(at::kFloat);
}

struct LinearCrossEntropy : public torch::autograd::Function<LinearCrossEntropy> {
  // x: [N, D] (any float dtype); w: [V, D] compute-dtype copy of `master` (fp32, or w itself);
  // targets: [N] int64. Returns the summed loss over the kept targets (fp32 scalar) and the
  // count of kept targets (int64, not differentiable). `rows_kernel` (a CrossEntropyRows,
  // as an integer: 0 for none) runs each chunk's softmax on CUDA when the inputs are bf16.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w,
                               const Tensor& master, const Tensor& targets, int64_t chunk,
                               bool with_grad, int64_t rows_kernel) {
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
                "linear_cross_entropy: x [N, D] and w [V, D] expected, got ", x.sizes(), " and ",
                w.sizes());
    TORCH_CHECK(targets.dim() == 1 && targets.size(0) == x.size(0),
                "linear_cross_entropy: targets [N] expected, got ", targets.sizes());
    TORCH_CHECK(chunk > 0, "linear_cross_entropy: chunk must be positive");
    int64_t n = x.size(0);
    Tensor xc = x.scalar_type() == w.scalar_type() ? x : x.to(w.scalar_type());
    Tensor loss = torch::zeros({}, x.options().dtype(at::kFloat));
    Tensor dx, dw;
    if (with_grad) {
      dx = torch::empty_like(xc);
      dw = torch::zeros(w.sizes(), w.options().dtype(at::kFloat));
    }
    auto kernel = reinterpret_cast<CrossEntropyRows>(rows_kernel);
    bool use_kernel = kernel != nullptr && xc.is_cuda() && xc.scalar_type() == at::kBFloat16;
    // Per-row losses, summed once at the end (a fixed order, one reduction).
    Tensor loss_rows = use_kernel ? torch::empty({n}, x.options().dtype(at::kFloat)) : Tensor();
    Tensor targets_c = targets.contiguous();
    for (int64_t r = 0; r < n; r += chunk) {
      int64_t c = std::min(chunk, n - r);
      Tensor x_c = xc.narrow(0, r, c);
      Tensor t = targets_c.narrow(0, r, c);
      if (use_kernel) {
        Tensor logits = at::mm(x_c, w.t(), at::kFloat);
        Tensor g;
        if (with_grad) g = torch::empty({c, w.size(0)}, xc.options());
        run_rows_kernel(kernel, logits, t, with_grad ? &g : nullptr, loss_rows.narrow(0, r, c));
        if (!with_grad) continue;
        Tensor dx_c = dx.narrow(0, r, c);
        at::mm_out(dx_c, g, w);
        at::addmm_out(dw, dw, g.t(), x_c, at::kFloat, 1.0, 1.0);
        continue;
      }
      Tensor keep = t.ge(0);
      Tensor t_safe = t.clamp_min(0).unsqueeze(1);
      Tensor logits = logits_f32(x_c, w);
      Tensor lse = at::logsumexp(logits, {1});
      Tensor picked = logits.gather(1, t_safe).squeeze(1);
      loss.add_(((lse - picked) * keep).sum());
      if (!with_grad) continue;
      // softmax - onehot, zero on ignored rows, in the compute dtype.
      Tensor probs = logits.sub_(lse.unsqueeze(1)).exp_();
      probs.scatter_add_(1, t_safe, -torch::ones_like(t_safe, probs.options()));
      Tensor g = torch::empty({c, w.size(0)}, xc.options());
      at::mul_out(g, probs, keep.unsqueeze(1));
      Tensor dx_c = dx.narrow(0, r, c);
      at::mm_out(dx_c, g, w);
      if (g.is_cuda() && g.scalar_type() != at::kFloat) {
        at::addmm_out(dw, dw, g.t(), x_c, at::kFloat, 1.0, 1.0);
      } else {
        dw.add_(at::mm(g.t(), x_c).to(at::kFloat));
      }
    }
    if (use_kernel) loss = loss_rows.sum();
    Tensor count = targets.ge(0).sum();
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    if (with_grad) {
      ctx->saved_data["dx"] = dx;
      ctx->saved_data["dw"] = dw;
    }
    ctx->mark_non_differentiable({count});
    return {loss, count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(ctx->saved_data.count("dx"),
                "linear_cross_entropy: backward of a call made without gradients, or a second "
                "backward through it");
    auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    Tensor scale = grads[0].to(at::kFloat);
    Tensor dx = ctx->saved_data["dx"].toTensor();
    Tensor dw = ctx->saved_data["dw"].toTensor();
    ctx->saved_data.erase("dx");
    ctx->saved_data.erase("dw");
    Tensor dx_out = at::mul(dx.to(at::kFloat), scale).to(x_dtype);
    // The master's gradient goes through autograd (not into .grad here): a tied embedding
    // then sums it with the lookup's gradient before accumulating, as for any shared leaf.
    return {dx_out, Tensor(), dw.mul_(scale), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

extern "C" {

// [loss_sum, kept_count] of linear + cross-entropy; `out` receives 2 new handles the caller
// owns; `rows_kernel` may be null (ATen ops throughout). Returns 0, or 1 with a message in
// `err`.
int sparse_linear_cross_entropy(torch::Tensor* x, torch::Tensor* w, torch::Tensor* master,
                                torch::Tensor* targets, int64_t chunk, int32_t with_grad,
                                CrossEntropyRows rows_kernel, torch::Tensor** out, char* err,
                                size_t err_len) {
  return sparse_bridge::catch_into_err(err, err_len, [&] {
    auto r = LinearCrossEntropy::apply(*x, *w, *master, *targets, chunk, with_grad != 0,
                                       reinterpret_cast<int64_t>(rows_kernel));
    out[0] = new Tensor(r[0]);
    out[1] = new Tensor(r[1]);
  });
}

}  // extern "C"
