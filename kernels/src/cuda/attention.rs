//! Launches `kernels/cuda/attention.cu` on tch CUDA tensors, on tch's current stream: the
//! attention of one new token per sequence over the KV cache, keys `0..=pos` with `pos`
//! read on the device (a captured decode step serves every position, and reads only the
//! keys that exist, not the whole cache under a mask).
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaFunction, CudaModule};
use tch::{Device, Kind, Tensor};

use super::consts::ATTN_THREADS;
use super::image::load_image;
use super::launch::{
    check_tensor, decode_attention, load_once, ptr, LaunchShape, PerDevice, TUNED_SMS,
};
use super::twell::TwellKernels;
use super::{CudaKernelError, Result};

/// The attention module of one device (in the TwELL module's context).
pub struct AttentionKernels {
    tw: Arc<TwellKernels>,
    _module: Arc<CudaModule>,
    decode: CudaFunction,
}

impl AttentionKernels {
    fn load(ordinal: usize) -> Result<Self> {
        let tw = TwellKernels::for_device(Device::Cuda(ordinal))?;
        let (module, _) = load_image(&tw.ctx, "attention")?;
        Ok(Self {
            decode: module.load_function("decode_attention")?,
            _module: module,
            tw,
        })
    }

    /// The loaded module of `device`, loaded once per process.
    pub fn for_device(device: Device) -> Result<Arc<AttentionKernels>> {
        static LOADED: PerDevice<AttentionKernels> = OnceLock::new();
        load_once(&LOADED, device, AttentionKernels::load)
    }
}

/// Whether the kernel takes heads of width `head_dim` with `heads` query heads over
/// `kv_heads` key/value heads.
pub fn decode_attention_supports(head_dim: i64, heads: i64, kv_heads: i64) -> bool {
    [32, 64, 128].contains(&head_dim) && kv_heads > 0 && heads % kv_heads == 0
}

/// `out: [B, heads * hd]` (bf16, token-major) = the attention of `q: [B, heads, 1, hd]` over
/// keys and values `0..=pos` of `k_cache, v_cache: [B, kv_heads, capacity, hd]`, with `pos`
/// the int64 scalar tensor `pos` (clamped to the cache), softmax scale `scale`.
pub fn decode_attention_into(
    q: &Tensor,
    (k_cache, v_cache): (&Tensor, &Tensor),
    pos: &Tensor,
    scale: f64,
    out: &Tensor,
) -> Result<()> {
    let qs = q.size();
    let ks = k_cache.size();
    if qs.len() != 4 || ks.len() != 4 || qs[2] != 1 {
        return Err(CudaKernelError::Shape(format!(
            "decode attention: q {qs:?} must be [B, heads, 1, hd], caches {ks:?} [B, kv_heads, capacity, hd]"
        )));
    }
    let (b, nh, hd) = (qs[0], qs[1], qs[3]);
    let (nkv, cap) = (ks[1], ks[2]);
    if !decode_attention_supports(hd, nh, nkv) || cap < 1 {
        return Err(CudaKernelError::Shape(format!(
            "decode attention: head_dim {hd} (32, 64 or 128), heads {nh} over {nkv}, capacity {cap}"
        )));
    }
    let dev = q.device();
    let bf = Kind::BFloat16;
    check_tensor("decode attention q", q, bf, &[b, nh, 1, hd], dev)?;
    check_tensor(
        "decode attention k_cache",
        k_cache,
        bf,
        &[b, nkv, cap, hd],
        dev,
    )?;
    check_tensor(
        "decode attention v_cache",
        v_cache,
        bf,
        &[b, nkv, cap, hd],
        dev,
    )?;
    check_tensor("decode attention pos", pos, Kind::Int64, &[], dev)?;
    check_tensor("decode attention out", out, bf, &[b, nh * hd], dev)?;
    let k = AttentionKernels::for_device(dev)?;
    let stream = k.tw.bind(dev)?;
    // Full blocks while there are few (batch 1: 32 blocks, each over up to 256 keys a
    // pass); past about two blocks an SM, two warps a block (measured at batch 32, 1024
    // blocks: 45 us a layer with full blocks, which fit one an SM).
    let threads = if b * nh < 2 * TUNED_SMS {
        ATTN_THREADS
    } else {
        64
    };
    let shape = LaunchShape::on(stream)(((b * nh) as u32, 1), threads, 0);
    // SAFETY: every tensor checked above (bf16 contiguous of the shapes the kernel indexes,
    // `pos` one int64, all on one device); the kernel clamps the position to the capacity.
    unsafe {
        decode_attention(
            &k.decode,
            shape,
            ptr(q),
            ptr(k_cache),
            ptr(v_cache),
            ptr(pos),
            ptr(out),
            nh as i32,
            nkv as i32,
            hd as i32,
            cap as i32,
            scale as f32,
        )
    }
}
