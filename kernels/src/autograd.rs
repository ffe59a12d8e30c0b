//! `SparseFfn`: the sparse FFN as one custom autograd function.
//!
//! tch has no custom autograd functions, so `bridge/sparse_ffn.cpp` defines a
//! `torch::autograd::Function` whose forward and backward call back into this module
//! (`forward_cb`, `backward_cb`). Tensors cross as `torch::Tensor*` (tch's `C_tensor*`).
//! The forward returns `y: [N, D]` and `l1_sum` (differentiable) plus three no-grad
//! statistics, and keeps the packed gate activations in a Rust `Saved` value owned by the
//! autograd context until the graph is freed.
//!
//! Devices are dispatched in one place each way (`forward` on the input device, `backward`
//! on what the forward saved): CPU tensors run the CPU reference on the TwELL or hybrid
//! format. CUDA tensors on the TwELL path with no gradient needed (inference: grad mode off
//! or no input requiring grad) run the TwELL kernels of `kernels/cuda/twell.cu` (module
//! [`crate::cuda`]) on tch's current stream, in bf16 (inputs cast if needed); there `l1_sum`
//! is NaN (the inference kernels never form |h|), the active counts come from the packed
//! format (`relu(g) > 0`), and `overflow_rows` counts rows with a spilled tile. CUDA tensors
//! on the hybrid path run the hybrid training kernels of `kernels/cuda/hybrid.cu`
//! ([`crate::cuda::hybrid_forward`] / [`crate::cuda::hybrid_backward`]) in bf16, forward and
//! backward, saving only the packed actives (CSR with g and u, and its transpose); `y` comes
//! back in autocast's dtype under autocast (else x's dtype), the gradients in their input's dtype,
//! `l1_sum` as f32; shapes the kernels do not take fall back as below. The TwELL path when a
//! gradient is needed runs the exact differentiable fallback: the same function with dense
//! tch ops (`dense`), f32 math; `y` and the gradients come back in their input's dtype,
//! `l1_sum` as f32.
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::{Device, Kind, TchError, Tensor};
use thiserror::Error;
use torch_sys::C_tensor;

use crate::ffn::{FfnOutput, FfnWeights};
use crate::hybrid::{HybridConfig, HybridError, HybridMatrix};
use crate::reference::{FfnProblem, ReferenceError, SparseRows};
use crate::twell::{TwellConfig, TwellError, TwellMatrix};

/// Which packed format carries the gate activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparseFormat {
    Twell,
    Hybrid,
}

/// Format parameters of the sparse paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseFfnConfig {
    /// TwELL layout of `P: [N, H]` on the TwELL path.
    pub twell: TwellConfig,
    /// Hybrid layout of `P: [N, H]` on the hybrid path.
    pub hybrid: HybridConfig,
    /// Hybrid layout of `P^T: [H, N]` (both paths' backward).
    pub hybrid_transposed: HybridConfig,
    /// Compute `l1_sum` and the activity counts. Inference turns it off: then, where no
    /// gradient is needed, the dense and CUDA TwELL paths skip that work (a pass over the
    /// packed format, one host synchronisation per call) and return `l1_sum` = NaN and
    /// empty (numel 0) counts. Paths that get the counts for free still return them.
    pub statistics: bool,
}

impl Default for SparseFfnConfig {
    fn default() -> Self {
        SparseFfnConfig {
            twell: TwellConfig::default(),
            hybrid: HybridConfig::TOKENS,
            hybrid_transposed: HybridConfig::UNITS,
            statistics: true,
        }
    }
}

/// Errors of the sparse FFN op.
#[derive(Debug, Error)]
pub enum FfnError {
    #[error("x must be [N, D], got {shape:?}")]
    InputShape { shape: Vec<i64> },
    #[error("{name} must be [H, D] with D = {d} and the same H as Wg = {h}, got {shape:?}")]
    WeightShape {
        name: &'static str,
        shape: Vec<i64>,
        h: i64,
        d: i64,
    },
    #[error("{name} is on {device:?} but x is on {x_device:?}")]
    Device {
        name: &'static str,
        device: Device,
        x_device: Device,
    },
    #[error("{name} has dtype {kind:?}; the sparse FFN takes f32 or bf16")]
    Dtype { name: &'static str, kind: Kind },
    #[error("the sparse FFN has no implementation on {device:?}")]
    UnsupportedDevice { device: Device },
    #[error(transparent)]
    Twell(#[from] TwellError),
    #[error(transparent)]
    Hybrid(#[from] HybridError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Torch(#[from] TchError),
    #[error("sparse FFN bridge: {0}")]
    Bridge(String),
    #[error("CUDA kernels: {0}")]
    Cuda(#[from] crate::cuda::CudaKernelError),
}

/// Per-call parameters, read by the forward callback during `apply`.
struct Op {
    format: SparseFormat,
    config: SparseFfnConfig,
    /// The typed error of a failed forward, returned by [`apply`] instead of its message.
    error: RefCell<Option<FfnError>>,
}

/// What the forward keeps for the backward (besides x and the weights, saved as tensors).
enum Saved {
    Cpu {
        config: SparseFfnConfig,
        pattern: Box<CpuPattern>,
    },
    Dense,
    /// The hybrid kernels' packed actives (CSR + transpose), for the CUDA backward.
    CudaHybrid(Box<crate::cuda::HybridState>),
}

/// The packed `P = relu(x Wg^T): [N, H]` of a CPU forward.
enum CpuPattern {
    Twell(TwellMatrix),
    Hybrid(HybridMatrix),
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

/// Bytes of the error buffers the bridges fill (shared with `hooks`).
pub(crate) const ERR_LEN: usize = 1024;

fn check_kind(name: &'static str, t: &Tensor) -> Result<(), FfnError> {
    match t.kind() {
        Kind::Float | Kind::BFloat16 => Ok(()),
        kind => Err(FfnError::Dtype { name, kind }),
    }
}

fn validate(x: &Tensor, w: &FfnWeights) -> Result<(), FfnError> {
    let xs = x.size();
    if xs.len() != 2 {
        return Err(FfnError::InputShape { shape: xs });
    }
    check_kind("x", x)?;
    let d = xs[1];
    let h = w.gate.size().first().copied().unwrap_or(-1);
    for (name, t) in [("Wg", w.gate), ("Wu", w.up), ("Wd^T", w.down_t)] {
        let shape = t.size();
        if shape != [h, d] {
            return Err(FfnError::WeightShape { name, shape, h, d });
        }
        if t.device() != x.device() {
            return Err(FfnError::Device {
                name,
                device: t.device(),
                x_device: x.device(),
            });
        }
        check_kind(name, t)?;
    }
    match x.device() {
        Device::Cpu | Device::Cuda(_) => Ok(()),
        device => Err(FfnError::UnsupportedDevice { device }),
    }
}

/// Runs `SparseFfn` on `x: [N, D]` with `Wg, Wu, Wd^T: [H, D]`.
pub fn apply(
    x: &Tensor,
    w: &FfnWeights,
    format: SparseFormat,
    config: &SparseFfnConfig,
) -> Result<FfnOutput, FfnError> {
    validate(x, w)?;
    if format == SparseFormat::Twell && matches!(x.device(), Device::Cuda(_)) && !grad_needed(x, w)
    {
        let t = Inputs {
            x,
            gate: w.gate,
            up: w.up,
            down_t: w.down_t,
        };
        if let Some(outs) = cuda_twell::forward(&config.twell, config.statistics, &t)? {
            let [y, l1_sum, active_per_token, active_per_unit, overflow_rows] = outs;
            return Ok(FfnOutput {
                y,
                l1_sum,
                active_per_token,
                active_per_unit,
                overflow_rows,
            });
        }
    }
    let op = Op {
        format,
        config: *config,
        error: RefCell::new(None),
    };
    let cb = Callbacks {
        op: &op as *const Op as *const c_void,
        forward: forward_cb,
        backward: backward_cb,
        drop: drop_cb,
    };
    let inputs = [x, w.gate, w.up, w.down_t].map(|t| t.as_ptr() as *mut C_tensor);
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
        return Err(op.error.into_inner().unwrap_or_else(|| {
            // SAFETY: the bridge NUL-terminates the message within ERR_LEN.
            FfnError::Bridge(
                unsafe { CStr::from_ptr(err.as_ptr()) }
                    .to_string_lossy()
                    .into_owned(),
            )
        }));
    }
    // SAFETY: fresh, owned handles (see above).
    let [y, l1_sum, active_per_token, active_per_unit, overflow_rows] =
        outputs.map(|p| unsafe { Tensor::from_ptr(p) });
    Ok(FfnOutput {
        y,
        l1_sum,
        active_per_token,
        active_per_unit,
        overflow_rows,
    })
}

/// `x, Wg, Wu, Wd^T` (and `dy, dl1` in the backward), as handed over by the bridge.
struct Inputs<'a> {
    x: &'a Tensor,
    gate: &'a Tensor,
    up: &'a Tensor,
    down_t: &'a Tensor,
}

/// The forward's device dispatch: `[y, l1_sum, active_per_token, active_per_unit,
/// overflow_rows]` and the state for the backward. CUDA kernels replace the `Cuda` arm (with
/// their own `Saved` variant, which `backward` then dispatches on).
fn forward(op: &Op, t: &Inputs) -> Result<([Tensor; 5], Saved), FfnError> {
    match t.x.device() {
        Device::Cpu => cpu::forward(op, t),
        // Inside the autograd function grad mode is off: inputs requiring grad mean the
        // backward will run, so only a no-grad call may take the inference kernels.
        Device::Cuda(_) if op.format == SparseFormat::Twell && !inputs_require_grad(t) => {
            match cuda_twell::forward(&op.config.twell, op.config.statistics, t)? {
                Some(outs) => Ok((outs, Saved::Dense)),
                None => Ok((dense::forward(t), Saved::Dense)),
            }
        }
        Device::Cuda(_) if op.format == SparseFormat::Hybrid => match cuda_hybrid::forward(t)? {
            Some((outs, state)) => Ok((outs, Saved::CudaHybrid(Box::new(state)))),
            None => Ok((dense::forward(t), Saved::Dense)),
        },
        Device::Cuda(_) => Ok((dense::forward(t), Saved::Dense)),
        device => Err(FfnError::UnsupportedDevice { device }),
    }
}

/// The backward's dispatch on what the forward saved: `[dx, dWg, dWu, dWd^T]`.
fn backward(saved: &Saved, t: &Inputs, dy: &Tensor, dl1: &Tensor) -> Result<[Tensor; 4], FfnError> {
    match saved {
        Saved::Cpu { config, pattern } => cpu::backward(config, pattern, t, dy, dl1),
        Saved::Dense => Ok(dense::backward(t, dy, dl1)),
        Saved::CudaHybrid(state) => cuda_hybrid::backward(state, t, dy, dl1),
    }
}

fn inputs_require_grad(t: &Inputs) -> bool {
    [t.x, t.gate, t.up, t.down_t]
        .iter()
        .any(|t| t.requires_grad())
}

/// Whether the output of this call will be differentiated.
pub(crate) fn grad_needed(x: &Tensor, w: &FfnWeights) -> bool {
    [x, w.gate, w.up, w.down_t]
        .iter()
        .any(|t| t.requires_grad())
        && crate::cuda_runtime::grad_mode_enabled()
}

/// The TwELL inference kernels on CUDA (no gradient).
mod cuda_twell {
    use super::*;
    use crate::cuda::{twell_ffn, TwellLaunch};

    /// `None` when the kernels do not cover the format (tile other than 256 columns or a
    /// compression other than 8/4/2): the caller runs the dense fallback.
    pub(super) fn forward(
        cfg: &TwellConfig,
        statistics: bool,
        t: &Inputs,
    ) -> Result<Option<[Tensor; 5]>, FfnError> {
        let tw = (cfg.tile == 256 && [2, 4, 8].contains(&cfg.compression))
            .then(|| 256 / cfg.compression as i64);
        let Some(tw) = tw else { return Ok(None) };
        let n = t.x.size()[0];
        let launch = TwellLaunch {
            tw,
            ..TwellLaunch::for_tokens(n)
        };
        let _guard = tch::no_grad_guard();
        let (y, stats) = twell_ffn(t.x, t.gate, t.up, t.down_t, launch, statistics)?;
        let (apt, apu, overflow) = match stats {
            Some(s) => s,
            None => {
                let empty = || Tensor::f_zeros([0], (Kind::Int64, t.x.device()));
                (empty()?, empty()?, empty()?)
            }
        };
        let y = if y.kind() == t.x.kind() {
            y
        } else {
            y.f_to_kind(t.x.kind())?
        };
        let l1 = Tensor::f_full([], f64::NAN, (Kind::Float, t.x.device()))?;
        Ok(Some([y, l1, apt, apu, overflow]))
    }
}

/// The hybrid training kernels on CUDA (forward and backward, with or without gradient).
mod cuda_hybrid {
    use super::*;
    use crate::cuda::{hybrid_backward, hybrid_forward, HybridKernels, HybridState};

    fn bf16(t: &Tensor) -> Result<Tensor, TchError> {
        t.f_to_kind(Kind::BFloat16)?.f_contiguous()
    }

    /// `None` when the kernels do not take the shape (the caller runs the dense fallback).
    /// Computes in bf16 (inputs cast); `y` comes back in autocast's dtype, else in x's
    /// dtype; `l1_sum` f32; the counts are the kernels' (no host sync beyond the forward's
    /// one status read).
    pub(super) fn forward(t: &Inputs) -> Result<Option<([Tensor; 5], HybridState)>, FfnError> {
        let (n, d) = t.x.size2()?;
        let h = t.gate.size()[0];
        if !HybridKernels::for_device(t.x.device())?.supports(n, d, h) {
            return Ok(None);
        }
        let _guard = tch::no_grad_guard();
        let f = hybrid_forward(&bf16(t.x)?, &bf16(t.gate)?, &bf16(t.up)?, &bf16(t.down_t)?)?;
        // Under autocast (the trainer's bf16 over fp32 master weights) y takes autocast's
        // dtype, as the dense path's matmuls would give; else x's.
        let kind = crate::cuda_runtime::cuda_autocast_kind().unwrap_or(t.x.kind());
        let outs = [
            f.y.f_to_kind(kind)?,
            f.l1_sum,
            f.active_per_token,
            f.active_per_unit,
            f.overflow_rows,
        ];
        Ok(Some((outs, f.state)))
    }

    /// `[dx, dWg, dWu, dWd^T]` in the dtypes of x and the weights (bf16 kernels, converted).
    pub(super) fn backward(
        state: &HybridState,
        t: &Inputs,
        dy: &Tensor,
        dl1: &Tensor,
    ) -> Result<[Tensor; 4], FfnError> {
        let _guard = tch::no_grad_guard();
        let dl1 = dl1.f_to_kind(Kind::Float)?.f_reshape([1])?.f_contiguous()?;
        let [dx, dwg, dwu, dwd] = hybrid_backward(
            state,
            &bf16(t.x)?,
            &bf16(t.gate)?,
            &bf16(t.up)?,
            &bf16(t.down_t)?,
            &bf16(dy)?,
            &dl1,
        )?;
        Ok([
            dx.f_to_kind(t.x.kind())?,
            dwg.f_to_kind(t.gate.kind())?,
            dwu.f_to_kind(t.up.kind())?,
            dwd.f_to_kind(t.down_t.kind())?,
        ])
    }
}

fn into_raw(mut t: Tensor) -> *mut C_tensor {
    let p = t.as_mut_ptr();
    std::mem::forget(t);
    p
}

/// Copies `msg` into the bridge's error buffer, truncated and NUL-terminated.
///
/// # Safety
/// `err` must point to `len >= 1` writable bytes.
/// Copies `msg` into the bridge's error buffer `err` of `len` bytes, NUL-terminated.
pub(crate) unsafe fn write_err(err: *mut c_char, len: usize, msg: &str) {
    let n = msg.len().min(len - 1);
    std::ptr::copy_nonoverlapping(msg.as_ptr() as *const c_char, err, n);
    *err.add(n) = 0;
}

/// The message of a caught panic.
pub(crate) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic without a message".into())
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
    let [x, gate, up, down_t]: [Tensor; 4] =
        std::array::from_fn(|i| Tensor::from_ptr(*inputs.add(i)));
    let t = Inputs {
        x: &x,
        gate: &gate,
        up: &up,
        down_t: &down_t,
    };
    let result = catch_unwind(AssertUnwindSafe(|| forward(op, &t)))
        .unwrap_or_else(|p| Err(FfnError::Bridge(panic_message(p))));
    match result {
        Ok((outs, saved)) => {
            for (i, o) in outs.into_iter().enumerate() {
                *outputs.add(i) = into_raw(o);
            }
            *state = Box::into_raw(Box::new(saved)) as *mut c_void;
            0
        }
        Err(e) => {
            write_err(err, err_len, &e.to_string());
            *op.error.borrow_mut() = Some(e);
            1
        }
    }
}

/// # Safety
/// Called by the bridge only: `state` is a live [`Saved`] from [`forward_cb`], `inputs`
/// holds 6 owned handles, `outputs` room for 4, `err` `err_len` bytes.
unsafe extern "C" fn backward_cb(
    state: *mut c_void,
    inputs: *mut *mut C_tensor,
    outputs: *mut *mut C_tensor,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    let saved = &*(state as *const Saved);
    let [x, gate, up, down_t, dy, dl1]: [Tensor; 6] =
        std::array::from_fn(|i| Tensor::from_ptr(*inputs.add(i)));
    let t = Inputs {
        x: &x,
        gate: &gate,
        up: &up,
        down_t: &down_t,
    };
    let result = catch_unwind(AssertUnwindSafe(|| backward(saved, &t, &dy, &dl1)))
        .unwrap_or_else(|p| Err(FfnError::Bridge(panic_message(p))));
    match result {
        Ok(grads) => {
            for (i, g) in grads.into_iter().enumerate() {
                *outputs.add(i) = into_raw(g);
            }
            0
        }
        Err(e) => {
            write_err(err, err_len, &e.to_string());
            1
        }
    }
}

/// # Safety
/// Called once by the bridge when the autograd context dies, with a [`forward_cb`] state.
unsafe extern "C" fn drop_cb(state: *mut c_void) {
    if !state.is_null() {
        drop(Box::from_raw(state as *mut Saved));
    }
}

/// The CPU path: the reference on the packed formats.
mod cpu {
    use super::*;

    /// A tensor as a row-major f32 vector.
    fn to_vec(t: &Tensor) -> Vec<f32> {
        let t = t.to_kind(Kind::Float).contiguous();
        let n = t.numel();
        let mut v = vec![0.0f32; n];
        t.copy_data(&mut v, n);
        v
    }

    fn to_tensor(v: &[f32], shape: [i64; 2], kind: Kind) -> Tensor {
        Tensor::from_slice(v).view(shape).to_kind(kind)
    }

    pub(super) fn forward(op: &Op, t: &Inputs) -> Result<([Tensor; 5], Saved), FfnError> {
        let (n, d) = t.x.size2()?;
        let h = t.gate.size()[0];
        let (nu, du, hu) = (n as usize, d as usize, h as usize);
        let xf = t.x.to_kind(Kind::Float);
        let p_dense = to_vec(&xf.matmul(&t.gate.to_kind(Kind::Float).tr()).relu());
        let (x, gate, up, down_t) = (to_vec(&xf), to_vec(t.gate), to_vec(t.up), to_vec(t.down_t));
        let problem = FfnProblem::new(&x, &gate, &up, &down_t, nu, du, hu)?;
        let (pattern, overflow) = match op.format {
            SparseFormat::Twell => {
                let m = TwellMatrix::pack(&p_dense, nu, hu, op.config.twell)?;
                let overflow = [m.stats().overflow_rows as i64, 0];
                (CpuPattern::Twell(m), overflow)
            }
            SparseFormat::Hybrid => {
                let m = HybridMatrix::pack(&p_dense, nu, hu, op.config.hybrid)?;
                let s = m.stats();
                (
                    CpuPattern::Hybrid(m),
                    [s.tail_rows as i64, s.rows_beyond_tail_capacity as i64],
                )
            }
        };
        let r = match &pattern {
            CpuPattern::Twell(m) => problem.forward(m)?,
            CpuPattern::Hybrid(m) => problem.forward(m)?,
        };
        let outs = [
            to_tensor(&r.y, [n, d], t.x.kind()),
            Tensor::from(r.l1_sum),
            Tensor::from_slice(&r.active_per_token),
            Tensor::from_slice(&r.active_per_unit),
            Tensor::from_slice(&overflow),
        ];
        Ok((
            outs,
            Saved::Cpu {
                config: op.config,
                pattern: Box::new(pattern),
            },
        ))
    }

    fn backward_on<S: SparseRows>(
        config: &SparseFfnConfig,
        p: &S,
        t: &Inputs,
        dy: &Tensor,
        dl1: &Tensor,
    ) -> Result<[Tensor; 4], FfnError> {
        let (n, d) = t.x.size2()?;
        let h = t.gate.size()[0];
        let (x, gate, up, down_t) = (to_vec(t.x), to_vec(t.gate), to_vec(t.up), to_vec(t.down_t));
        let problem = FfnProblem::new(&x, &gate, &up, &down_t, n as usize, d as usize, h as usize)?;
        let p_t = HybridMatrix::transpose_of(p, config.hybrid_transposed)?;
        let dl1 = f32::try_from(dl1.to_kind(Kind::Float))?;
        let g = problem.backward(p, &p_t, &to_vec(dy), dl1)?;
        Ok([
            to_tensor(&g.dx, [n, d], t.x.kind()),
            to_tensor(&g.d_gate, [h, d], t.gate.kind()),
            to_tensor(&g.d_up, [h, d], t.up.kind()),
            to_tensor(&g.d_down_t, [h, d], t.down_t.kind()),
        ])
    }

    pub(super) fn backward(
        config: &SparseFfnConfig,
        pattern: &CpuPattern,
        t: &Inputs,
        dy: &Tensor,
        dl1: &Tensor,
    ) -> Result<[Tensor; 4], FfnError> {
        match pattern {
            CpuPattern::Twell(m) => backward_on(config, m, t, dy, dl1),
            CpuPattern::Hybrid(m) => backward_on(config, m, t, dy, dl1),
        }
    }
}

/// The same function with dense tch ops on any device (f32 math): what CUDA tensors run
/// until the CUDA kernels are dispatched from [`forward`].
mod dense {
    use super::*;

    struct Dense {
        x: Tensor,
        gate: Tensor,
        up: Tensor,
        down_t: Tensor,
        g: Tensor,
        u: Tensor,
    }

    fn recompute(t: &Inputs) -> Dense {
        let f = |t: &Tensor| t.to_kind(Kind::Float);
        let (x, gate, up, down_t) = (f(t.x), f(t.gate), f(t.up), f(t.down_t));
        let g = x.matmul(&gate.tr());
        let u = x.matmul(&up.tr());
        Dense {
            x,
            gate,
            up,
            down_t,
            g,
            u,
        }
    }

    pub(super) fn forward(t: &Inputs) -> [Tensor; 5] {
        let r = recompute(t);
        let h = r.g.relu() * &r.u;
        let y = h.matmul(&r.down_t).to_kind(t.x.kind());
        let active = h.ne(0.0);
        [
            y,
            h.abs().sum(Kind::Float),
            active.sum_dim_intlist(-1, false, Kind::Int64),
            active.sum_dim_intlist(0, false, Kind::Int64),
            Tensor::zeros([2], (Kind::Int64, t.x.device())),
        ]
    }

    pub(super) fn backward(t: &Inputs, dy: &Tensor, dl1: &Tensor) -> [Tensor; 4] {
        let r = recompute(t);
        let dy = dy.to_kind(Kind::Float);
        let p = r.g.relu();
        let h = &p * &r.u;
        let dh = dy.matmul(&r.down_t.tr()) + h.sign() * dl1.to_kind(Kind::Float);
        let du = &dh * &p;
        let dg = dh * &r.u * r.g.gt(0.0);
        [
            (du.matmul(&r.up) + dg.matmul(&r.gate)).to_kind(t.x.kind()),
            dg.tr().matmul(&r.x).to_kind(t.gate.kind()),
            du.tr().matmul(&r.x).to_kind(t.up.kind()),
            h.tr().matmul(&dy).to_kind(t.down_t.kind()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dense fallback (what CUDA runs today) matches tch autograd through the oracle.
    #[test]
    fn dense_fallback_matches_oracle_gradients() {
        tch::manual_seed(11);
        let (n, d, h) = (37, 24, 70);
        let opts = (Kind::Float, Device::Cpu);
        let x = (Tensor::randn([n, d], opts) - 0.2).set_requires_grad(true);
        let ws: Vec<Tensor> = (0..3)
            .map(|_| (Tensor::randn([h, d], opts) * 0.3).set_requires_grad(true))
            .collect();
        let w = FfnWeights {
            gate: &ws[0],
            up: &ws[1],
            down_t: &ws[2],
        };
        let out = crate::ffn::dense_ffn(&x, &w);
        let r = Tensor::randn([n, d], opts);
        let dl1 = 0.37;
        ((&out.y * &r).sum(Kind::Float) + &out.l1_sum * dl1).backward();

        let t = Inputs {
            x: &x,
            gate: &ws[0],
            up: &ws[1],
            down_t: &ws[2],
        };
        let [y, l1, apt, apu, _] = tch::no_grad(|| dense::forward(&t));
        let grads = tch::no_grad(|| dense::backward(&t, &r, &Tensor::from(dl1 as f32)));
        assert!(y.allclose(&out.y, 1e-5, 1e-5, false));
        assert!(l1.allclose(&out.l1_sum, 1e-5, 1e-5, false));
        assert!(apt.equal(&out.active_per_token) && apu.equal(&out.active_per_unit));
        for (got, want) in grads.iter().zip([&x, &ws[0], &ws[1], &ws[2]]) {
            assert!(got.allclose(&want.grad(), 1e-4, 1e-4, false));
        }
    }
}
