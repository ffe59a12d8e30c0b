// A torch::autograd::Function whose forward and backward are Rust closures, for ops whose
// kernels Rust launches (kernels/src/torch/function.rs). Tensors cross as torch::Tensor*
// (tch's C_tensor*): handles passed to Rust are fresh heap copies Rust owns; handles Rust
// hands back are heap copies this side takes over; a null handle is an undefined tensor.
// The backward closure lives behind an opaque pointer in the autograd context; the holder's
// destructor hands it back to Rust to free, with the graph.
#include <torch/torch.h>

#include <stdexcept>

#include "ffi_error.h"

extern "C" {
// inputs: n_in handles (owned by Rust once passed). outputs: n_out handles (owned by C++).
typedef int (*rust_forward_fn)(const void* op, torch::Tensor** inputs, size_t n_in,
                               torch::Tensor** outputs, size_t n_out, void** state, char* err,
                               size_t err_len);
// grads: n_out handles, null where no gradient flows (owned by Rust once passed).
// grad_inputs: n_in handles, null for none (owned by C++).
typedef int (*rust_backward_fn)(void* state, torch::Tensor** grads, size_t n_out,
                                torch::Tensor** grad_inputs, size_t n_in, char* err,
                                size_t err_len);
typedef void (*rust_drop_fn)(void* state);

struct RustFunctionCallbacks {
  const void* op;
  size_t n_in;
  size_t n_out;
  rust_forward_fn forward;
  rust_backward_fn backward;
  rust_drop_fn drop;
};
}

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct BackwardState : torch::CustomClassHolder {
  void* state;
  rust_backward_fn backward;
  rust_drop_fn drop;
  size_t n_in;
  BackwardState(void* s, rust_backward_fn b, rust_drop_fn d, size_t n)
      : state(s), backward(b), drop(d), n_in(n) {}
  ~BackwardState() override { drop(state); }
};

Tensor take(Tensor* p) {
  if (p == nullptr) return Tensor();
  Tensor t = std::move(*p);
  delete p;
  return t;
}

Tensor* give(const Tensor& t) { return t.defined() ? new Tensor(t) : nullptr; }

struct RustFunction : public torch::autograd::Function<RustFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs,
                               const RustFunctionCallbacks* cb) {
    std::vector<Tensor*> in(cb->n_in);
    for (size_t i = 0; i < cb->n_in; ++i) in[i] = give(inputs[i]);
    std::vector<Tensor*> out(cb->n_out, nullptr);
    void* state = nullptr;
    char err[sparse_bridge::kErrLen] = {0};
    if (cb->forward(cb->op, in.data(), cb->n_in, out.data(), cb->n_out, &state, err,
                    sparse_bridge::kErrLen) != 0) {
      throw std::runtime_error(err);
    }
    ctx->saved_data["state"] = c10::IValue::make_capsule(
        c10::make_intrusive<BackwardState>(state, cb->backward, cb->drop, cb->n_in));
    variable_list result;
    for (auto* p : out) result.push_back(take(p));
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto holder = ctx->saved_data["state"].toCapsule();
    auto* bs = static_cast<BackwardState*>(holder.get());
    std::vector<Tensor*> g(grads.size());
    for (size_t i = 0; i < grads.size(); ++i) g[i] = give(grads[i]);
    std::vector<Tensor*> gi(bs->n_in, nullptr);
    char err[sparse_bridge::kErrLen] = {0};
    if (bs->backward(bs->state, g.data(), g.size(), gi.data(), bs->n_in, err,
                     sparse_bridge::kErrLen) != 0) {
      throw std::runtime_error(err);
    }
    variable_list result;
    for (auto* p : gi) result.push_back(take(p));
    result.push_back(Tensor());  // the callbacks argument
    return result;
  }
};

}  // namespace

extern "C" {
// Applies the Rust function `cb` to `inputs` (cb->n_in borrowed handles); `outputs` receives
// cb->n_out new handles the caller owns. Returns 0, or 1 with a message in `err`.
int sparse_rust_function_apply(const RustFunctionCallbacks* cb, torch::Tensor* const* inputs,
                               torch::Tensor** outputs, char* err, size_t err_len) {
  return sparse_bridge::catch_into_err(err, err_len, [&] {
    std::vector<Tensor> in;
    for (size_t i = 0; i < cb->n_in; ++i) in.push_back(*inputs[i]);
    auto out = RustFunction::apply(at::TensorList(in), cb);
    for (size_t i = 0; i < out.size(); ++i) outputs[i] = new Tensor(out[i]);
  });
}
}
