//! Launches `kernels/cuda/norm.cu` on tch CUDA tensors, on tch's current stream: the residual
//! add fused with RMSNorm (fp32 stream in, bf16 normed rows out), forward and backward in one
//! pass each. The autograd op around them is `crate::fused::norm`.
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaFunction, CudaModule};
use tch::{Device, Kind, Tensor};

use super::consts::{NORM_MAX_GRANULES, NORM_ROWS, NORM_THREADS};
use super::image::load_image;
use super::launch::{
    add_rms_norm_bwd, add_rms_norm_fwd, check_tensor, load_once, ptr, LaunchShape, PerDevice,
};
use super::twell::TwellKernels;
use super::{CudaKernelError, Result};

/// The norm module of one device (in the TwELL module's context).
pub struct NormKernels {
    tw: Arc<TwellKernels>,
    _module: Arc<CudaModule>,
    fwd: CudaFunction,
    /// The backward with 1, 2, 4 and 8 granules a thread (`bwd_granules`).
    bwd: [CudaFunction; 4],
}

impl NormKernels {
    fn load(ordinal: usize) -> Result<Self> {
        let tw = TwellKernels::for_device(Device::Cuda(ordinal))?;
        let (module, _) = load_image(&tw.ctx, "norm")?;
        Ok(Self {
            fwd: module.load_function("add_rms_norm_fwd")?,
            bwd: [
                module.load_function("add_rms_norm_bwd_g1")?,
                module.load_function("add_rms_norm_bwd_g2")?,
                module.load_function("add_rms_norm_bwd_g4")?,
                module.load_function("add_rms_norm_bwd_g8")?,
            ],
            _module: module,
            tw,
        })
    }

    /// The loaded module of `device`, loaded once per process.
    pub fn for_device(device: Device) -> Result<Arc<NormKernels>> {
        static LOADED: PerDevice<NormKernels> = OnceLock::new();
        load_once(&LOADED, device, NormKernels::load)
    }
}

/// Whether the kernels take rows of width `d`.
pub fn norm_supports(d: i64) -> bool {
    d >= 4 && d % 4 == 0 && d <= NORM_THREADS * 4 * NORM_MAX_GRANULES
}

/// Blocks of a backward launch over `n` rows (and rows of its partial weight gradients).
pub fn norm_blocks(n: i64) -> i64 {
    (n + NORM_ROWS - 1) / NORM_ROWS
}

/// Which backward entry takes rows of width `d`: the fewest 4-column granules a thread, a
/// power of two, that cover the row (`norm_supports(d)` bounds it by NORM_MAX_GRANULES).
fn bwd_entry(d: i64) -> usize {
    let granules = (d / 4 + NORM_THREADS - 1) / NORM_THREADS;
    (granules.max(1) as u64)
        .next_power_of_two()
        .trailing_zeros() as usize
}

/// Rows per block of the forward over `n` rows: NORM_ROWS at training sizes, fewer (down to
/// one a block) when rows are few, so that a decode step's rows run on as many SMs
/// (measured at 32 rows of 2048: 19 us a launch with 16 rows a block).
fn forward_rows(n: i64) -> i64 {
    (n / FORWARD_SPREAD_BLOCKS).clamp(1, NORM_ROWS)
}

/// Blocks the forward aims at when rows are few (about two per SM of an H100/H200).
const FORWARD_SPREAD_BLOCKS: i64 = 264;

fn check(tensors: &[(&str, Option<&Tensor>, Kind, Vec<i64>)], device: Device) -> Result<()> {
    for (name, t, kind, want) in tensors {
        if let Some(t) = t {
            check_tensor(&format!("add_rms_norm {name}"), t, *kind, want, device)?;
        }
    }
    Ok(())
}

fn nullable(t: Option<&Tensor>) -> u64 {
    t.map_or(0, ptr)
}

fn shape(k: &NormKernels, device: Device, blocks: i64) -> Result<LaunchShape> {
    let stream = k.tw.bind(device)?;
    Ok(LaunchShape::on(stream)((blocks as u32, 1), NORM_THREADS, 0))
}

/// `x_new = x + delta` (delta optional) and `y = bf16(w * x_new / rms(x_new))` with the
/// per-row `rstd`, for `x: [N, D]` f32, `delta: [N, D]` bf16, `w: [D]` f32, into the given
/// outputs (`x_new` f32, `y` bf16 `[N, D]`, `rstd` f32 `[N]`).
pub fn add_rms_norm_forward_into(
    x: &Tensor,
    delta: Option<&Tensor>,
    w: &Tensor,
    eps: f64,
    [x_new, y, rstd]: [&Tensor; 3],
) -> Result<()> {
    let (n, d) = x.size2()?;
    if !norm_supports(d) {
        return Err(CudaKernelError::Shape(format!(
            "add_rms_norm: width {d} not supported"
        )));
    }
    let dev = x.device();
    let (f, b) = (Kind::Float, Kind::BFloat16);
    check(
        &[
            ("x", Some(x), f, vec![n, d]),
            ("delta", delta, b, vec![n, d]),
            ("w", Some(w), f, vec![d]),
            ("x_new", Some(x_new), f, vec![n, d]),
            ("y", Some(y), b, vec![n, d]),
            ("rstd", Some(rstd), f, vec![n]),
        ],
        dev,
    )?;
    let k = NormKernels::for_device(dev)?;
    let rows = forward_rows(n);
    let launch = shape(&k, dev, (n + rows - 1) / rows)?;
    // SAFETY: every tensor checked above (dtype, contiguous, shape, device); delta may be null.
    unsafe {
        add_rms_norm_fwd(
            &k.fwd,
            launch,
            ptr(x),
            nullable(delta),
            ptr(w),
            ptr(x_new),
            ptr(y),
            ptr(rstd),
            n as i32,
            d as i32,
            eps as f32,
            rows as i32,
        )
    }
}

/// The backward into `g_x: [N, D]` f32, `g_delta` (bf16, optional) and `dw_part:
/// [norm_blocks(N), D]` f32 (summed over rows by the caller), from `g_x_new` (optional) and
/// `g_y: [N, D]` bf16 and the forward's `x_new`, `w`, `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_backward_into(
    g_x_new: Option<&Tensor>,
    g_y: &Tensor,
    x_new: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    g_x: &Tensor,
    g_delta: Option<&Tensor>,
    dw_part: &Tensor,
) -> Result<()> {
    let (n, d) = x_new.size2()?;
    if !norm_supports(d) {
        return Err(CudaKernelError::Shape(format!(
            "add_rms_norm: width {d} not supported"
        )));
    }
    let dev = x_new.device();
    let (f, b) = (Kind::Float, Kind::BFloat16);
    check(
        &[
            ("g_x_new", g_x_new, f, vec![n, d]),
            ("g_y", Some(g_y), b, vec![n, d]),
            ("x_new", Some(x_new), f, vec![n, d]),
            ("w", Some(w), f, vec![d]),
            ("rstd", Some(rstd), f, vec![n]),
            ("g_x", Some(g_x), f, vec![n, d]),
            ("g_delta", g_delta, b, vec![n, d]),
            ("dw_part", Some(dw_part), f, vec![norm_blocks(n), d]),
        ],
        dev,
    )?;
    let k = NormKernels::for_device(dev)?;
    let launch = shape(&k, dev, norm_blocks(n))?;
    // SAFETY: as in `add_rms_norm_forward_into`.
    unsafe {
        add_rms_norm_bwd(
            &k.bwd[bwd_entry(d)],
            launch,
            nullable(g_x_new),
            ptr(g_y),
            ptr(x_new),
            ptr(w),
            ptr(rstd),
            ptr(g_x),
            nullable(g_delta),
            ptr(dw_part),
            n as i32,
            d as i32,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backward_entry_is_the_fewest_granules_that_cover_the_row() {
        // NORM_THREADS threads of 4 columns each per granule.
        let cols = 4 * NORM_THREADS;
        assert_eq!(bwd_entry(4), 0);
        assert_eq!(bwd_entry(768), 0);
        assert_eq!(bwd_entry(cols), 0);
        assert_eq!(bwd_entry(cols + 4), 1);
        assert_eq!(bwd_entry(2 * cols), 1);
        assert_eq!(bwd_entry(3 * cols), 2);
        assert_eq!(bwd_entry(4 * cols), 2);
        assert_eq!(bwd_entry(5 * cols), 3);
        assert_eq!(bwd_entry(NORM_MAX_GRANULES * cols), 3);
    }
}
