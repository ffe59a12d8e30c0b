// C++ side of the SparseFfn autograd function (see kernels/src/op/bridge.rs).
//
// A torch::autograd::Function whose forward and backward call Rust callbacks. Tensors cross
// the boundary as torch::Tensor* (tch's C_tensor*): pointers handed to Rust are fresh heap
// handles that Rust owns; pointers Rust hands back are heap handles this side takes over.
// Rust keeps its per-call state (the packed activations) behind an opaque pointer stored in
// the autograd context; the holder's destructor hands it back to Rust to free.
#include <torch/torch.h>

#include <stdexcept>
#include <string>

#include "ffi_error.h"
#include "master_grad.h"

extern "C" {
// inputs: x, Wg, Wu, Wd^T (owned by Rust once passed).
// outputs: y, l1_sum, active_per_token, active_per_unit, overflow_rows (owned by C++).
typedef int (*sparse_ffn_forward_fn)(const void* op, torch::Tensor** inputs,
                                     torch::Tensor** outputs, void** state, char* err,
                                     size_t err_len);
// inputs: x, Wg, Wu, Wd^T, dy, dl1 and the gradient buffers of the masters of Wg, Wu, Wd^T
// (undefined without masters; Rust adds the weight gradients into them), owned by Rust once
// passed. outputs: dx, dWg, dWu, dWd^T (owned by C++; the last three undefined with masters).
typedef int (*sparse_ffn_backward_fn)(void* state, torch::Tensor** inputs,
                                      torch::Tensor** outputs, char* err, size_t err_len);
typedef void (*sparse_ffn_drop_fn)(void* state);

struct SparseFfnCallbacks {
  const void* op;
  sparse_ffn_forward_fn forward;
  sparse_ffn_backward_fn backward;
  sparse_ffn_drop_fn drop;
};
}

namespace {

using sparse_bridge::kErrLen;

struct RustState : torch::CustomClassHolder {
  void* state;
  sparse_ffn_backward_fn backward;
  sparse_ffn_drop_fn drop;
  RustState(void* s, sparse_ffn_backward_fn b, sparse_ffn_drop_fn d)
      : state(s), backward(b), drop(d) {}
  ~RustState() override { drop(state); }
};

torch::Tensor take(torch::Tensor* p) {
  torch::Tensor t = std::move(*p);
  delete p;
  return t;
}

// Inputs x, Wg, Wu, Wd^T and, optionally (a list of three or empty), the masters of which the
// weights are compute copies: the backward then adds the weight gradients into the masters'
// .grad (master_grad.h) and returns none, so autograd's accumulation never runs for them.
struct SparseFfnFunction : public torch::autograd::Function<SparseFfnFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const torch::Tensor& x, const torch::Tensor& wg,
                                                const torch::Tensor& wu, const torch::Tensor& wdt,
                                                at::TensorList masters,
                                                const SparseFfnCallbacks* cb) {
    torch::Tensor* inputs[4] = {new torch::Tensor(x), new torch::Tensor(wg),
                                new torch::Tensor(wu), new torch::Tensor(wdt)};
    torch::Tensor* outputs[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
    void* state = nullptr;
    char err[kErrLen] = {0};
    if (cb->forward(cb->op, inputs, outputs, &state, err, kErrLen) != 0) {
      throw std::runtime_error(err);
    }
    ctx->saved_data["state"] = c10::IValue::make_capsule(
        c10::make_intrusive<RustState>(state, cb->backward, cb->drop));
    ctx->save_for_backward({x, wg, wu, wdt});
    if (!masters.empty()) {
      ctx->saved_data["masters"] = std::vector<torch::Tensor>(masters.begin(), masters.end());
    }
    torch::autograd::variable_list out;
    for (auto* p : outputs) out.push_back(take(p));
    ctx->mark_non_differentiable({out[2], out[3], out[4]});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto holder = ctx->saved_data["state"].toCapsule();
    auto* rs = static_cast<RustState*>(holder.get());
    auto saved = ctx->get_saved_variables();
    const bool has_masters = ctx->saved_data.count("masters") > 0;
    torch::Tensor into[3];
    if (has_masters) {
      auto masters = ctx->saved_data["masters"].toTensorVector();
      for (int i = 0; i < 3; ++i) into[i] = sparse_bridge::master_grad(masters[i]);
    }
    torch::Tensor* inputs[9] = {new torch::Tensor(saved[0]), new torch::Tensor(saved[1]),
                                new torch::Tensor(saved[2]), new torch::Tensor(saved[3]),
                                new torch::Tensor(grads[0]), new torch::Tensor(grads[1]),
                                new torch::Tensor(into[0]),  new torch::Tensor(into[1]),
                                new torch::Tensor(into[2])};
    torch::Tensor* outputs[4] = {nullptr, nullptr, nullptr, nullptr};
    char err[kErrLen] = {0};
    if (rs->backward(rs->state, inputs, outputs, err, kErrLen) != 0) {
      throw std::runtime_error(err);
    }
    torch::autograd::variable_list out;
    for (auto* p : outputs) out.push_back(take(p));
    // Nothing for the masters (added into above) and the callbacks.
    out.resize(4 + (has_masters ? 3 : 0) + 1);
    return out;
  }
};

}  // namespace

extern "C" {
// Applies SparseFfn. `inputs` are 7 tch tensors (borrowed): x, Wg, Wu, Wd^T and the three
// masters, undefined when there are none; `outputs` receive 5 new handles that the caller
// owns. Returns 0, or 1 with a message in `err`.
int sparse_ffn_apply(const SparseFfnCallbacks* cb, torch::Tensor* const* inputs,
                     torch::Tensor** outputs, char* err, size_t err_len) {
  return sparse_bridge::catch_into_err(err, err_len, [&] {
    std::vector<torch::Tensor> masters;
    if (inputs[4]->defined()) masters = {*inputs[4], *inputs[5], *inputs[6]};
    auto out = SparseFfnFunction::apply(*inputs[0], *inputs[1], *inputs[2], *inputs[3],
                                        at::TensorList(masters), cb);
    for (size_t i = 0; i < out.size(); ++i) outputs[i] = new torch::Tensor(out[i]);
  });
}
}
