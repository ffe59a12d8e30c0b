//! The C ABI of the `SparseFfn` autograd function (`bridge/sparse_ffn.cpp`): [`apply`] hands
//! the inputs and the callbacks to C++, whose forward and backward call [`forward_cb`] and
//! [`backward_cb`]; [`drop_cb`] frees the saved state with the graph.
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;
use torch_sys::C_tensor;

use super::{backward, forward, Inputs, Kernel, Saved};
use crate::torch::{into_raw, panic_message, read_err, write_err, ERR_LEN};
use crate::types::{FfnError, FfnOutput, FfnWeights, SparseFfnConfig};

/// Per-call parameters, read by the forward callback during [`apply`].
struct Op {
    kernel: Kernel,
    config: SparseFfnConfig,
    /// The typed error of a failed forward, returned by [`apply`] instead of its message.
    error: RefCell<Option<FfnError>>,
}

type ForwardFn = unsafe extern "C" fn(
    *const c_void,
    *mut *mut C_tensor,
    *mut *mut C_tensor,
    *mut *mut c_void,
    *mut c_char,
    usize,
) -> c_int;
type BackwardFn = unsafe extern "C" fn(
    *mut c_void,
    *mut *mut C_tensor,
    *mut *mut C_tensor,
    *mut c_char,
    usize,
) -> c_int;

/// Mirrors `SparseFfnCallbacks` in `bridge/sparse_ffn.cpp`.
#[repr(C)]
struct Callbacks {
    op: *const c_void,
    forward: ForwardFn,
    backward: BackwardFn,
    drop: unsafe extern "C" fn(*mut c_void),
}

extern "C" {
    fn sparse_ffn_apply(
        cb: *const Callbacks,
        inputs: *const *mut C_tensor,
        outputs: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Runs `SparseFfn` with `kernel` on `x: [N, D]` and `Wg, Wu, Wd^T: [H, D]` (validated).
pub(super) fn apply(
    x: &Tensor,
    w: &FfnWeights,
    kernel: Kernel,
    config: &SparseFfnConfig,
) -> Result<FfnOutput, FfnError> {
    let op = Op {
        kernel,
        config: *config,
        error: RefCell::new(None),
    };
    let cb = Callbacks {
        op: &op as *const Op as *const c_void,
        forward: forward_cb,
        backward: backward_cb,
        drop: drop_cb,
    };
    // The masters, or undefined tensors in their place (the bridge takes 7 inputs).
    let none = Tensor::new();
    let [mg, mu, md] = w.masters.unwrap_or([&none; 3]);
    let inputs = [x, w.gate, w.up, w.down_t, mg, mu, md].map(|t| t.as_ptr() as *mut C_tensor);
    let mut outputs = [std::ptr::null_mut(); 5];
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: the inputs are live tch tensors (the bridge copies the handles); on success the
    // bridge fills `outputs` with 5 fresh handles that we take over below.
    let rc = unsafe {
        sparse_ffn_apply(
            &cb,
            inputs.as_ptr(),
            outputs.as_mut_ptr(),
            err.as_mut_ptr(),
            ERR_LEN,
        )
    };
    if rc != 0 {
        return Err(op
            .error
            .into_inner()
            .unwrap_or_else(|| FfnError::Bridge(read_err(&err))));
    }
    // SAFETY: fresh, owned handles (see above).
    Ok(FfnOutput::from_array(
        outputs.map(|p| unsafe { Tensor::from_ptr(p) }),
    ))
}

/// Takes over the `N` handles the bridge passed.
///
/// # Safety
/// `inputs` holds `N` owned handles.
unsafe fn take_inputs<const N: usize>(inputs: *mut *mut C_tensor) -> [Tensor; N] {
    std::array::from_fn(|i| Tensor::from_ptr(*inputs.add(i)))
}

/// Hands `tensors` to the bridge's `outputs`.
///
/// # Safety
/// `outputs` has room for `N` handles.
unsafe fn give_outputs<const N: usize>(tensors: [Tensor; N], outputs: *mut *mut C_tensor) {
    for (i, t) in tensors.into_iter().enumerate() {
        *outputs.add(i) = into_raw(t);
    }
}

/// Writes `e` into the bridge's error buffer; the callbacks' failure code, 1.
///
/// # Safety
/// `err` points to `err_len >= 1` writable bytes.
unsafe fn report(e: &FfnError, err: *mut c_char, err_len: usize) -> c_int {
    write_err(err, err_len, &e.to_string());
    1
}

/// Runs `f`, turning a panic into [`FfnError::Bridge`].
fn catching<T>(f: impl FnOnce() -> Result<T, FfnError>) -> Result<T, FfnError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(FfnError::Bridge(panic_message(p))))
}

/// # Safety
/// Called by the bridge only: `op` is the [`Op`] of the running [`apply`], `inputs` holds 4
/// owned handles, `outputs` room for 5, `err` `err_len` bytes.
unsafe extern "C" fn forward_cb(
    op: *const c_void,
    inputs: *mut *mut C_tensor,
    outputs: *mut *mut C_tensor,
    state: *mut *mut c_void,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    let op = &*(op as *const Op);
    let tensors = take_inputs::<4>(inputs);
    let t = Inputs::of(&tensors);
    match catching(|| forward(op.kernel, &op.config, &t)) {
        Ok((outs, saved)) => {
            give_outputs(outs, outputs);
            *state = Box::into_raw(Box::new(saved)) as *mut c_void;
            0
        }
        Err(e) => {
            let rc = report(&e, err, err_len);
            *op.error.borrow_mut() = Some(e);
            rc
        }
    }
}

/// # Safety
/// Called by the bridge only: `state` is a live [`Saved`] from [`forward_cb`], `inputs`
/// holds 9 owned handles (the last three the masters' gradient buffers, or undefined),
/// `outputs` room for 4, `err` `err_len` bytes.
unsafe extern "C" fn backward_cb(
    state: *mut c_void,
    inputs: *mut *mut C_tensor,
    outputs: *mut *mut C_tensor,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    let saved = &*(state as *const Saved);
    let tensors = take_inputs::<9>(inputs);
    let t = Inputs::of(&tensors);
    let [.., dy, dl1, gg, gu, gd] = &tensors;
    let into = gg.defined().then_some([gg, gu, gd]);
    match catching(|| backward(saved, &t, dy, dl1, into)) {
        Ok(grads) => {
            give_outputs(grads, outputs);
            0
        }
        Err(e) => report(&e, err, err_len),
    }
}

/// # Safety
/// Called once by the bridge when the autograd context dies, with a [`forward_cb`] state.
unsafe extern "C" fn drop_cb(state: *mut c_void) {
    if !state.is_null() {
        drop(Box::from_raw(state as *mut Saved));
    }
}
