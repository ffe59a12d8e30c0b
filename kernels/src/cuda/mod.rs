//! Launches the TwELL inference kernels of `kernels/cuda/twell.cu` on tch CUDA tensors.
//!
//! The forward of one gated FFN layer is three or four launches on **tch's current stream**
//! (`cuda_runtime::current_stream`, passed to `cuLaunchKernel` directly): gate (wgmma/TMA on
//! sm_90a, mma.sync elsewhere, or the skinny decode gate + pack for N <= 16) -> `twell_plan`
//! -> `twell_updown_gated`. All buffers live in a [`TwellWorkspace`] sized for one (N, D, H);
//! the control words reset themselves between forwards, so the sequence can be captured in a
//! CUDA graph. Every driver call is checked and comes back as a [`CudaKernelError`].
//!
//! Weights: `Wg, Wu, WdT: [H, D]` bf16 row-major contiguous; `x: [N, D]` bf16; returns
//! `y: [N, D]` bf16. Exact on every row: tiles over capacity spill to a 256-entry slot;
//! the spill buffer is sized for the worst case unless the caller asks for less, in which case
//! [`TwellWorkspace::status`] must be checked (it reports a full spill buffer).
//!
//! Cubins: `build.rs` compiles `kernels/cuda/*.cu` into `$OUT_DIR/<stem>.<arch>.cubin` when
//! `SPARSE_TRAIN_NVCC` is set and embeds them in the binary. At run time
//! `$SPARSE_TRAIN_CUBINS/<stem>.<arch>.cubin` wins when present (to try a new cubin without a
//! rebuild), then the embedded cubin, then the paths build.rs recorded. A build without nvcc
//! embeds nothing: the first GPU use then fails with [`CudaKernelError::MissingCubin`].
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use tch::{Device, Kind, Tensor};

const TILE: i64 = 256;
const GEMM_SMEM: u32 = 4 * (128 * 32 * 2 + 256 * 32 * 2);
const WGMMA_SMEM: u32 = 4 * (128 * 64 * 2 + 256 * 64 * 2) + 1024;
const CTRL_WORDS: i64 = 8;
const CTRL_LAST_STATUS: i64 = 5;
/// Spare bins that empty TwELL slots are counted into (then dropped) by [`TwellWorkspace::stats`].
const DUMP_BINS: i64 = 4096;
/// Largest N handled by the skinny decode gate; larger N use the tiled GEMM.
pub const SKINNY_MAX_TOKENS: i64 = 16;

/// Manifest written by build.rs: `stem arch path` per line (empty without nvcc).
const CUBIN_MANIFEST: &str = include_str!(concat!(env!("OUT_DIR"), "/cubins.txt"));
include!(concat!(env!("OUT_DIR"), "/cubins_embed.rs"));

#[derive(Debug, thiserror::Error)]
pub enum CudaKernelError {
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("no cubin `{stem}.{arch}.cubin`: this binary was built without nvcc (source scripts/env.sh, which sets SPARSE_TRAIN_NVCC, and rebuild) and SPARSE_TRAIN_CUBINS names no folder holding it")]
    MissingCubin { stem: String, arch: String },
    #[error("reading cubin {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("shape: {0}")]
    Shape(String),
    #[error("CUDA is not available to tch (no libcuda or no device)")]
    NoCuda,
    #[error("{0:?} is not a CUDA device")]
    NotCuda(Device),
    #[error("kernel image: {0}")]
    Image(String),
    #[error("the TwELL spill buffer was full: output not exact")]
    SpillFull,
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

type Result<T> = std::result::Result<T, CudaKernelError>;

fn cubin_bytes(stem: &str, arch: &str) -> Result<Vec<u8>> {
    let ext = if arch.starts_with("compute_") {
        "ptx"
    } else {
        "cubin"
    };
    let file = format!("{stem}.{arch}.{ext}");
    if let Ok(dir) = std::env::var("SPARSE_TRAIN_CUBINS") {
        let path = PathBuf::from(dir).join(&file);
        if path.exists() {
            return std::fs::read(&path).map_err(|source| CudaKernelError::Io { path, source });
        }
    }
    if let Some((_, _, bytes)) = EMBEDDED_CUBINS
        .iter()
        .find(|(s, a, _)| *s == stem && *a == arch)
    {
        return Ok(bytes.to_vec());
    }
    for line in CUBIN_MANIFEST.lines() {
        let mut it = line.splitn(3, ' ');
        if let (Some(s), Some(a), Some(p)) = (it.next(), it.next(), it.next()) {
            let path = PathBuf::from(p);
            if s == stem && a == arch && path.exists() {
                return std::fs::read(&path).map_err(|source| CudaKernelError::Io { path, source });
            }
        }
    }
    Err(CudaKernelError::MissingCubin {
        stem: stem.into(),
        arch: arch.into(),
    })
}

/// Whether this binary carries compiled cubins (false: built without nvcc).
pub fn has_embedded_cubins() -> bool {
    !EMBEDDED_CUBINS.is_empty()
}

/// The kernel sources, for run-time compilation with NVRTC.
const SOURCES: [(&str, &str); 2] = [
    ("twell", include_str!("../../cuda/twell.cu")),
    ("hybrid", include_str!("../../cuda/hybrid.cu")),
];

/// How a kernel file was loaded: the image's name and whether it holds the sm_90a (wgmma)
/// kernels.
#[derive(Clone, Debug)]
pub struct LoadedImage {
    pub image: String,
    pub wgmma: bool,
}

/// CUDA include folders for NVRTC: `SPARSE_TRAIN_CUDA_INCLUDE`, the pinned nvcc's, the
/// `include/` beside each library folder on `LD_LIBRARY_PATH` (the NVIDIA wheels'
/// `nvidia/cu13/lib` -> `nvidia/cu13/include`), `$CUDA_HOME/include`, /usr/local/cuda.
fn cuda_include_dirs() -> Vec<String> {
    let mut v: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("SPARSE_TRAIN_CUDA_INCLUDE") {
        v.push(p.into());
    }
    if let Ok(nvcc) = std::env::var("SPARSE_TRAIN_NVCC") {
        if let Some(root) = std::path::Path::new(&nvcc)
            .parent()
            .and_then(|b| b.parent())
        {
            v.push(root.join("include"));
        }
    }
    if let Ok(paths) = std::env::var("LD_LIBRARY_PATH") {
        for lib in std::env::split_paths(&paths) {
            if let Some(parent) = lib.parent() {
                v.push(parent.join("include"));
            }
        }
    }
    if let Ok(home) = std::env::var("CUDA_HOME") {
        v.push(PathBuf::from(home).join("include"));
    }
    v.push("/usr/local/cuda/include".into());
    v.into_iter()
        .filter(|p| p.join("cuda_bf16.h").exists())
        .map(|p| p.display().to_string())
        .collect()
}

/// Loads kernel file `stem` into `ctx`. `SPARSE_TRAIN_KERNEL_IMAGE` picks the image:
/// `auto` (default: the sm_90a cubin on compute capability 9.0, the sm_80 cubin on 8.x, the
/// compute_80 PTX, JIT-compiled by the driver, on anything else; NVRTC from the embedded
/// source when that image is missing), or one of `sm_90a`, `sm_80`, `compute_80`, `nvrtc`
/// (no fallback; `compute_80` runs the non-Hopper code path on a Hopper card).
fn load_image(ctx: &Arc<CudaContext>, stem: &str) -> Result<(Arc<CudaModule>, LoadedImage)> {
    let (major, minor) = ctx.compute_capability()?;
    let choice = std::env::var("SPARSE_TRAIN_KERNEL_IMAGE").unwrap_or_else(|_| "auto".into());
    let hopper = (major, minor) == (9, 0);
    let (image, fallback) = match choice.as_str() {
        "auto" if hopper => ("sm_90a", true),
        "auto" if major == 8 => ("sm_80", true),
        "auto" => ("compute_80", true),
        "sm_90a" | "sm_80" | "compute_80" | "nvrtc" => (choice.as_str(), false),
        other => {
            return Err(CudaKernelError::Image(format!(
            "SPARSE_TRAIN_KERNEL_IMAGE={other}: expected auto, sm_90a, sm_80, compute_80 or nvrtc"
        )))
        }
    };
    if image != "nvrtc" {
        match cubin_bytes(stem, image) {
            Ok(bytes) => {
                let ptx = if image.starts_with("compute_") {
                    cudarc::nvrtc::Ptx::from_src(String::from_utf8_lossy(&bytes).into_owned())
                } else {
                    cudarc::nvrtc::Ptx::from_binary(bytes)
                };
                let loaded = LoadedImage {
                    image: image.into(),
                    wgmma: image == "sm_90a",
                };
                return Ok((ctx.load_module(ptx)?, loaded));
            }
            Err(e) if !fallback => return Err(e),
            Err(_) => {}
        }
    }
    let arch = if hopper {
        "compute_90a".to_string()
    } else {
        format!("compute_{major}{minor}")
    };
    let ptx = nvrtc_compile(stem, &arch)?;
    let loaded = LoadedImage {
        image: format!("nvrtc {arch}"),
        wgmma: hopper,
    };
    Ok((ctx.load_module(ptx)?, loaded))
}

/// Compiles kernel file `stem` (`twell` or `hybrid`) from its embedded source with NVRTC for
/// `arch` (e.g. `compute_90a`), finding the CUDA headers as [`cuda_include_dirs`] does.
/// Needs libnvrtc, not a GPU.
pub fn nvrtc_compile(stem: &str, arch: &str) -> Result<cudarc::nvrtc::Ptx> {
    let src = SOURCES
        .iter()
        .find(|(s, _)| *s == stem)
        .map(|(_, src)| *src)
        .ok_or_else(|| CudaKernelError::Image(format!("no source for kernel file {stem}")))?;
    let include_paths = cuda_include_dirs();
    if include_paths.is_empty() {
        return Err(CudaKernelError::Image(format!(
            "NVRTC for {stem}.cu needs the CUDA headers (cuda_bf16.h): set SPARSE_TRAIN_CUDA_INCLUDE"
        )));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        include_paths,
        options: vec![
            format!("--gpu-architecture={arch}"),
            "-std=c++17".into(),
            "-default-device".into(),
        ],
        ..Default::default()
    };
    // SAFETY: only tries to open the library (cudarc panics on use when it is absent).
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaKernelError::Image(
            "libnvrtc could not be loaded (put the CUDA libraries on LD_LIBRARY_PATH)".into(),
        ));
    }
    cudarc::nvrtc::compile_ptx_with_opts(src, opts)
        .map_err(|e| CudaKernelError::Image(format!("NVRTC on {stem}.cu for {arch}: {e:?}")))
}

/// Kernel arguments as the `void**` array `cuLaunchKernel` takes: pointers to each value.
macro_rules! kargs {
    ($($a:expr),* $(,)?) => {
        [$(&$a as *const _ as *mut c_void),*]
    };
}

mod hybrid;
pub use hybrid::{hybrid_backward, hybrid_forward, HybridForward, HybridKernels, HybridState};

/// Launches `f` on `stream` (a raw `CUstream`, here tch's current stream).
///
/// # Safety
/// `args` must match the kernel's parameter list in number, order and type, and every device
/// pointer among them must be valid for what the kernel reads and writes.
unsafe fn launch(
    f: &CudaFunction,
    stream: sys::CUstream,
    grid: (u32, u32),
    block: u32,
    smem: u32,
    args: &mut [*mut c_void],
) -> Result<()> {
    sys::cuLaunchKernel(
        f.cu_function(),
        grid.0,
        grid.1,
        1,
        block,
        1,
        1,
        smem,
        stream,
        args.as_mut_ptr(),
        std::ptr::null_mut(),
    )
    .result()?;
    Ok(())
}

/// A 2-D TMA descriptor (CUtensorMap), passed to the wgmma gate kernel by value.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TmapParam([u64; 16]);

/// bf16 `[rows, cols]` row-major, box `{64, box_rows}`, 128-B swizzle, zero fill out of bounds.
fn tensor_map(ptr: u64, rows: i64, cols: i64, box_rows: u32) -> Result<TmapParam> {
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
    let dims = [cols as u64, rows as u64];
    let strides = [cols as u64 * 2];
    let boxd = [64u32, box_rows];
    let es = [1u32, 1];
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
    let map = unsafe { map.assume_init() };
    let mut out = TmapParam([0; 16]);
    unsafe {
        std::ptr::copy_nonoverlapping(
            &map as *const _ as *const u8,
            out.0.as_mut_ptr() as *mut u8,
            128,
        );
    }
    Ok(out)
}

/// The loaded TwELL module of one device.
pub struct TwellKernels {
    ctx: Arc<CudaContext>,
    _module: Arc<CudaModule>,
    sm90a: bool,
    /// Which image of twell.cu was loaded.
    image: LoadedImage,
    sms: u32,
    name: String,
    gemm: [CudaFunction; 3],
    wgmma: Option<[CudaFunction; 3]>,
    pack: [CudaFunction; 3],
    skinny: CudaFunction,
    plan: CudaFunction,
    updown: [CudaFunction; 2],
    down: [CudaFunction; 2],
}

fn tw_index(tw: i64) -> usize {
    match tw {
        32 => 0,
        64 => 1,
        _ => 2,
    }
}

/// Kernels loaded once per process and device.
type PerDevice<K> = OnceLock<Mutex<HashMap<usize, Arc<K>>>>;

/// The entry of `device` in `cache`, loaded by `load(ordinal)` on first use.
fn load_once<K>(
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

fn cuda_ordinal(device: Device) -> Result<usize> {
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
fn tch_stream(device: Device) -> Result<sys::CUstream> {
    crate::cuda_runtime::current_stream(device)
        .map(|s| s as sys::CUstream)
        .ok_or(CudaKernelError::NotCuda(device))
}

impl TwellKernels {
    /// Loads the cubin matching device `ordinal` (sm_90a on compute capability 9.0, else sm_80).
    /// Checks `tch::Cuda::is_available()` first: cudarc panics without libcuda.
    pub fn load(ordinal: usize) -> Result<Self> {
        if !tch::Cuda::is_available() {
            return Err(CudaKernelError::NoCuda);
        }
        let ctx = CudaContext::new(ordinal)?;
        let (module, image) = load_image(&ctx, "twell")?;
        let sm90a = image.wgmma;
        let f = |name: &str| module.load_function(name);
        let smem_attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let gemm = [
            f("twell_gate_gemm_tw32")?,
            f("twell_gate_gemm_tw64")?,
            f("twell_gate_gemm_tw128")?,
        ];
        for g in &gemm {
            g.set_attribute(smem_attr, GEMM_SMEM as i32)?;
        }
        let wgmma = if sm90a {
            let w = [
                f("twell_gate_wgmma_tw32")?,
                f("twell_gate_wgmma_tw64")?,
                f("twell_gate_wgmma_tw128")?,
            ];
            for g in &w {
                g.set_attribute(smem_attr, WGMMA_SMEM as i32)?;
            }
            Some(w)
        } else {
            None
        };
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as u32;
        let name = ctx.name()?;
        Ok(Self {
            sm90a,
            sms,
            name,
            image,
            pack: [
                f("twell_pack_tw32")?,
                f("twell_pack_tw64")?,
                f("twell_pack_tw128")?,
            ],
            skinny: f("twell_gate_skinny")?,
            plan: f("twell_plan")?,
            updown: [f("twell_updown_gated")?, f("twell_updown_gated_wide")?],
            down: [f("twell_down")?, f("twell_down_wide")?],
            gemm,
            wgmma,
            _module: module,
            ctx,
        })
    }

    /// The loaded module of `device`, loaded once per process.
    pub fn for_device(device: Device) -> Result<Arc<TwellKernels>> {
        static LOADED: PerDevice<TwellKernels> = OnceLock::new();
        load_once(&LOADED, device, TwellKernels::load)
    }

    /// The device's name as the driver reports it (e.g. "NVIDIA H100 80GB HBM3").
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// The image of twell.cu in use (e.g. `sm_90a`, `compute_80`, `nvrtc compute_90a`).
    pub fn image(&self) -> &str {
        &self.image.image
    }

    /// Whether the gate runs the sm_90a wgmma/TMA kernel.
    pub fn uses_wgmma(&self) -> bool {
        self.sm90a && self.wgmma.is_some()
    }

    /// Gated FFN forward `y = (relu(x Wg^T) * (x Wu^T)) WdT` through TwELL, on tch's current
    /// stream of the workspace's device.
    pub fn ffn_forward(
        &self,
        ws: &TwellWorkspace,
        x: &Tensor,
        wg: &Tensor,
        wu: &Tensor,
        wdt: &Tensor,
    ) -> Result<Tensor> {
        ws.check_inputs(x, &[wg, wu, wdt])?;
        let stream = self.bind(ws.device)?;
        self.gate(stream, ws, x, wg)?;
        self.updown(stream, ws, x, wu, wdt, true)
    }

    /// Non-gated FFN forward `y = relu(x W1^T) WdT` through TwELL.
    pub fn ffn_forward_nongated(
        &self,
        ws: &TwellWorkspace,
        x: &Tensor,
        w1: &Tensor,
        wdt: &Tensor,
    ) -> Result<Tensor> {
        ws.check_inputs(x, &[w1, wdt])?;
        let stream = self.bind(ws.device)?;
        self.gate(stream, ws, x, w1)?;
        self.updown(stream, ws, x, w1, wdt, false)
    }

    /// Makes this device's primary context current on the calling thread (the one the CUDA
    /// runtime under tch uses) and returns tch's current stream.
    fn bind(&self, device: Device) -> Result<sys::CUstream> {
        if cuda_ordinal(device)? != self.ctx.ordinal() {
            return Err(CudaKernelError::Shape(format!(
                "tensors on {device:?}, kernels loaded for cuda:{}",
                self.ctx.ordinal()
            )));
        }
        self.ctx.bind_to_thread()?;
        tch_stream(device)
    }

    fn gate(
        &self,
        stream: sys::CUstream,
        ws: &TwellWorkspace,
        x: &Tensor,
        w: &Tensor,
    ) -> Result<()> {
        let (n, d, h) = (ws.n as i32, ws.d as i32, ws.h as i32);
        let ntiles = ws.ntiles as u32;
        let (xp, wp) = (ptr(x), ptr(w));
        let (twp, spp, ctp) = (ptr(&ws.twell), ptr(&ws.spill), ptr(&ws.ctrl));
        let spill_cap = ws.spill_cap as i32;
        let ti = tw_index(ws.tw);
        // SAFETY: argument lists match the extern "C" kernels of twell.cu; every buffer was
        // sized by TwellWorkspace::new for this (N, D, H, tw) and the inputs were checked.
        unsafe {
            if let Some(g) = &ws.scratch {
                let ldg = (ws.ntiles * TILE) as i32;
                let gp = ptr(g);
                launch(
                    &self.skinny,
                    stream,
                    (ntiles * 8, ((n + 63) / 64) as u32),
                    128,
                    0,
                    &mut kargs![xp, wp, gp, n, d, h, ldg, ctp],
                )?;
                let warps = (ws.n * ws.ntiles) as u32;
                let nt = ws.ntiles as i32;
                launch(
                    &self.pack[ti],
                    stream,
                    (warps.div_ceil(8), 1),
                    256,
                    0,
                    &mut kargs![gp, ldg, twp, spp, spill_cap, ctp, n, nt],
                )?;
            } else if let (true, Some(wf)) = (self.sm90a, &self.wgmma) {
                let ta = tensor_map(xp, ws.n, ws.d, 128)?;
                let tb = tensor_map(wp, ws.h, ws.d, 256)?;
                let grid = (ntiles, (n as u32).div_ceil(128));
                launch(
                    &wf[ti],
                    stream,
                    grid,
                    384,
                    WGMMA_SMEM,
                    &mut kargs![ta, tb, twp, spp, spill_cap, ctp, n, d, h],
                )?;
            } else {
                let grid = (ntiles, (n as u32).div_ceil(128));
                launch(
                    &self.gemm[ti],
                    stream,
                    grid,
                    256,
                    GEMM_SMEM,
                    &mut kargs![xp, wp, twp, spp, spill_cap, ctp, n, d, h],
                )?;
            }
        }
        Ok(())
    }

    fn updown(
        &self,
        stream: sys::CUstream,
        ws: &TwellWorkspace,
        x: &Tensor,
        wu: &Tensor,
        wdt: &Tensor,
        gated: bool,
    ) -> Result<Tensor> {
        let y = Tensor::f_empty([ws.n, ws.d], (Kind::BFloat16, ws.device))?;
        let (n, d, nt, tw, chunk) = (
            ws.n as i32,
            ws.d as i32,
            ws.ntiles as i32,
            ws.tw as i32,
            ws.chunk as i32,
        );
        let slot_cap = ws.slot_cap as i32;
        let (twp, spp, ctp) = (ptr(&ws.twell), ptr(&ws.spill), ptr(&ws.ctrl));
        let (tip, itp, pap, arp) = (
            ptr(&ws.tokinfo),
            ptr(&ws.items),
            ptr(&ws.part),
            ptr(&ws.arrive),
        );
        let (xp, wup, wdp, yp) = (ptr(x), ptr(wu), ptr(wdt), ptr(&y));
        let wide = usize::from(ws.d > 2048);
        let f = if gated {
            &self.updown[wide]
        } else {
            &self.down[wide]
        };
        let grid = (self.sms * 8).min((ws.n as u32).saturating_mul(16)).max(1);
        // SAFETY: as in `gate`; y is [N, D] bf16, freshly allocated on the same device.
        unsafe {
            launch(
                &self.plan,
                stream,
                ((ws.n as u32).div_ceil(8), 1),
                256,
                0,
                &mut kargs![twp, n, nt, tw, chunk, tip, itp, slot_cap, ctp],
            )?;
            launch(
                f,
                stream,
                (grid, 1),
                256,
                (ws.d * 2) as u32,
                &mut kargs![
                    xp, twp, spp, wup, wdp, yp, tip, itp, pap, arp, ctp, n, d, nt, tw, chunk
                ],
            )?;
        }
        Ok(y)
    }
}

fn ptr(t: &Tensor) -> u64 {
    t.data_ptr() as u64
}

/// Buffers of the TwELL forward for one (N, D, H) on one device.
pub struct TwellWorkspace {
    n: i64,
    d: i64,
    h: i64,
    ntiles: i64,
    tw: i64,
    chunk: i64,
    spill_cap: i64,
    slot_cap: i64,
    device: Device,
    twell: Tensor,
    spill: Tensor,
    ctrl: Tensor,
    tokinfo: Tensor,
    items: Tensor,
    part: Tensor,
    arrive: Tensor,
    scratch: Option<Tensor>,
}

impl TwellWorkspace {
    /// `tw`: words per 256-column tile (32, 64 or 128: capacity 31, 63, 127 actives);
    /// `chunk`: actives per work item of the up+down kernel (split heavy tokens; 128 suits
    /// 99-99.5 % sparsity, 512-1024 lower sparsity, 8 decode); `spill_cap`: spill slots
    /// (None = worst case N * ceil(H/256), always exact); `slot_cap`: partial-sum slots.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        n: i64,
        d: i64,
        h: i64,
        tw: i64,
        chunk: i64,
        spill_cap: Option<i64>,
        slot_cap: i64,
        device: Device,
    ) -> Result<Self> {
        if n < 1
            || d % 64 != 0
            || d > 8192
            || !(1..=65536).contains(&h)
            || ![32, 64, 128].contains(&tw)
            || chunk < 1
        {
            return Err(CudaKernelError::Shape(format!(
                "N={n} D={d} H={h} tw={tw} chunk={chunk}"
            )));
        }
        let ntiles = (h + TILE - 1) / TILE;
        let spill_cap = spill_cap.unwrap_or(n * ntiles).max(1);
        let i32o = (Kind::Int, device);
        let slots = slot_cap.max(1);
        Ok(Self {
            n,
            d,
            h,
            ntiles,
            tw,
            chunk,
            spill_cap,
            slot_cap,
            device,
            twell: Tensor::f_empty([n * ntiles * tw], i32o)?,
            spill: Tensor::f_empty([spill_cap * TILE], i32o)?,
            ctrl: Tensor::f_zeros([CTRL_WORDS], i32o)?,
            tokinfo: Tensor::f_empty([n * 4], i32o)?,
            items: Tensor::f_empty([slots * 4], i32o)?,
            part: Tensor::f_empty([slots * d], (Kind::Float, device))?,
            arrive: Tensor::f_zeros([slots], i32o)?,
            scratch: if n <= SKINNY_MAX_TOKENS {
                Some(Tensor::f_empty(
                    [n, ntiles * TILE],
                    (Kind::BFloat16, device),
                )?)
            } else {
                None
            },
        })
    }

    /// Whether the spill buffer holds fewer slots than the worst case (every tile spilled),
    /// so a forward's status must be read to know it was exact.
    pub fn spill_is_bounded(&self) -> bool {
        self.spill_cap < self.n * self.ntiles
    }

    /// Status of the last forward (synchronises): 0 = exact; 1 = spill buffer was full
    /// (re-run with a larger `spill_cap`).
    pub fn status(&self) -> Result<i32> {
        Ok(self.ctrl.f_int64_value(&[CTRL_LAST_STATUS])? as i32)
    }

    /// Statistics of the last forward's packed gate activations, computed with tch ops on
    /// the workspace's stream: `(active_per_token [N] i64, active_per_unit [H] i64,
    /// overflow_rows [2] i64)` (rows with a spilled tile, 0). Actives are the positive gate
    /// values (`relu(g) > 0`). `active_per_unit` reads the spilled slots through
    /// `masked_select`, which synchronises.
    pub fn stats(&self) -> Result<TwellStats> {
        let (n, nt, tw, h) = (self.n, self.ntiles, self.tw, self.h);
        let dev = self.device;
        let words = self.twell.f_view([n, nt, tw])?;
        let counts = words.f_select(2, 0)?.f_to_kind(Kind::Int64)?;
        let per_token = counts.f_sum_dim_intlist(-1, false, Kind::Int64)?;
        let spilled = counts.f_gt(tw - 1)?;
        let overflow = Tensor::f_stack(
            &[
                spilled.f_any_dim(-1, false)?.f_sum(Kind::Int64)?,
                Tensor::f_zeros([], (Kind::Int64, dev))?,
            ],
            0,
        )?;
        // Inline tiles: entries 1..=count; other slots go to the dump bin H.
        let pos = Tensor::f_arange_start(1, tw, (Kind::Int64, dev))?;
        let inline_ok = pos
            .f_le_tensor(&counts.f_unsqueeze(-1)?)?
            .f_logical_and(&spilled.f_logical_not()?.f_unsqueeze(-1)?)?;
        let cols = words
            .f_narrow(2, 1, tw - 1)?
            .f_bitwise_and(0xFFFF)?
            .f_to_kind(Kind::Int64)?;
        // Empty slots go to DUMP_BINS spare bins past H, spread so that their atomic adds do
        // not all contend on one address (most slots are empty at > 99 % sparsity).
        let slots_total = cols.numel() as i64;
        let dump = Tensor::f_arange(slots_total, (Kind::Int64, dev))?
            .f_remainder(DUMP_BINS)?
            .f_add_scalar(h)?
            .f_view_as(&cols)?;
        let cols = cols.f_where_self(&inline_ok, &dump)?;
        let ones = Tensor::f_ones([slots_total], (Kind::Int64, dev))?;
        let per_unit = Tensor::f_zeros([h + DUMP_BINS], (Kind::Int64, dev))?.f_scatter_add(
            0,
            &cols.f_reshape([-1])?,
            &ones,
        )?;
        // Spilled tiles: `count` entries at the start of their 256-entry slot.
        let slots = words
            .f_select(2, 1)?
            .f_masked_select(&spilled)?
            .f_to_kind(Kind::Int64)?;
        let per_unit = if slots.numel() > 0 {
            let cnt = counts.f_masked_select(&spilled)?;
            let entries = self.spill.f_view([-1, TILE])?.f_index_select(0, &slots)?;
            let ok = Tensor::f_arange(TILE, (Kind::Int64, dev))?
                .f_unsqueeze(0)?
                .f_lt_tensor(&cnt.f_unsqueeze(1)?)?;
            let c = entries.f_bitwise_and(0xFFFF)?.f_to_kind(Kind::Int64)?;
            let c = c
                .f_where_self(&ok, &Tensor::f_full([], h, (Kind::Int64, dev))?)?
                .f_reshape([-1])?;
            let ones = Tensor::f_ones([c.numel() as i64], (Kind::Int64, dev))?;
            per_unit.f_scatter_add(0, &c, &ones)?
        } else {
            per_unit
        };
        Ok((per_token, per_unit.f_narrow(0, 0, h)?, overflow))
    }

    fn check_inputs(&self, x: &Tensor, ws: &[&Tensor]) -> Result<()> {
        let ok_x = x.size() == [self.n, self.d] && x.kind() == Kind::BFloat16 && x.is_contiguous();
        let ok_w = ws.iter().all(|w| {
            w.size() == [self.h, self.d] && w.kind() == Kind::BFloat16 && w.is_contiguous()
        });
        if ok_x && ok_w && x.device() == self.device {
            Ok(())
        } else {
            Err(CudaKernelError::Shape(format!(
                "x {:?} {:?}, weights {:?}: want x [{}, {}] and [{}, {}] bf16 contiguous on {:?}",
                x.size(),
                x.kind(),
                ws.iter().map(|w| w.size()).collect::<Vec<_>>(),
                self.n,
                self.d,
                self.h,
                self.d,
                self.device
            )))
        }
    }
}

/// `(active_per_token [N], active_per_unit [H], overflow_rows [2])`, int64.
pub type TwellStats = (Tensor, Tensor, Tensor);

/// Format choice for one TwELL forward: words per tile (32/64/128) and actives per work item
/// of the up+down kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TwellLaunch {
    pub tw: i64,
    pub chunk: i64,
}

impl TwellLaunch {
    /// What the kernel measurements favour (docs/kernel-notes.md): C = 8 (tw 32), chunks of
    /// 128 actives for prefill, 8 for decode.
    pub fn for_tokens(n: i64) -> Self {
        TwellLaunch {
            tw: 32,
            chunk: if n <= 64 { 8 } else { 128 },
        }
    }
}

/// Partial-sum slots of the up+down kernel (split heavy tokens); beyond them tokens run unsplit.
const SLOT_CAP: i64 = 8192;

type WsKey = (usize, usize, i64, i64, i64, TwellLaunch);

/// Workspaces kept between calls, most recent last: (device, stream, N, D, H, launch).
struct WsCache(Vec<(WsKey, TwellWorkspace)>);
// SAFETY: the tensors are only touched under the cache's mutex.
unsafe impl Send for WsCache {}
const WS_CACHE_LEN: usize = 8;
/// Spill slots up to which a workspace takes the worst case (every tile of every token:
/// exact with no check). Past it (N above ~23k tokens at H = 5632, where the worst case
/// passes 512 MiB: 2.9 GiB at N = 131072) it takes [`BOUNDED_SPILL_FRACTION`] of the tiles,
/// and each forward reads its status (one synchronisation per call, small at that N) and
/// regrows to the worst case and reruns on overflow.
const WORST_CASE_SPILL_MAX: i64 = 1 << 19;
const BOUNDED_SPILL_FRACTION: i64 = 16;

/// `y = (relu(x Wg^T) * (x Wu^T)) WdT` through the TwELL kernels on tch's current stream:
/// inputs cast to contiguous bf16 if needed, workspace reused across calls with the same
/// (device, stream, N, D, H, launch). Always exact (a worst-case spill buffer, or a bounded
/// one whose overflow is detected and rerun: see [`WORST_CASE_SPILL_MAX`]). With
/// `with_stats`, also the statistics of [`TwellWorkspace::stats`].
pub fn twell_ffn(
    x: &Tensor,
    wg: &Tensor,
    wu: &Tensor,
    wdt: &Tensor,
    launch: TwellLaunch,
    with_stats: bool,
) -> Result<(Tensor, Option<TwellStats>)> {
    let device = x.device();
    let kernels = TwellKernels::for_device(device)?;
    // Casts only when needed: each no-op cast is still a dispatcher call, and decoding is
    // bound by the host's per-call work.
    let bf = |t: &Tensor| -> Result<Tensor> {
        if t.kind() == Kind::BFloat16 && t.is_contiguous() {
            Ok(t.shallow_clone())
        } else {
            Ok(t.f_to_kind(Kind::BFloat16)?.f_contiguous()?)
        }
    };
    let (x, wg, wu, wdt) = (bf(x)?, bf(wg)?, bf(wu)?, bf(wdt)?);
    let (n, d) = x.size2()?;
    let h = wg.size()[0];
    let stream = tch_stream(device)? as usize;
    let key: WsKey = (cuda_ordinal(device)?, stream, n, d, h, launch);
    static CACHE: OnceLock<Mutex<WsCache>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(|| Mutex::new(WsCache(Vec::new())))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let idx = match cache.0.iter().position(|(k, _)| *k == key) {
        Some(i) => i,
        None => {
            if cache.0.len() >= WS_CACHE_LEN {
                cache.0.remove(0);
            }
            let tiles = n * ((h + TILE - 1) / TILE);
            let cap = (tiles > WORST_CASE_SPILL_MAX)
                .then(|| (tiles / BOUNDED_SPILL_FRACTION).max(WORST_CASE_SPILL_MAX / 4));
            let ws = TwellWorkspace::new(n, d, h, launch.tw, launch.chunk, cap, SLOT_CAP, device)?;
            cache.0.push((key, ws));
            cache.0.len() - 1
        }
    };
    let mut y = kernels.ffn_forward(&cache.0[idx].1, &x, &wg, &wu, &wdt)?;
    if cache.0[idx].1.spill_is_bounded() && cache.0[idx].1.status()? != 0 {
        // The bounded spill buffer overflowed: worst case from now on, and rerun.
        cache.0[idx].1 =
            TwellWorkspace::new(n, d, h, launch.tw, launch.chunk, None, SLOT_CAP, device)?;
        y = kernels.ffn_forward(&cache.0[idx].1, &x, &wg, &wu, &wdt)?;
    }
    let ws = &cache.0[idx].1;
    let stats = if with_stats { Some(ws.stats()?) } else { None };
    Ok((y, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sources also compile at run time (NVRTC, no GPU needed), for Hopper and Ampere:
    /// the fallback of a binary built without nvcc or run on a GPU it has no image for.
    #[test]
    fn kernel_sources_compile_with_nvrtc() {
        if cuda_include_dirs().is_empty() {
            println!("skipped: no CUDA headers found (source scripts/env.sh)");
            return;
        }
        for stem in ["twell", "hybrid"] {
            for arch in ["compute_90a", "compute_80"] {
                match nvrtc_compile(stem, arch) {
                    Ok(ptx) => {
                        let text = ptx.to_src();
                        assert!(
                            text.contains(".entry"),
                            "{stem} {arch}: no kernels in the PTX"
                        );
                        // The Hopper build holds the wgmma gate, the Ampere one must not.
                        assert_eq!(
                            text.contains("wgmma.mma_async"),
                            arch == "compute_90a" && stem == "twell",
                            "{stem} {arch}: wgmma presence"
                        );
                    }
                    Err(CudaKernelError::Image(e)) if e.contains("libnvrtc could not") => {
                        println!("skipped: {e}");
                        return;
                    }
                    Err(e) => panic!("{stem} for {arch}: {e}"),
                }
            }
        }
    }
}
