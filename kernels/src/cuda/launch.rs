//! Launch primitives: the per-device cache of loaded modules, tch's current stream, TMA
//! descriptors, and one typed launcher per kernel family.
//!
//! Every launcher is declared once in [`kernels!`] with the kernel's parameter list; the macro
//! writes the typed `unsafe fn` and its row of [`KERNEL_SIGNATURES`] (entry names, parameter
//! sizes), which a test checks against the `.entry` lists of the PTX NVRTC compiles from
//! `kernels/cuda`, so an argument added on one side only fails CI on a machine without a GPU.
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, CudaModule};
use tch::{Device, Kind, Tensor};

use super::consts::WGMMA_K_TILE;
use super::{CudaKernelError, Result};

/// A device pointer as the kernels take it.
pub(super) type DevPtr = u64;

/// The device address of a tensor's data.
pub(super) fn ptr(t: &Tensor) -> DevPtr {
    t.data_ptr() as DevPtr
}

/// That `t` is a contiguous `kind` tensor of `shape` on `device`, as a kernel indexes it;
/// otherwise a shape error naming it (`name`) and what it is.
pub(super) fn check_tensor(
    name: &str,
    t: &Tensor,
    kind: Kind,
    shape: &[i64],
    device: Device,
) -> Result<()> {
    if t.size() == shape && t.kind() == kind && t.is_contiguous() && t.device() == device {
        return Ok(());
    }
    Err(CudaKernelError::Shape(format!(
        "{name}: {:?} {:?} on {:?}, want {shape:?} {kind:?} contiguous on {device:?}",
        t.size(),
        t.kind(),
        t.device()
    )))
}

/// Checks that `t` is one contiguous f32 on `device` (a scalar the kernel reads there, such
/// as the L1 gradient: no host synchronisation).
pub(super) fn check_device_scalar(name: &str, t: &Tensor, device: Device) -> Result<()> {
    if t.numel() == 1 && t.kind() == Kind::Float && t.device() == device && t.is_contiguous() {
        return Ok(());
    }
    Err(CudaKernelError::Shape(format!(
        "{name}: {:?} {:?} on {:?}, want one contiguous f32 on {device:?}",
        t.size(),
        t.kind(),
        t.device()
    )))
}

/// SMs of the card the launch shapes are tuned for (H100/H200: 132).
pub(super) const TUNED_SMS: i64 = 132;

/// Kernels loaded once per process and device.
pub(super) type PerDevice<K> = OnceLock<Mutex<HashMap<usize, Arc<K>>>>;

/// The entry of `device` in `cache`, loaded by `load(ordinal)` on first use.
pub(super) fn load_once<K>(
    cache: &PerDevice<K>,
    device: Device,
    load: fn(usize) -> Result<K>,
) -> Result<Arc<K>> {
    let ordinal = cuda_ordinal(device)?;
    let mut map = cache
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(k) = map.get(&ordinal) {
        return Ok(k.clone());
    }
    let k = Arc::new(load(ordinal)?);
    map.insert(ordinal, k.clone());
    Ok(k)
}

pub(super) fn cuda_ordinal(device: Device) -> Result<usize> {
    match device {
        Device::Cuda(i) => {
            if tch::Cuda::is_available() {
                Ok(i)
            } else {
                Err(CudaKernelError::NoCuda)
            }
        }
        d => Err(CudaKernelError::NotCuda(d)),
    }
}

/// tch's current stream on `device`, as a driver `CUstream`.
pub(super) fn tch_stream(device: Device) -> Result<sys::CUstream> {
    crate::torch::cuda_runtime::current_stream(device)
        .map(|s| s as sys::CUstream)
        .ok_or(CudaKernelError::NotCuda(device))
}

/// The functions `names` of `module`, each allowed `smem_bytes` of dynamic shared memory
/// (past the 48 KiB default) when `smem_bytes > 0`.
pub(super) fn load_functions<const K: usize>(
    module: &Arc<CudaModule>,
    names: [&str; K],
    smem_bytes: i64,
) -> Result<[CudaFunction; K]> {
    let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    let mut out = Vec::with_capacity(K);
    for name in names {
        let f = module.load_function(name)?;
        if smem_bytes > 0 {
            f.set_attribute(attr, smem_bytes as i32)?;
        }
        out.push(f);
    }
    match out.try_into() {
        Ok(functions) => Ok(functions),
        Err(_) => unreachable!("one function per name"),
    }
}

/// Largest D a token-row kernel of `threads` threads takes with `granules` 16-byte granules
/// of the output row per thread.
pub(super) fn row_kernel_max_d(threads: i64, granules: i64) -> i64 {
    threads * 8 * granules
}

/// Grid, block and dynamic shared memory of one launch, on tch's current stream.
#[derive(Clone, Copy, Debug)]
pub(super) struct LaunchShape {
    pub stream: sys::CUstream,
    pub grid: (u32, u32),
    pub block: i64,
    pub smem_bytes: u32,
}

impl LaunchShape {
    /// Shapes of launches on `stream`: `(grid, block, smem_bytes) -> LaunchShape`.
    pub fn on(stream: sys::CUstream) -> impl Fn((u32, u32), i64, u32) -> LaunchShape {
        move |grid, block, smem_bytes| LaunchShape {
            stream,
            grid,
            block,
            smem_bytes,
        }
    }
}

/// Launches `f` with `args` (pointers to each argument value, as `cuLaunchKernel` takes them).
///
/// # Safety
/// `args` must match the kernel's parameter list in number, order and type, and every device
/// pointer among them must be valid for what the kernel reads and writes.
unsafe fn launch(f: &CudaFunction, shape: LaunchShape, args: &mut [*mut c_void]) -> Result<()> {
    sys::cuLaunchKernel(
        f.cu_function(),
        shape.grid.0,
        shape.grid.1,
        1,
        shape.block as u32,
        1,
        1,
        shape.smem_bytes,
        shape.stream,
        args.as_mut_ptr(),
        std::ptr::null_mut(),
    )
    .result()?;
    Ok(())
}

/// A kernel family's parameter list as the launcher passes it: the `extern "C"` entries it
/// launches and the byte size of each parameter.
#[cfg(test)]
pub(crate) struct KernelSignature {
    pub launcher: &'static str,
    pub entries: &'static [&'static str],
    pub param_bytes: &'static [usize],
}

/// Declares each launcher: `name [entries] (param: Type, ...)`.
macro_rules! kernels {
    ($( $(#[$doc:meta])* $name:ident [$($entry:literal),+ $(,)?] ($($arg:ident: $ty:ty),* $(,)?); )*) => {
        $(
            $(#[$doc])*
            ///
            /// # Safety
            /// `f` is one of the entries named here, and every device pointer is valid for what
            /// the kernel reads and writes (buffers sized for the shape it is given).
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $name(f: &CudaFunction, shape: LaunchShape, $($arg: $ty),*) -> Result<()> {
                launch(f, shape, &mut [$(&$arg as *const $ty as *mut c_void),*])
            }
        )*
        /// Every launcher's signature, for the PTX check.
        #[cfg(test)]
        pub(crate) const KERNEL_SIGNATURES: &[KernelSignature] = &[
            $(KernelSignature {
                launcher: stringify!($name),
                entries: &[$($entry),+],
                param_bytes: &[$(std::mem::size_of::<$ty>()),*],
            },)*
        ];
    };
}

kernels! {
    /// twell.cu: the tiled mma.sync gate GEMM with the TwELL epilogue.
    twell_gate_gemm ["twell_gate_gemm_tw32", "twell_gate_gemm_tw64", "twell_gate_gemm_tw128"]
        (x: DevPtr, w: DevPtr, twell: DevPtr, spill: DevPtr, spill_cap: i32, ctrl: DevPtr,
         n: i32, d: i32, h: i32);
    /// twell.cu: the sm_90a TMA + wgmma gate GEMM (tensor maps over x and W).
    twell_gate_wgmma ["twell_gate_wgmma_tw32", "twell_gate_wgmma_tw64", "twell_gate_wgmma_tw128"]
        (tma_x: TmapParam, tma_w: TmapParam, twell: DevPtr, spill: DevPtr, spill_cap: i32,
         ctrl: DevPtr, n: i32, d: i32, h: i32);
    /// twell.cu: the decode gate, relu(x W^T) as dense bf16 into `g` (row stride `ldg`).
    twell_gate_skinny ["twell_gate_skinny"]
        (x: DevPtr, w: DevPtr, g: DevPtr, n: i32, d: i32, h: i32, ldg: i32, ctrl: DevPtr);
    /// twell.cu: packs the decode gate's dense rows into TwELL.
    twell_pack ["twell_pack_tw32", "twell_pack_tw64", "twell_pack_tw128"]
        (g: DevPtr, ldg: i32, twell: DevPtr, spill: DevPtr, spill_cap: i32, ctrl: DevPtr,
         n: i32, ntiles: i32);
    /// twell.cu: per-token counts and the split of heavy tokens into work items.
    twell_plan ["twell_plan"]
        (twell: DevPtr, n: i32, ntiles: i32, tw: i32, chunk: i32, tokinfo: DevPtr,
         items: DevPtr, slot_cap: i32, ctrl: DevPtr);
    /// twell.cu: the fused up + down projection (gated) or the down projection alone.
    twell_updown ["twell_updown_gated", "twell_updown_gated_wide", "twell_down", "twell_down_wide"]
        (x: DevPtr, twell: DevPtr, spill: DevPtr, wu: DevPtr, wdt: DevPtr, y: DevPtr,
         tokinfo: DevPtr, items: DevPtr, part: DevPtr, arrive: DevPtr, ctrl: DevPtr, n: i32,
         d: i32, ntiles: i32, tw: i32, chunk: i32);
    /// hybrid.cu K1: per-token and per-(block, unit) active counts.
    hyb_count ["hyb_count"]
        (twell: DevPtr, spill: DevPtr, n: i32, h: i32, ntiles: i32, tw: i32, row_cnt: DevPtr,
         blkcnt: DevPtr);
    /// hybrid.cu K2a: offsets inside each scan segment.
    hyb_segscan ["hyb_segscan"]
        (blkcnt: DevPtr, boff: DevPtr, segtot: DevPtr, nblk: i32, h: i32);
    /// hybrid.cu K2b: segment offsets and unit totals.
    hyb_unitscan ["hyb_unitscan"] (segoff: DevPtr, unit_cnt: DevPtr, nseg: i32, h: i32);
    /// hybrid.cu K3: row and unit pointers, the pool check, the units' order and spans.
    hyb_scan ["hyb_scan"]
        (row_cnt: DevPtr, row_ptr: DevPtr, unit_cnt: DevPtr, unit_ptr: DevPtr, uspan: DevPtr,
         n: i32, h: i32, cap: i32, gctrl: DevPtr, hctrl: DevPtr);
    /// hybrid.cu K4: fills the CSR and its transpose.
    hyb_fill ["hyb_fill"]
        (twell: DevPtr, spill: DevPtr, n: i32, h: i32, ntiles: i32, tw: i32, row_ptr: DevPtr,
         unit_ptr: DevPtr, boff: DevPtr, segoff: DevPtr, hctrl: DevPtr, ecol: DevPtr,
         eg: DevPtr, cpos: DevPtr);
    /// hybrid.cu: the forward's up and down projections and per-token L1.
    hyb_fwd ["hyb_fwd", "hyb_fwd_wide"]
        (x: DevPtr, wu: DevPtr, wdt: DevPtr, row_ptr: DevPtr, ecol: DevPtr, eg: DevPtr,
         eu: DevPtr, y: DevPtr, l1_tok: DevPtr, hctrl: DevPtr, d: i32);
    /// hybrid.cu: l1_sum in a fixed order.
    hyb_l1 ["hyb_l1"] (l1_tok: DevPtr, n: i32, out: DevPtr, hctrl: DevPtr);
    /// hybrid.cu: the token-major backward (per-entry gradients and dx).
    hyb_bwd_tok ["hyb_bwd_tok", "hyb_bwd_tok_wide"]
        (dy: DevPtr, dl1: DevPtr, wg: DevPtr, wu: DevPtr, wdt: DevPtr, row_ptr: DevPtr,
         ecol: DevPtr, eg: DevPtr, eu: DevPtr, cpos: DevPtr, rec: DevPtr, dx: DevPtr, hctrl: DevPtr,
         d: i32);
    /// hybrid.cu: the unit-major weight gradients, bf16 out or added into f32.
    hyb_bwd_w ["hyb_bwd_w", "hyb_bwd_w_acc"]
        (x: DevPtr, dy: DevPtr, uspan: DevPtr, rec: DevPtr,
         dwg: DevPtr, dwu: DevPtr, dwdt: DevPtr, hctrl: DevPtr, d: i32, h: i32);
    /// rope.cu: q and k rotated and v, head-major, from the stacked qkv rows.
    rope_qkv_fwd ["rope_qkv_fwd"]
        (qkv: DevPtr, cos: DevPtr, sin: DevPtr, q: DevPtr, k: DevPtr, v: DevPtr, t_len: i32,
         nh: i32, nkv: i32, hd: i32, pos0: i32);
    /// rope.cu: the inverse rotation, the gradient of the stacked qkv rows.
    rope_qkv_bwd ["rope_qkv_bwd"]
        (dq: DevPtr, dk: DevPtr, dv: DevPtr, cos: DevPtr, sin: DevPtr, dqkv: DevPtr,
         t_len: i32, nh: i32, nkv: i32, hd: i32, pos0: i32);
    /// rope.cu: the inference form, k and v written into the KV cache at a device position.
    rope_qkv_cache ["rope_qkv_cache"]
        (qkv: DevPtr, cos: DevPtr, sin: DevPtr, q: DevPtr, k_cache: DevPtr, v_cache: DevPtr,
         pos: DevPtr, t_len: i32, nh: i32, nkv: i32, hd: i32, capacity: i32, positions: i32);
    /// attention.cu: one query per sequence over the KV cache up to a device position.
    decode_attention ["decode_attention"]
        (q: DevPtr, k_cache: DevPtr, v_cache: DevPtr, pos: DevPtr, out: DevPtr, nh: i32,
         nkv: i32, hd: i32, capacity: i32, scale: f32);
    /// decode.cu: `y = x W^T` for a few token rows.
    decode_linear_tokens ["decode_linear_t1", "decode_linear_t2", "decode_linear_t4", "decode_linear_t8"]
        (x: DevPtr, w: DevPtr, y: DevPtr, n: i32, d: i32, o: i32);
    /// decode.cu: the FFN's gate and, for the units that fire, its up product, into f32 `h`.
    decode_gate_up_tokens ["decode_gate_up_t1", "decode_gate_up_t2", "decode_gate_up_t4", "decode_gate_up_t8"]
        (x: DevPtr, wg: DevPtr, wu: DevPtr, h: DevPtr, n: i32, d: i32, units: i32, ldh: i32);
    /// decode.cu: the FFN's down product over the units of `h` that fire.
    decode_down_rows ["decode_down"]
        (h: DevPtr, wdt: DevPtr, y: DevPtr, n: i32, d: i32, units: i32, ldh: i32);
    /// cross_entropy.cu: per-row loss and bf16 `softmax - onehot` of fp32 logit rows.
    cross_entropy_rows ["cross_entropy_rows_smem", "cross_entropy_rows_global"]
        (logits: DevPtr, targets: DevPtr, g: DevPtr, loss: DevPtr, v: i32);
    /// gating.cu: the dense FFN's `relu(g) u`, its per-token L1 and the activity counts.
    gating_fwd ["gating_fwd"]
        (g: DevPtr, u: DevPtr, h: DevPtr, l1_row: DevPtr, row_cnt: DevPtr, blk_cnt: DevPtr,
         n: i32, hdim: i32);
    /// gating.cu: its backward with the L1 gradient, and `h` again.
    gating_bwd ["gating_bwd"]
        (g: DevPtr, u: DevPtr, dh: DevPtr, dl1: DevPtr, dg: DevPtr, du: DevPtr, h: DevPtr,
         granules: i64);
    /// norm.cu: the residual add and RMSNorm, bf16 out.
    add_rms_norm_fwd ["add_rms_norm_fwd"]
        (x: DevPtr, delta: DevPtr, w: DevPtr, x_new: DevPtr, y: DevPtr, rstd: DevPtr, n: i32,
         d: i32, eps: f32, rows: i32);
    /// norm.cu: its backward, with per-block partial weight gradients.
    add_rms_norm_bwd ["add_rms_norm_bwd_g1", "add_rms_norm_bwd_g2", "add_rms_norm_bwd_g4", "add_rms_norm_bwd_g8"]
        (g_x_new: DevPtr, g_y: DevPtr, x_new: DevPtr, w: DevPtr, rstd: DevPtr, g_x: DevPtr,
         g_delta: DevPtr, dw_part: DevPtr, n: i32, d: i32);
}

/// A 2-D TMA descriptor (CUtensorMap), passed to the wgmma gate kernel by value.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(super) struct TmapParam([u64; 16]);

/// bf16 `[rows, cols]` row-major, box `{WGMMA_K_TILE, box_rows}`, 128-B swizzle, zero fill out
/// of bounds.
pub(super) fn tensor_map(ptr: u64, rows: i64, cols: i64, box_rows: u32) -> Result<TmapParam> {
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
    let dims = [cols as u64, rows as u64];
    let strides = [cols as u64 * 2];
    let boxd = [WGMMA_K_TILE as u32, box_rows];
    let es = [1u32, 1];
    // SAFETY: every pointer names a live local of the length the call expects.
    let res = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            es.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    res.result()?;
    // SAFETY: initialised by the successful call above.
    let map = unsafe { map.assume_init() };
    let mut out = TmapParam([0; 16]);
    // SAFETY: both are 128 bytes (CUtensorMap is 128 bytes, 64-aligned).
    unsafe {
        std::ptr::copy_nonoverlapping(
            &map as *const _ as *const u8,
            out.0.as_mut_ptr() as *mut u8,
            128,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::image::every_nvrtc_ptx_for_test;

    /// `(entry name, parameter byte sizes)` of every `.entry` in a PTX text.
    fn ptx_entries(ptx: &str) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for part in ptx.split(".entry ").skip(1) {
            let name = part[..part.find('(').expect("entry without (")]
                .trim()
                .to_string();
            let params = &part[part.find('(').unwrap() + 1..part.find(')').unwrap()];
            let bytes = params
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| {
                    if let Some(len) = p.split('[').nth(1) {
                        len.trim_end_matches(']').parse().unwrap()
                    } else if [".u64", ".s64", ".b64", ".f64"]
                        .iter()
                        .any(|t| p.contains(t))
                    {
                        8
                    } else if [".u32", ".s32", ".b32", ".f32"]
                        .iter()
                        .any(|t| p.contains(t))
                    {
                        4
                    } else {
                        panic!("{name}: unknown parameter type `{p}`")
                    }
                })
                .collect();
            out.push((name, bytes));
        }
        out
    }

    /// Every `.entry` of both kernel files, under both architectures, has exactly one
    /// launcher, which passes the same number of parameters of the same sizes, and every
    /// entry a launcher names exists.
    #[test]
    fn launchers_match_the_ptx_entry_parameters() {
        let Some(images) = every_nvrtc_ptx_for_test() else {
            return;
        };
        let mut defined = Vec::new();
        for (stem, arch, ptx) in &images {
            let entries = ptx_entries(ptx);
            assert!(!entries.is_empty(), "{stem} {arch}: no entries");
            for (name, bytes) in entries {
                let sigs: Vec<&KernelSignature> = KERNEL_SIGNATURES
                    .iter()
                    .filter(|s| s.entries.contains(&name.as_str()))
                    .collect();
                assert_eq!(sigs.len(), 1, "{stem} {arch}: `{name}` needs one launcher");
                assert_eq!(
                    sigs[0].param_bytes,
                    bytes.as_slice(),
                    "{stem} {arch}: launcher {} passes other parameters than `{name}` takes",
                    sigs[0].launcher
                );
                defined.push(name);
            }
        }
        for sig in KERNEL_SIGNATURES {
            for entry in sig.entries {
                assert!(defined.iter().any(|n| n == entry), "no kernel `{entry}`");
            }
        }
    }

    #[test]
    fn ptx_parameter_sizes_are_read() {
        let ptx = ".visible .entry k(\n\t.param .align 64 .b8 k_param_0[128],\n\t.param .u64 k_param_1,\n\t.param .u32 k_param_2\n)\n{";
        assert_eq!(ptx_entries(ptx), vec![("k".to_string(), vec![128, 8, 4])]);
    }
}
