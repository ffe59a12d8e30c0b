//! [`apply_function`]: a libtorch autograd node whose forward and backward are Rust closures
//! (C++ side: `bridge/rust_function.cpp`), for differentiable ops whose kernels Rust launches.
//! The forward returns its outputs and the backward closure, which keeps what it needs (it
//! is freed with the graph). [`backward_with_grads`] backpropagates given output gradients
//! through such graphs (and any other).
use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use super::{into_raw, panic_message, read_err, write_err, ERR_LEN};

/// The backward of one call: gradients of the outputs (`None` where none flows) to those of
/// the inputs (`None` for none).
pub type BackwardFn = Box<dyn FnMut(&[Option<Tensor>]) -> Result<Vec<Option<Tensor>>, String>>;

/// The forward of an op: the inputs to the outputs and the backward.
pub type ForwardFn<'a> = &'a dyn Fn(&[Tensor]) -> Result<(Vec<Tensor>, BackwardFn), String>;

struct Op<'a> {
    forward: ForwardFn<'a>,
}

/// Mirrors `RustFunctionCallbacks` in `bridge/rust_function.cpp`.
#[repr(C)]
struct Callbacks {
    op: *const c_void,
    n_in: usize,
    n_out: usize,
    forward: unsafe extern "C" fn(
        *const c_void,
        *mut *mut C_tensor,
        usize,
        *mut *mut C_tensor,
        usize,
        *mut *mut c_void,
        *mut c_char,
        usize,
    ) -> c_int,
    backward: unsafe extern "C" fn(
        *mut c_void,
        *mut *mut C_tensor,
        usize,
        *mut *mut C_tensor,
        usize,
        *mut c_char,
        usize,
    ) -> c_int,
    drop: unsafe extern "C" fn(*mut c_void),
}

extern "C" {
    fn sparse_rust_function_apply(
        cb: *const Callbacks,
        inputs: *const *mut C_tensor,
        outputs: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Runs `forward` on `inputs` as one autograd node with `n_out` outputs: gradients reaching
/// them run the backward it returned. Errors of either side come back as their message (the
/// backward's through libtorch's backward).
pub fn apply_function(
    inputs: &[&Tensor],
    n_out: usize,
    forward: ForwardFn,
) -> Result<Vec<Tensor>, String> {
    let op = Op { forward };
    let cb = Callbacks {
        op: &op as *const Op as *const c_void,
        n_in: inputs.len(),
        n_out,
        forward: forward_cb,
        backward: backward_cb,
        drop: drop_cb,
    };
    let ins: Vec<*mut C_tensor> = inputs.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
    let mut outs = vec![std::ptr::null_mut(); n_out];
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: live tch handles, borrowed by the bridge; on success `outs` holds n_out fresh
    // handles, taken over below.
    let rc = unsafe {
        sparse_rust_function_apply(
            &cb,
            ins.as_ptr(),
            outs.as_mut_ptr(),
            err.as_mut_ptr(),
            ERR_LEN,
        )
    };
    if rc != 0 {
        return Err(read_err(&err));
    }
    // SAFETY: fresh handles from the bridge.
    Ok(outs
        .into_iter()
        .map(|p| unsafe { Tensor::from_ptr(p) })
        .collect())
}

/// Backpropagates `grads[i]` from `outputs[i]`, all in one pass, accumulating into the leaves'
/// `.grad` as [`Tensor::backward`] does (tch's own backward takes no output gradients). Call
/// it with grad mode on. The pass starts at a node whose backward hands each output its
/// gradient unchanged, so the gradients reaching the graph are exactly `grads`.
pub fn backward_with_grads(outputs: &[&Tensor], grads: &[&Tensor]) -> Result<(), String> {
    if outputs.len() != grads.len() || outputs.is_empty() {
        return Err(format!(
            "backward_with_grads: {} outputs and {} gradients (at least one of each, as many)",
            outputs.len(),
            grads.len()
        ));
    }
    for (i, (o, g)) in outputs.iter().zip(grads).enumerate() {
        if !o.requires_grad() {
            return Err(format!(
                "backward_with_grads: output {i} does not require a gradient"
            ));
        }
        if o.size() != g.size() {
            return Err(format!(
                "backward_with_grads: output {i} is {:?}, its gradient {:?}",
                o.size(),
                g.size()
            ));
        }
    }
    let grads: Vec<Tensor> = grads.iter().map(|g| g.shallow_clone()).collect();
    let root = |t: &[Tensor]| -> Result<(Vec<Tensor>, BackwardFn), String> {
        let given: Vec<Tensor> = grads.iter().map(Tensor::shallow_clone).collect();
        let backward: BackwardFn =
            Box::new(move |_| Ok(given.iter().map(|g| Some(g.shallow_clone())).collect()));
        Ok((
            vec![Tensor::zeros([], (Kind::Float, t[0].device()))],
            backward,
        ))
    };
    let out = apply_function(outputs, 1, &root)?;
    out[0].f_backward().map_err(|e| e.to_string())
}

/// A handle the bridge passed (null: none).
///
/// # Safety
/// `p` is null or an owned handle.
unsafe fn take(p: *mut C_tensor) -> Option<Tensor> {
    (!p.is_null()).then(|| Tensor::from_ptr(p))
}

unsafe extern "C" fn forward_cb(
    op: *const c_void,
    inputs: *mut *mut C_tensor,
    n_in: usize,
    outputs: *mut *mut C_tensor,
    n_out: usize,
    state: *mut *mut c_void,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    // SAFETY: `op` is the `Op` of the running `apply_function`; the bridge passes n_in owned
    // handles (null for an undefined tensor) and room for n_out.
    let op = &*(op as *const Op);
    // Every handle is taken (and so freed) before any is checked.
    let taken: Vec<Option<Tensor>> = (0..n_in).map(|i| take(*inputs.add(i))).collect();
    let result = match taken.into_iter().collect::<Option<Vec<Tensor>>>() {
        None => Err("an input is an undefined tensor".to_string()),
        Some(tensors) => catch_unwind(AssertUnwindSafe(|| (op.forward)(&tensors)))
            .unwrap_or_else(|p| Err(format!("forward panicked: {}", panic_message(p)))),
    };
    match result {
        Ok((outs, backward)) if outs.len() == n_out => {
            for (i, t) in outs.into_iter().enumerate() {
                *outputs.add(i) = into_raw(t);
            }
            *state = Box::into_raw(Box::new(backward)) as *mut c_void;
            0
        }
        Ok((outs, _)) => {
            let msg = format!("forward returned {} outputs, {n_out} declared", outs.len());
            write_err(err, err_len, &msg);
            1
        }
        Err(msg) => {
            write_err(err, err_len, &msg);
            1
        }
    }
}

unsafe extern "C" fn backward_cb(
    state: *mut c_void,
    grads: *mut *mut C_tensor,
    n_out: usize,
    grad_inputs: *mut *mut C_tensor,
    n_in: usize,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    // SAFETY: `state` is the live BackwardFn of `forward_cb`; n_out handles or nulls; room
    // for n_in results.
    let backward = &mut *(state as *mut BackwardFn);
    let g: Vec<Option<Tensor>> = (0..n_out).map(|i| take(*grads.add(i))).collect();
    let result = catch_unwind(AssertUnwindSafe(|| backward(&g)))
        .unwrap_or_else(|p| Err(format!("backward panicked: {}", panic_message(p))));
    match result {
        Ok(gi) if gi.len() == n_in => {
            for (i, t) in gi.into_iter().enumerate() {
                *grad_inputs.add(i) = t.map_or(std::ptr::null_mut(), into_raw);
            }
            0
        }
        Ok(gi) => {
            let msg = format!("backward returned {} gradients for {n_in} inputs", gi.len());
            write_err(err, err_len, &msg);
            1
        }
        Err(msg) => {
            write_err(err, err_len, &msg);
            1
        }
    }
}

unsafe extern "C" fn drop_cb(state: *mut c_void) {
    if !state.is_null() {
        // SAFETY: made by `Box::into_raw` in `forward_cb`, dropped once with the graph.
        drop(Box::from_raw(state as *mut BackwardFn));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// `(a * b, a + b)` through closures equals autograd's gradients, an unused output gets
    /// none, and errors of both sides surface.
    #[test]
    fn closures_form_one_autograd_node() {
        let a = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let b = Tensor::from_slice(&[3.0f32, -1.0]).set_requires_grad(true);
        let fwd = |t: &[Tensor]| -> Result<(Vec<Tensor>, BackwardFn), String> {
            let (a, b) = (t[0].detach(), t[1].detach());
            let outs = vec![&a * &b, &a + &b];
            let back: BackwardFn = Box::new(move |g: &[Option<Tensor>]| {
                let g0 = g[0]
                    .as_ref()
                    .map_or_else(|| a.zeros_like(), |t| t.shallow_clone());
                let g1 = g[1]
                    .as_ref()
                    .map_or_else(|| a.zeros_like(), |t| t.shallow_clone());
                Ok(vec![Some(&g0 * &b + &g1), Some(&g0 * &a + &g1)])
            });
            Ok((outs, back))
        };
        let out = apply_function(&[&a, &b], 2, &fwd).unwrap();
        assert_eq!(Vec::<f32>::try_from(&out[0]).unwrap(), [3.0, -2.0]);
        out[0].sum(Kind::Float).backward();
        assert_eq!(Vec::<f32>::try_from(a.grad()).unwrap(), [3.0, -1.0]);
        assert_eq!(Vec::<f32>::try_from(b.grad()).unwrap(), [1.0, 2.0]);

        let failing =
            |_: &[Tensor]| -> Result<(Vec<Tensor>, BackwardFn), String> { Err("refused".into()) };
        assert!(apply_function(&[&a], 1, &failing)
            .unwrap_err()
            .contains("refused"));
        let bad_back = |t: &[Tensor]| -> Result<(Vec<Tensor>, BackwardFn), String> {
            let back: BackwardFn = Box::new(|_| Err("no gradient today".into()));
            Ok((vec![t[0].detach() * 2.0], back))
        };
        let y = apply_function(&[&a], 1, &bad_back).unwrap();
        let e = y[0].sum(Kind::Float).f_backward().unwrap_err().to_string();
        assert!(e.contains("no gradient today"), "{e}");
        let _ = Device::Cpu;
    }

    /// Two outputs backpropagated with their gradients in one pass give the leaves exactly
    /// the gradients of `sum(y_i * g_i)` (added into existing `.grad`), and bad calls are
    /// refused with the output named.
    #[test]
    fn backward_with_grads_accumulates_the_given_gradients() {
        tch::manual_seed(2);
        let opts = (Kind::Float, Device::Cpu);
        let a = Tensor::randn([3, 4], opts).set_requires_grad(true);
        let b = Tensor::randn([4], opts).set_requires_grad(true);
        let (ga, gb) = (Tensor::randn([3, 4], opts), Tensor::randn([], opts));
        let outputs = || (&a * &b, (&a * &b).sin().sum(Kind::Float));
        let (y0, y1) = outputs();
        backward_with_grads(&[&y0, &y1], &[&ga, &gb]).unwrap();
        let (first_a, first_b) = (a.grad().copy(), b.grad().copy());
        let (y0, y1) = outputs();
        backward_with_grads(&[&y0, &y1], &[&ga, &gb]).unwrap();

        let a2 = a.detach().set_requires_grad(true);
        let b2 = b.detach().set_requires_grad(true);
        let y0 = &a2 * &b2;
        let y1 = (&a2 * &b2).sin().sum(Kind::Float);
        let want = Tensor::run_backward(
            &[(&y0 * &ga).sum(Kind::Float) + &y1 * &gb],
            &[&a2, &b2],
            false,
            false,
        );
        assert!(first_a.allclose(&want[0], 1e-6, 1e-6, false));
        assert!(first_b.allclose(&want[1], 1e-6, 1e-6, false));
        assert!(a.grad().allclose(&(&want[0] * 2.0), 1e-6, 1e-6, false));
        assert!(b.grad().allclose(&(&want[1] * 2.0), 1e-6, 1e-6, false));

        // The gradient of a lone output reaches its leaf bit for bit.
        let c = Tensor::randn([5], opts).set_requires_grad(true);
        let g = Tensor::randn([5], opts);
        let y = &c * 1.0;
        backward_with_grads(&[&y], &[&g]).unwrap();
        assert!(c.grad().equal(&g));

        let y = &c * 2.0;
        let e = backward_with_grads(&[&y], &[&ga]).unwrap_err();
        assert!(e.contains("output 0"), "{e}");
        let e = backward_with_grads(&[&y, &c.detach()], &[&g, &g]).unwrap_err();
        assert!(e.contains("output 1"), "{e}");
        assert!(backward_with_grads(&[], &[]).is_err());
    }
}
