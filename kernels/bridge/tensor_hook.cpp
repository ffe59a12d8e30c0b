// C++ side of `HookedIdentity` (see kernels/src/torch/hooks.rs): an autograd function that is the
// identity up to two Rust hooks, one applied in place to a copy of the input in the forward
// and one to a copy of the incoming gradient in the backward. Tensor parallelism builds its
// differentiable collectives from it (all-reduce in the forward or in the backward).
#include <torch/torch.h>

#include <stdexcept>

#include "ffi_error.h"

extern "C" {
// Applies the hook to `t` in place (t is borrowed). Returns 0, or 1 with a message in err.
typedef int (*tensor_hook_fn)(void* state, torch::Tensor* t, char* err, size_t err_len);
typedef void (*tensor_hook_drop_fn)(void* state);

struct TensorHooks {
  void* forward_state;  // may be null: no forward hook
  void* backward_state; // may be null: no backward hook; owned by the autograd graph
  tensor_hook_fn call;
  tensor_hook_drop_fn drop;
};
}

namespace {

using sparse_bridge::kErrLen;

struct BackwardHook : torch::CustomClassHolder {
  void* state;
  tensor_hook_fn call;
  tensor_hook_drop_fn drop;
  BackwardHook(void* s, tensor_hook_fn c, tensor_hook_drop_fn d) : state(s), call(c), drop(d) {}
  ~BackwardHook() override {
    if (state) drop(state);
  }
};

void run(tensor_hook_fn call, void* state, torch::Tensor& t) {
  char err[kErrLen] = {0};
  if (call(state, &t, err, kErrLen) != 0) throw std::runtime_error(err);
}

struct HookedIdentity : public torch::autograd::Function<HookedIdentity> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const TensorHooks* hooks) {
    // A fresh tensor: the hook may write in place, and the output is a new graph node.
    // The context owns the backward hook first, so a failing forward hook still frees it.
    ctx->saved_data["hook"] = c10::IValue::make_capsule(
        c10::make_intrusive<BackwardHook>(hooks->backward_state, hooks->call, hooks->drop));
    torch::Tensor out = x.clone(at::MemoryFormat::Contiguous);
    if (hooks->forward_state) run(hooks->call, hooks->forward_state, out);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto holder = ctx->saved_data["hook"].toCapsule();
    auto* h = static_cast<BackwardHook*>(holder.get());
    torch::Tensor g = grads[0];
    if (h->state && g.defined()) {
      g = g.clone(at::MemoryFormat::Contiguous);
      run(h->call, h->state, g);
    }
    return {g, torch::Tensor()};
  }
};

}  // namespace

extern "C" {
// Applies HookedIdentity to `x` (borrowed); `*out` receives a new handle the caller owns.
// The backward state passes to the graph even on failure (it is dropped there).
int tensor_hook_apply(const TensorHooks* hooks, torch::Tensor* x, torch::Tensor** out,
                      char* err, size_t err_len) {
  return sparse_bridge::catch_into_err(
      err, err_len, [&] { *out = new torch::Tensor(HookedIdentity::apply(*x, hooks)); });
}
}
