// How the bridges report a C++ exception to Rust: no exception may cross the C ABI (it would
// abort the process), so each extern "C" entry runs its body through catch_into_err, which
// turns an exception into return code 1 and its message, NUL-terminated, in `err`.
#pragma once

#include <torch/torch.h>

#include <cstring>
#include <exception>

namespace sparse_bridge {

// Bytes of the error buffers on both sides (Rust: crate::torch::ERR_LEN).
constexpr size_t kErrLen = 1024;

inline void copy_message(const char* msg, char* err, size_t err_len) {
  std::strncpy(err, msg, err_len - 1);
  err[err_len - 1] = 0;
}

// Runs `body`; 0 when it returns, 1 with the exception's message in `err` when it throws.
template <class Body>
int catch_into_err(char* err, size_t err_len, Body&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    copy_message(e.what_without_backtrace(), err, err_len);
    return 1;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return 1;
  }
}

}  // namespace sparse_bridge
