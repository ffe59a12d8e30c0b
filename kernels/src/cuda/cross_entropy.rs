//! Launches `kernels/cuda/cross_entropy.cu` on tch CUDA tensors, on tch's current stream:
//! per-row cross-entropy of fp32 logits and the bf16 `softmax - onehot` of each row, one pass
//! over the logits. The chunked LM head around it is `crate::fused::linear_cross_entropy`.
use std::sync::{Arc, OnceLock};

use cudarc::driver::{sys, CudaFunction, CudaModule};
use tch::{Device, Kind, Tensor};

use super::consts::CE_THREADS;
use super::image::load_image;
use super::launch::{check_tensor, cross_entropy_rows, load_once, ptr, LaunchShape, PerDevice};
use super::twell::TwellKernels;
use super::Result;

/// The cross-entropy module of one device (in the TwELL module's context).
pub struct CrossEntropyKernels {
    tw: Arc<TwellKernels>,
    _module: Arc<CudaModule>,
    /// The row kept in shared memory, for rows of at most `cached_bytes`.
    cached: CudaFunction,
    uncached: CudaFunction,
    cached_bytes: i64,
}

impl CrossEntropyKernels {
    fn load(ordinal: usize) -> Result<Self> {
        let tw = TwellKernels::for_device(Device::Cuda(ordinal))?;
        let (module, _) = load_image(&tw.ctx, "cross_entropy")?;
        // The most dynamic shared memory a block may opt into, less the kernel's static
        // reduction buffer.
        let optin = tw.ctx.attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )? as i64;
        let cached_bytes = optin - CE_THREADS / 32 * 4;
        let cached = module.load_function("cross_entropy_rows_smem")?;
        cached.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            cached_bytes as i32,
        )?;
        Ok(Self {
            uncached: module.load_function("cross_entropy_rows_global")?,
            cached,
            cached_bytes,
            _module: module,
            tw,
        })
    }

    /// The loaded module of `device`, loaded once per process.
    pub fn for_device(device: Device) -> Result<Arc<CrossEntropyKernels>> {
        static LOADED: PerDevice<CrossEntropyKernels> = OnceLock::new();
        load_once(&LOADED, device, CrossEntropyKernels::load)
    }
}

/// For `logits: [C, V]` f32 and `targets: [C]` int64 (< 0: ignored), writes `loss: [C]` f32
/// (`logsumexp(row) - row[target]`, 0 for an ignored row, NaN for a target >= V) and, when
/// given, `grad: [C, V]` bf16 (`softmax(row) - onehot(target)`, zero for an ignored row).
pub fn cross_entropy_rows_into(
    logits: &Tensor,
    targets: &Tensor,
    grad: Option<&Tensor>,
    loss: &Tensor,
) -> Result<()> {
    let (c, v) = logits.size2()?;
    let dev = logits.device();
    check_tensor("cross_entropy logits", logits, Kind::Float, &[c, v], dev)?;
    check_tensor("cross_entropy targets", targets, Kind::Int64, &[c], dev)?;
    check_tensor("cross_entropy loss", loss, Kind::Float, &[c], dev)?;
    if let Some(g) = grad {
        check_tensor("cross_entropy grad", g, Kind::BFloat16, &[c, v], dev)?;
    }
    if c == 0 {
        return Ok(());
    }
    let k = CrossEntropyKernels::for_device(dev)?;
    let stream = k.tw.bind(dev)?;
    let row_bytes = v * 4;
    let (f, smem) = if row_bytes <= k.cached_bytes {
        (&k.cached, row_bytes as u32)
    } else {
        (&k.uncached, 0)
    };
    let launch = LaunchShape::on(stream)((c as u32, 1), CE_THREADS, smem);
    // SAFETY: every tensor checked above (dtype, contiguous, shape, device); grad may be null.
    unsafe {
        cross_entropy_rows(
            f,
            launch,
            ptr(logits),
            ptr(targets),
            grad.map_or(0, ptr),
            ptr(loss),
            v as i32,
        )
    }
}
