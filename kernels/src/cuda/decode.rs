//! Launches `kernels/cuda/decode.cu` on tch CUDA tensors, on tch's current stream: the
//! products of a decode step, a few token rows (up to `DECODE_MAX_TOKENS`) against whole
//! weight matrices, streamed once at the card's bandwidth. [`decode_linear`] is `x W^T`;
//! [`decode_ffn`] the sparse FFN in two launches (the gate with the up product of the units
//! that fire, then the down product of those units), with the TwELL path's values.
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaFunction, CudaModule};
use tch::{Device, Kind, Tensor};

use super::consts::{
    DECODE_DOWN_GRANULES, DECODE_DOWN_THREADS, DECODE_MAX_TOKENS, DECODE_THREADS, DECODE_WARP_ROWS,
};
use super::image::load_image;
use super::launch::{
    check_tensor, decode_down_rows, decode_gate_up_tokens, decode_linear_tokens, load_once, ptr,
    DevPtr, LaunchShape, PerDevice,
};
use super::twell::TwellKernels;
use super::{CudaKernelError, Result};

/// The decode module of one device (in the TwELL module's context).
pub struct DecodeKernels {
    tw: Arc<TwellKernels>,
    _module: Arc<CudaModule>,
    /// Entries for 1, 2, 4 and 8 token rows (`token_entry`).
    linear: [CudaFunction; 4],
    gate_up: [CudaFunction; 4],
    down: CudaFunction,
}

impl DecodeKernels {
    fn load(ordinal: usize) -> Result<Self> {
        let tw = TwellKernels::for_device(Device::Cuda(ordinal))?;
        let (module, _) = load_image(&tw.ctx, "decode")?;
        let four = |stem: &str| -> Result<[CudaFunction; 4]> {
            Ok([
                module.load_function(&format!("{stem}_t1"))?,
                module.load_function(&format!("{stem}_t2"))?,
                module.load_function(&format!("{stem}_t4"))?,
                module.load_function(&format!("{stem}_t8"))?,
            ])
        };
        Ok(Self {
            linear: four("decode_linear")?,
            gate_up: four("decode_gate_up")?,
            down: module.load_function("decode_down")?,
            _module: module,
            tw,
        })
    }

    /// The loaded module of `device`, loaded once per process.
    pub fn for_device(device: Device) -> Result<Arc<DecodeKernels>> {
        static LOADED: PerDevice<DecodeKernels> = OnceLock::new();
        load_once(&LOADED, device, DecodeKernels::load)
    }
}

/// Whether the kernels take `n` token rows of width `d`.
pub fn decode_supports(n: i64, d: i64) -> bool {
    (1..=DECODE_MAX_TOKENS).contains(&n) && d >= 8 && d % 8 == 0
}

/// Rows up to which inference takes the decode kernels rather than the GEMMs and the TwELL
/// kernels: `bench ffn --mode infer` (1.5b, H200) has the decode FFN at 0.021 / 0.026 / 0.054
/// ms against TwELL's 0.032 / 0.032 / 0.035 at N = 1 / 2 / 8 (the token rows are read from L1
/// once per weight granule and token, so the kernels slow down as N grows).
pub const DECODE_DISPATCH_TOKENS: i64 = 2;

/// Whether inference takes the decode kernels for `n` rows of width `d`.
pub fn decode_dispatch(n: i64, d: i64) -> bool {
    n <= DECODE_DISPATCH_TOKENS && decode_supports(n, d)
}

/// The entry that takes `n` rows: the fewest of 1, 2, 4, 8.
fn token_entry(n: i64) -> usize {
    (n.max(1) as u64).next_power_of_two().trailing_zeros() as usize
}

/// Columns of the FFN's `h` scratch for `h` units (a multiple of 4: the down kernel reads it
/// in float4).
pub fn decode_h_width(h: i64) -> i64 {
    (h + 3) / 4 * 4
}

fn rows_grid(rows: i64) -> (u32, u32) {
    let per_block = DECODE_THREADS / 32 * DECODE_WARP_ROWS;
    (((rows + per_block - 1) / per_block) as u32, 1)
}

/// That `n` rows of width `d` are supported and every tensor is 16-byte aligned.
fn check_shape(what: &str, n: i64, d: i64, tensors: &[&Tensor]) -> Result<()> {
    if !decode_supports(n, d) {
        return Err(CudaKernelError::Shape(format!(
            "{what}: {n} rows of width {d}; the decode kernels take 1..={DECODE_MAX_TOKENS} rows \
             of a width that is a multiple of 8"
        )));
    }
    if let Some(t) = tensors.iter().find(|t| !ptr(t).is_multiple_of(16)) {
        return Err(CudaKernelError::Shape(format!(
            "{what}: a {:?} tensor is not 16-byte aligned (a view at an odd offset)",
            t.size()
        )));
    }
    Ok(())
}

/// `y = x W^T` into `y: [N, O]` bf16, for `x: [N, D]` and `w: [O, D]` bf16 contiguous.
pub fn decode_linear_into(x: &Tensor, w: &Tensor, y: &Tensor) -> Result<()> {
    let (n, d) = x.size2()?;
    let o = w.size2()?.0;
    let dev = x.device();
    let bf = Kind::BFloat16;
    check_tensor("decode linear x", x, bf, &[n, d], dev)?;
    check_tensor("decode linear w", w, bf, &[o, d], dev)?;
    check_tensor("decode linear y", y, bf, &[n, o], dev)?;
    check_shape("decode linear", n, d, &[x, w, y])?;
    let k = DecodeKernels::for_device(dev)?;
    let shape = LaunchShape::on(k.tw.bind(dev)?)(rows_grid(o), DECODE_THREADS, 0);
    // SAFETY: shapes, dtypes, contiguity, device and alignment checked above.
    unsafe {
        decode_linear_tokens(
            &k.linear[token_entry(n)],
            shape,
            ptr(x),
            ptr(w),
            ptr(y),
            n as i32,
            d as i32,
            o as i32,
        )
    }
}

/// `x W^T` as a new `[N, O]` bf16 tensor (see [`decode_linear_into`]).
pub fn decode_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let y = Tensor::f_empty([x.size2()?.0, w.size2()?.0], (Kind::BFloat16, x.device()))?;
    decode_linear_into(x, w, &y)?;
    Ok(y)
}

/// The sparse FFN `y = (bf16(relu(x Wg^T)) * (x Wu^T)) WdT` into `y: [N, D]` bf16, through
/// the f32 scratch `h: [N, decode_h_width(H)]` (which holds h after the call), for
/// `x: [N, D]` and `Wg, Wu, WdT: [H, D]` bf16 contiguous.
pub fn decode_ffn_into(
    x: &Tensor,
    [wg, wu, wdt]: [&Tensor; 3],
    h: &Tensor,
    y: &Tensor,
) -> Result<()> {
    let (n, d) = x.size2()?;
    let units = wg.size2()?.0;
    let ldh = decode_h_width(units);
    let dev = x.device();
    let bf = Kind::BFloat16;
    check_tensor("decode ffn x", x, bf, &[n, d], dev)?;
    for (name, w) in [("wg", wg), ("wu", wu), ("wdt", wdt)] {
        check_tensor(&format!("decode ffn {name}"), w, bf, &[units, d], dev)?;
    }
    check_tensor("decode ffn h", h, Kind::Float, &[n, ldh], dev)?;
    check_tensor("decode ffn y", y, bf, &[n, d], dev)?;
    check_shape("decode ffn", n, d, &[x, wg, wu, wdt, h, y])?;
    let k = DecodeKernels::for_device(dev)?;
    let on = LaunchShape::on(k.tw.bind(dev)?);
    let down_grid = (
        ((d / 8 + DECODE_DOWN_GRANULES - 1) / DECODE_DOWN_GRANULES) as u32,
        n as u32,
    );
    let (xp, hp, yp): (DevPtr, DevPtr, DevPtr) = (ptr(x), ptr(h), ptr(y));
    let (n, d, units, ldh) = (n as i32, d as i32, units as i32, ldh as i32);
    // SAFETY: as in `decode_linear_into`; h is [N, ldh] f32 with ldh >= H, ldh % 4 == 0.
    unsafe {
        decode_gate_up_tokens(
            &k.gate_up[token_entry(n as i64)],
            on(rows_grid(units as i64), DECODE_THREADS, 0),
            xp,
            ptr(wg),
            ptr(wu),
            hp,
            n,
            d,
            units,
            ldh,
        )?;
        decode_down_rows(
            &k.down,
            on(down_grid, DECODE_DOWN_THREADS, 0),
            hp,
            ptr(wdt),
            yp,
            n,
            d,
            units,
            ldh,
        )
    }
}

/// The sparse FFN of [`decode_ffn_into`] as a new `[N, D]` bf16 tensor.
pub fn decode_ffn(x: &Tensor, wg: &Tensor, wu: &Tensor, wdt: &Tensor) -> Result<Tensor> {
    let (n, d) = x.size2()?;
    let units = wg.size2()?.0;
    let h = Tensor::f_empty([n, decode_h_width(units)], (Kind::Float, x.device()))?;
    let y = Tensor::f_empty([n, d], (Kind::BFloat16, x.device()))?;
    decode_ffn_into(x, [wg, wu, wdt], &h, &y)?;
    Ok(y)
}
