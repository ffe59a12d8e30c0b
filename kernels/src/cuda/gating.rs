//! Launches `kernels/cuda/gating.cu` on tch CUDA tensors, on tch's current stream: the dense
//! FFN's gating `h = relu(g) u` with its L1 term and activity counts in one forward pass, and
//! its backward (with the L1 gradient) in one pass. The autograd arm around them is the dense
//! training arm of `crate::op`.
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaFunction, CudaModule};
use tch::{Device, Kind, Tensor};

use super::consts::{GATING_ROWS, GATING_THREADS};
use super::image::load_image;
use super::launch::{
    check_device_scalar, check_tensor, gating_bwd, gating_fwd, load_once, ptr, LaunchShape,
    PerDevice, TUNED_SMS,
};
use super::twell::TwellKernels;
use super::{CudaKernelError, Result};

/// The gating module of one device (in the TwELL module's context).
pub struct GatingKernels {
    tw: Arc<TwellKernels>,
    _module: Arc<CudaModule>,
    fwd: CudaFunction,
    bwd: CudaFunction,
}

impl GatingKernels {
    fn load(ordinal: usize) -> Result<Self> {
        let tw = TwellKernels::for_device(Device::Cuda(ordinal))?;
        let (module, _) = load_image(&tw.ctx, "gating")?;
        Ok(Self {
            fwd: module.load_function("gating_fwd")?,
            bwd: module.load_function("gating_bwd")?,
            _module: module,
            tw,
        })
    }

    /// The loaded module of `device`, loaded once per process.
    pub fn for_device(device: Device) -> Result<Arc<GatingKernels>> {
        static LOADED: PerDevice<GatingKernels> = OnceLock::new();
        load_once(&LOADED, device, GatingKernels::load)
    }
}

/// Whether the kernels take pre-activations of `h` units a token (16-byte granules of 8).
pub fn gating_supports(h: i64) -> bool {
    h > 0 && h % 8 == 0
}

/// The forward's outputs.
pub struct GatingForward {
    /// `[N, H]` bf16, `relu(g) u` rounded once.
    pub h: Tensor,
    /// `sum_j |h_tj|` per token, `[N]` f32.
    pub l1_row: Tensor,
    /// Active units per token, `[N]` int64.
    pub active_per_token: Tensor,
    /// Active tokens per unit, `[H]` int64.
    pub active_per_unit: Tensor,
}

fn check_pair(g: &Tensor, u: &Tensor) -> Result<(i64, i64)> {
    let (n, h) = g.size2()?;
    if !gating_supports(h) {
        return Err(CudaKernelError::Shape(format!(
            "gating: H = {h} must be a positive multiple of 8"
        )));
    }
    check_tensor("gating g", g, Kind::BFloat16, &[n, h], g.device())?;
    check_tensor("gating u", u, Kind::BFloat16, &[n, h], g.device())?;
    Ok((n, h))
}

/// `h = bf16(relu(g) u)` with its per-token L1 and the activity counts, for `g, u: [N, H]`
/// bf16 contiguous on one CUDA device.
pub fn gating_forward(g: &Tensor, u: &Tensor) -> Result<GatingForward> {
    let (n, h) = check_pair(g, u)?;
    let dev = g.device();
    let out = Tensor::f_empty([n, h], (Kind::BFloat16, dev))?;
    let l1_row = Tensor::f_empty([n], (Kind::Float, dev))?;
    let row_cnt = Tensor::f_empty([n], (Kind::Int, dev))?;
    let blk_cnt = Tensor::f_empty([forward_blocks(n), h], (Kind::Uint8, dev))?;
    gating_forward_into(g, u, [&out, &l1_row, &row_cnt, &blk_cnt])?;
    Ok(GatingForward {
        h: out,
        l1_row,
        active_per_token: row_cnt.f_to_kind(Kind::Int64)?,
        active_per_unit: blk_cnt.f_sum_dim_intlist(0, false, Kind::Int64)?,
    })
}

/// Row blocks of the forward (rows of its per-block unit counts).
pub fn forward_blocks(n: i64) -> i64 {
    (n + GATING_ROWS - 1) / GATING_ROWS
}

/// The forward into given buffers: `h: [N, H]` bf16, `l1_row: [N]` f32, `row_cnt: [N]` int32
/// and `blk_cnt: [forward_blocks(N), H]` uint8 (every element written).
pub fn gating_forward_into(
    g: &Tensor,
    u: &Tensor,
    [out, l1_row, row_cnt, blk_cnt]: [&Tensor; 4],
) -> Result<()> {
    let (n, h) = check_pair(g, u)?;
    let dev = g.device();
    let blocks = forward_blocks(n);
    check_tensor("gating h", out, Kind::BFloat16, &[n, h], dev)?;
    check_tensor("gating l1_row", l1_row, Kind::Float, &[n], dev)?;
    check_tensor("gating row_cnt", row_cnt, Kind::Int, &[n], dev)?;
    check_tensor("gating blk_cnt", blk_cnt, Kind::Uint8, &[blocks, h], dev)?;
    if n == 0 {
        return Ok(());
    }
    let k = GatingKernels::for_device(dev)?;
    let stream = k.tw.bind(dev)?;
    let launch = LaunchShape::on(stream)((blocks as u32, 1), GATING_THREADS, 0);
    // SAFETY: every tensor checked above: g and u [N, H] bf16 contiguous with H % 8 == 0,
    // the outputs of the shapes the kernel writes (blk_cnt one row per block), one device.
    unsafe {
        gating_fwd(
            &k.fwd,
            launch,
            ptr(g),
            ptr(u),
            ptr(out),
            ptr(l1_row),
            ptr(row_cnt),
            ptr(blk_cnt),
            n as i32,
            h as i32,
        )
    }
}

/// The backward: `(dg, du, h)` for the pre-activations `g, u` and the gradient `dh` of `h`
/// (`[N, H]` bf16), `dl1` the gradient of the summed L1 (a one-element f32 tensor on the
/// device, read there: no host synchronisation). `h` is the forward's, recomputed.
pub fn gating_backward(
    g: &Tensor,
    u: &Tensor,
    dh: &Tensor,
    dl1: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let empty = || Tensor::f_empty(g.size(), (Kind::BFloat16, g.device()));
    let (dg, du, hv) = (empty()?, empty()?, empty()?);
    gating_backward_into(g, u, dh, dl1, [&dg, &du, &hv])?;
    Ok((dg, du, hv))
}

/// The backward into given `[N, H]` bf16 buffers `dg, du, h` (every element written).
pub fn gating_backward_into(
    g: &Tensor,
    u: &Tensor,
    dh: &Tensor,
    dl1: &Tensor,
    [dg, du, hv]: [&Tensor; 3],
) -> Result<()> {
    let (n, h) = check_pair(g, u)?;
    let dev = g.device();
    for (name, t) in [("dh", dh), ("dg", dg), ("du", du), ("h", hv)] {
        check_tensor(&format!("gating {name}"), t, Kind::BFloat16, &[n, h], dev)?;
    }
    check_device_scalar("gating dl1", dl1, dev)?;
    let granules = n * h / 8;
    if granules == 0 {
        return Ok(());
    }
    let k = GatingKernels::for_device(dev)?;
    let stream = k.tw.bind(dev)?;
    // A few waves of resident blocks; the kernel strides over the rest.
    let blocks = ((granules + GATING_THREADS - 1) / GATING_THREADS).min(TUNED_SMS * 16);
    let launch = LaunchShape::on(stream)((blocks as u32, 1), GATING_THREADS, 0);
    // SAFETY: every tensor checked above ([N, H] bf16 contiguous, H % 8 == 0, dl1 one f32
    // on the device).
    unsafe {
        gating_bwd(
            &k.bwd,
            launch,
            ptr(g),
            ptr(u),
            ptr(dh),
            ptr(dl1),
            ptr(dg),
            ptr(du),
            ptr(hv),
            granules,
        )
    }
}
