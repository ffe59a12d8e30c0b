//! Launches `kernels/cuda/rope.cu` on tch CUDA tensors, on tch's current stream: RoPE on q
//! and k fused with the head split of the stacked qkv projection, forward and backward (one
//! pass each). The autograd op around them is `crate::fused::rope`.
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaFunction, CudaModule};
use tch::{Device, Kind, Tensor};

use super::consts::ROPE_THREADS;
use super::image::load_image;
use super::launch::{
    check_tensor, load_once, ptr, rope_qkv_bwd, rope_qkv_cache, rope_qkv_fwd, LaunchShape,
    PerDevice,
};
use super::twell::TwellKernels;
use super::{CudaKernelError, Result};

/// The rope module of one device (in the TwELL module's context).
pub struct RopeKernels {
    tw: Arc<TwellKernels>,
    _module: Arc<CudaModule>,
    fwd: CudaFunction,
    bwd: CudaFunction,
    cache: CudaFunction,
}

impl RopeKernels {
    fn load(ordinal: usize) -> Result<Self> {
        let tw = TwellKernels::for_device(Device::Cuda(ordinal))?;
        let (module, _) = load_image(&tw.ctx, "rope")?;
        Ok(Self {
            fwd: module.load_function("rope_qkv_fwd")?,
            bwd: module.load_function("rope_qkv_bwd")?,
            cache: module.load_function("rope_qkv_cache")?,
            _module: module,
            tw,
        })
    }

    /// The loaded module of `device`, loaded once per process.
    pub fn for_device(device: Device) -> Result<Arc<RopeKernels>> {
        static LOADED: PerDevice<RopeKernels> = OnceLock::new();
        load_once(&LOADED, device, RopeKernels::load)
    }
}

/// The head layout of one call: `heads` query heads and `kv_heads` key/value heads of width
/// `head_dim`, over `t_len` positions starting at `pos0`.
#[derive(Clone, Copy, Debug)]
pub struct RopeShape {
    pub batch: i64,
    pub t_len: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub pos0: i64,
}

impl RopeShape {
    fn width(&self) -> i64 {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Checks the tables cover the positions and every tensor is as the kernels read it.
    fn check(
        &self,
        tables: (&Tensor, &Tensor),
        tensors: &[(&str, &Tensor, Vec<i64>)],
    ) -> Result<()> {
        let bad = |m: String| Err(CudaKernelError::Shape(format!("rope: {m}")));
        if self.head_dim % 2 != 0 || self.head_dim < 2 {
            return bad(format!("head_dim {} must be even", self.head_dim));
        }
        for (name, t) in [("cos", tables.0), ("sin", tables.1)] {
            let s = t.size();
            if t.kind() != Kind::Float
                || !t.is_contiguous()
                || s.len() != 2
                || s[1] != self.head_dim
            {
                return bad(format!(
                    "{name} must be f32 contiguous [positions, {}], got {:?} {s:?}",
                    self.head_dim,
                    t.kind()
                ));
            }
            if s[0] < self.pos0 + self.t_len {
                return bad(format!(
                    "{name} has {} positions, {} + {} needed",
                    s[0], self.pos0, self.t_len
                ));
            }
        }
        let device = tables.0.device();
        for (name, t, want) in tensors {
            check_tensor(&format!("rope {name}"), t, Kind::BFloat16, want, device)?;
        }
        Ok(())
    }

    fn launch_shape(&self, k: &RopeKernels, device: Device) -> Result<LaunchShape> {
        let stream = k.tw.bind(device)?;
        Ok(LaunchShape::on(stream)(
            ((self.batch * self.t_len) as u32, 1),
            ROPE_THREADS,
            0,
        ))
    }

    fn args(&self) -> (i32, i32, i32, i32, i32) {
        (
            self.t_len as i32,
            self.heads as i32,
            self.kv_heads as i32,
            self.head_dim as i32,
            self.pos0 as i32,
        )
    }
}

/// `q, k, v` (token-major `[B, T, heads, hd]`, q and k rotated) from `qkv: [B, T, width]`,
/// written into the given outputs.
pub fn rope_qkv_forward_into(
    qkv: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    s: &RopeShape,
    [q, k, v]: [&Tensor; 3],
) -> Result<()> {
    let (b, t, hd) = (s.batch, s.t_len, s.head_dim);
    s.check(
        (cos, sin),
        &[
            ("qkv", qkv, vec![b, t, s.width()]),
            ("q", q, vec![b, t, s.heads, hd]),
            ("k", k, vec![b, t, s.kv_heads, hd]),
            ("v", v, vec![b, t, s.kv_heads, hd]),
        ],
    )?;
    let kern = RopeKernels::for_device(qkv.device())?;
    let shape = s.launch_shape(&kern, qkv.device())?;
    let (tl, nh, nkv, hdi, p0) = s.args();
    // SAFETY: every tensor was checked above: bf16 contiguous of the shapes the kernel
    // indexes, the tables f32 covering the positions, all on one device.
    unsafe {
        rope_qkv_fwd(
            &kern.fwd,
            shape,
            ptr(qkv),
            ptr(cos),
            ptr(sin),
            ptr(q),
            ptr(k),
            ptr(v),
            tl,
            nh,
            nkv,
            hdi,
            p0,
        )
    }
}

/// The gradient of `qkv` from those of `q, k, v` (token-major, as the forward wrote them),
/// written into `dqkv: [B, T, width]`.
pub fn rope_qkv_backward_into(
    [dq, dk, dv]: [&Tensor; 3],
    (cos, sin): (&Tensor, &Tensor),
    s: &RopeShape,
    dqkv: &Tensor,
) -> Result<()> {
    let (b, t, hd) = (s.batch, s.t_len, s.head_dim);
    s.check(
        (cos, sin),
        &[
            ("dq", dq, vec![b, t, s.heads, hd]),
            ("dk", dk, vec![b, t, s.kv_heads, hd]),
            ("dv", dv, vec![b, t, s.kv_heads, hd]),
            ("dqkv", dqkv, vec![b, t, s.width()]),
        ],
    )?;
    let kern = RopeKernels::for_device(dqkv.device())?;
    let shape = s.launch_shape(&kern, dqkv.device())?;
    let (tl, nh, nkv, hdi, p0) = s.args();
    // SAFETY: as in `rope_qkv_forward_into`.
    unsafe {
        rope_qkv_bwd(
            &kern.bwd,
            shape,
            ptr(dq),
            ptr(dk),
            ptr(dv),
            ptr(cos),
            ptr(sin),
            ptr(dqkv),
            tl,
            nh,
            nkv,
            hdi,
            p0,
        )
    }
}

/// The inference form: `q: [B, heads, T, hd]` rotated, and k rotated and v written into
/// `k_cache, v_cache: [B, kv_heads, capacity, hd]` at positions `pos..pos + T`, with `pos`
/// the int64 scalar tensor `pos` read on the device (a captured decode step replays at every
/// position). `s.pos0` is ignored: the position is `pos`'s value. Positions past the cache
/// or the tables are not written.
pub fn rope_qkv_cache_into(
    qkv: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    s: &RopeShape,
    pos: &Tensor,
    q: &Tensor,
    [k_cache, v_cache]: [&Tensor; 2],
) -> Result<()> {
    let (b, t, hd) = (s.batch, s.t_len, s.head_dim);
    let capacity = k_cache.size().get(2).copied().unwrap_or(0);
    let at0 = RopeShape { pos0: 0, ..*s };
    at0.check(
        (cos, sin),
        &[
            ("qkv", qkv, vec![b, t, s.width()]),
            ("q", q, vec![b, s.heads, t, hd]),
            ("k_cache", k_cache, vec![b, s.kv_heads, capacity, hd]),
            ("v_cache", v_cache, vec![b, s.kv_heads, capacity, hd]),
        ],
    )?;
    check_tensor("rope pos", pos, Kind::Int64, &[], qkv.device())?;
    let kern = RopeKernels::for_device(qkv.device())?;
    let stream = kern.tw.bind(qkv.device())?;
    let pairs = (s.heads + 2 * s.kv_heads) * hd / 2;
    let chunks = (pairs + ROPE_THREADS - 1) / ROPE_THREADS;
    let shape = LaunchShape::on(stream)(((b * t) as u32, chunks as u32), ROPE_THREADS, 0);
    let (tl, nh, nkv, hdi, _) = s.args();
    // SAFETY: every tensor was checked above: bf16 contiguous of the shapes the kernel
    // indexes, `pos` one int64 on the device, the tables f32; the kernel bounds each row's
    // position by the cache's capacity and the tables' rows before writing.
    unsafe {
        rope_qkv_cache(
            &kern.cache,
            shape,
            ptr(qkv),
            ptr(cos),
            ptr(sin),
            ptr(q),
            ptr(k_cache),
            ptr(v_cache),
            ptr(pos),
            tl,
            nh,
            nkv,
            hdi,
            capacity as i32,
            cos.size()[0] as i32,
        )
    }
}
