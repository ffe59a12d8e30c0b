//! `hooked_identity`: an autograd node that is the identity up to two in-place hooks, one on
//! the forward value and one on the gradient flowing back. Tensor parallelism builds its
//! differentiable collectives from it (Megatron's f: identity forward, all-reduce of the
//! gradient; g: all-reduce forward, identity backward). The C++ side is
//! `bridge/tensor_hook.cpp`.
//!
//! The backward hook runs wherever libtorch's engine runs the backward (the calling thread
//! for CPU tensors, the device's engine thread for CUDA, on the stream of the forward).
use std::ffi::{c_char, c_int, c_void};
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;
use torch_sys::C_tensor;

use super::{panic_message, read_err, write_err, ERR_LEN};

/// An in-place operation on a tensor (for example an all-reduce over a group of ranks).
pub type TensorHook = Box<dyn Fn(&mut Tensor) -> Result<(), String>>;

#[repr(C)]
struct TensorHooks {
    forward_state: *mut c_void,
    backward_state: *mut c_void,
    call: unsafe extern "C" fn(*mut c_void, *mut C_tensor, *mut c_char, usize) -> c_int,
    drop: unsafe extern "C" fn(*mut c_void),
}

extern "C" {
    fn tensor_hook_apply(
        hooks: *const TensorHooks,
        x: *mut C_tensor,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Runs the boxed hook behind `state` on the borrowed tensor `t`.
unsafe extern "C" fn call_hook(
    state: *mut c_void,
    t: *mut C_tensor,
    err: *mut c_char,
    len: usize,
) -> c_int {
    // SAFETY: `state` is a `Box<TensorHook>` made by `hooked_identity`; `t` is a live handle
    // that stays owned by C++ (ManuallyDrop: no free here).
    let hook = &*(state as *const TensorHook);
    let mut tensor = ManuallyDrop::new(Tensor::from_ptr(t));
    match catch_unwind(AssertUnwindSafe(|| hook(&mut tensor))) {
        Ok(Ok(())) => 0,
        Ok(Err(msg)) => {
            write_err(err, len, &msg);
            1
        }
        Err(p) => {
            write_err(
                err,
                len,
                &format!("tensor hook panicked: {}", panic_message(p)),
            );
            1
        }
    }
}

unsafe extern "C" fn drop_hook(state: *mut c_void) {
    // SAFETY: made by `Box::into_raw` in `hooked_identity`, dropped once by the graph.
    drop(Box::from_raw(state as *mut TensorHook));
}

/// `y = x` as a new autograd node: `forward` is applied in place to y (a contiguous copy of
/// x), `backward` in place to (a copy of) the gradient of y before it flows to x. Errors of
/// the forward hook are returned; an error of the backward hook makes the backward fail
/// with its message.
pub fn hooked_identity(
    x: &Tensor,
    forward: Option<TensorHook>,
    backward: Option<TensorHook>,
) -> Result<Tensor, String> {
    let boxed = |h: Option<TensorHook>| {
        h.map_or(std::ptr::null_mut(), |h| {
            Box::into_raw(Box::new(h)) as *mut c_void
        })
    };
    let forward_state = boxed(forward);
    let hooks = TensorHooks {
        forward_state,
        backward_state: boxed(backward),
        call: call_hook,
        drop: drop_hook,
    };
    let mut out = std::ptr::null_mut();
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: `x` is a live tch tensor (the bridge copies the handle); the backward state
    // passes to the graph, which drops it; the forward state is ours and freed below.
    let rc = unsafe {
        tensor_hook_apply(
            &hooks,
            x.as_ptr() as *mut C_tensor,
            &mut out,
            err.as_mut_ptr(),
            ERR_LEN,
        )
    };
    if !forward_state.is_null() {
        // SAFETY: made above by `Box::into_raw`, not kept by the bridge.
        unsafe { drop_hook(forward_state) };
    }
    if rc != 0 {
        return Err(read_err(&err));
    }
    // SAFETY: a fresh handle the bridge gave us.
    Ok(unsafe { Tensor::from_ptr(out) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tch::{Device, Kind};

    /// Forward x3 and backward x5 hooks act where they should, and the backward hook is
    /// dropped with the graph.
    #[test]
    fn hooks_scale_forward_and_gradient() {
        let x = Tensor::from_slice(&[1.0f32, -2.0, 4.0]).set_requires_grad(true);
        let dropped = Arc::new(AtomicUsize::new(0));
        struct Guard(Arc<AtomicUsize>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let guard = Guard(dropped.clone());
        {
            let y = hooked_identity(
                &x,
                Some(Box::new(|t: &mut Tensor| {
                    let _ = t.g_mul_scalar_(3.0);
                    Ok(())
                })),
                Some(Box::new(move |t: &mut Tensor| {
                    let _keep = &guard;
                    let _ = t.g_mul_scalar_(5.0);
                    Ok(())
                })),
            )
            .unwrap();
            assert_eq!(Vec::<f32>::try_from(&y).unwrap(), vec![3.0, -6.0, 12.0]);
            (&y * &y).sum(Kind::Float).backward();
            // d/dx sum(y^2) through the node: 2 y * 5.
            assert_eq!(
                Vec::<f32>::try_from(x.grad()).unwrap(),
                vec![30.0, -60.0, 120.0]
            );
            assert_eq!(dropped.load(Ordering::SeqCst), 0);
        }
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "backward hook not freed");
    }

    #[test]
    fn hook_errors_surface() {
        let x = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let e = hooked_identity(&x, Some(Box::new(|_| Err("rank 3: boom".into()))), None);
        assert!(e.unwrap_err().contains("rank 3: boom"));
        let y = hooked_identity(&x, None, Some(Box::new(|_| Err("late".into())))).unwrap();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| y.sum(Kind::Float).backward()));
        assert!(r.is_err(), "a failing backward hook must fail the backward");
    }
}
