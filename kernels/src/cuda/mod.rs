//! Launches the TwELL inference kernels of `kernels/cuda/twell.cu` on tch CUDA tensors.
//!
//! The forward of one gated FFN layer is four launches on the legacy default stream (the one
//! tch uses): gate (wgmma/TMA on sm_90a, mma.sync elsewhere, or the skinny decode gate + pack
//! for N <= 16) -> `twell_plan` -> `twell_updown_gated`. All buffers live in a
//! [`TwellWorkspace`] sized for one (N, D, H); the control words reset themselves between
//! forwards, so the sequence can be captured in a CUDA graph.
//!
//! Weights: `Wg, Wu, WdT: [H, D]` bf16 row-major contiguous; `x: [N, D]` bf16; returns
//! `y: [N, D]` bf16. Exact on every row: tiles over capacity spill to a 256-entry slot;
//! the spill buffer is sized for the worst case unless the caller asks for less, in which case
//! [`TwellWorkspace::status`] must be checked (it reports a full spill buffer).
//!
//! Cubins: `build.rs` compiles `kernels/cuda/*.cu` into `$OUT_DIR/<stem>.<arch>.cubin` when
//! `SPARSE_TRAIN_NVCC` is set. They are read at run time from `$SPARSE_TRAIN_CUBINS/` when
//! that variable is set (for a carried binary), else from the paths build.rs recorded.
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use tch::{Device, Kind, Tensor};

const TILE: i64 = 256;
const GEMM_SMEM: u32 = 4 * (128 * 32 * 2 + 256 * 32 * 2);
const WGMMA_SMEM: u32 = 4 * (128 * 64 * 2 + 256 * 64 * 2) + 1024;
const CTRL_WORDS: i64 = 8;
const CTRL_LAST_STATUS: i64 = 5;
/// Largest N handled by the skinny decode gate; larger N use the tiled GEMM.
pub const SKINNY_MAX_TOKENS: i64 = 16;

/// Manifest written by build.rs: `stem arch path` per line (empty without nvcc).
const CUBIN_MANIFEST: &str = include_str!(concat!(env!("OUT_DIR"), "/cubins.txt"));

#[derive(Debug, thiserror::Error)]
pub enum CudaKernelError {
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("no cubin `{stem}.{arch}.cubin` (set SPARSE_TRAIN_CUBINS or build with SPARSE_TRAIN_NVCC)")]
    MissingCubin { stem: String, arch: String },
    #[error("reading cubin {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("shape: {0}")]
    Shape(String),
}

type Result<T> = std::result::Result<T, CudaKernelError>;

fn cubin_bytes(stem: &str, arch: &str) -> Result<Vec<u8>> {
    let file = format!("{stem}.{arch}.cubin");
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("SPARSE_TRAIN_CUBINS") {
        candidates.push(PathBuf::from(dir).join(&file));
    }
    for line in CUBIN_MANIFEST.lines() {
        let mut it = line.splitn(3, ' ');
        if let (Some(s), Some(a), Some(p)) = (it.next(), it.next(), it.next()) {
            if s == stem && a == arch {
                candidates.push(PathBuf::from(p));
            }
        }
    }
    for path in candidates {
        if path.exists() {
            return std::fs::read(&path).map_err(|source| CudaKernelError::Io { path, source });
        }
    }
    Err(CudaKernelError::MissingCubin { stem: stem.into(), arch: arch.into() })
}

/// A 2-D TMA descriptor (CUtensorMap), passed to the wgmma gate kernel by value.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TmapParam([u64; 16]);
unsafe impl DeviceRepr for TmapParam {}

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
        std::ptr::copy_nonoverlapping(&map as *const _ as *const u8, out.0.as_mut_ptr() as *mut u8, 128);
    }
    Ok(out)
}

/// The loaded TwELL module of one device.
pub struct TwellKernels {
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    sm90a: bool,
    sms: u32,
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

impl TwellKernels {
    /// Loads the cubin matching device `ordinal` (sm_90a on compute capability 9.0, else sm_80).
    /// Check `tch::Cuda::is_available()` first: cudarc panics without libcuda.
    pub fn load(ordinal: usize) -> Result<Self> {
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let sm90a = (major, minor) == (9, 0);
        let arch = if sm90a { "sm_90a" } else { "sm_80" };
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin_bytes("twell", arch)?))?;
        let f = |name: &str| module.load_function(name);
        let smem_attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let gemm = [f("twell_gate_gemm_tw32")?, f("twell_gate_gemm_tw64")?, f("twell_gate_gemm_tw128")?];
        for g in &gemm {
            g.set_attribute(smem_attr, GEMM_SMEM as i32)?;
        }
        let wgmma = if sm90a {
            let w = [f("twell_gate_wgmma_tw32")?, f("twell_gate_wgmma_tw64")?, f("twell_gate_wgmma_tw128")?];
            for g in &w {
                g.set_attribute(smem_attr, WGMMA_SMEM as i32)?;
            }
            Some(w)
        } else {
            None
        };
        let sms = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        Ok(Self {
            stream: ctx.default_stream(),
            sm90a,
            sms,
            pack: [f("twell_pack_tw32")?, f("twell_pack_tw64")?, f("twell_pack_tw128")?],
            skinny: f("twell_gate_skinny")?,
            plan: f("twell_plan")?,
            updown: [f("twell_updown_gated")?, f("twell_updown_gated_wide")?],
            down: [f("twell_down")?, f("twell_down_wide")?],
            gemm,
            wgmma,
            _module: module,
        })
    }

    /// Gated FFN forward `y = (relu(x Wg^T) * (x Wu^T)) WdT` through TwELL.
    pub fn ffn_forward(&self, ws: &TwellWorkspace, x: &Tensor, wg: &Tensor, wu: &Tensor, wdt: &Tensor) -> Result<Tensor> {
        ws.check_inputs(x, &[wg, wu, wdt])?;
        self.gate(ws, x, wg)?;
        self.updown(ws, x, wu, wdt, true)
    }

    /// Non-gated FFN forward `y = relu(x W1^T) WdT` through TwELL.
    pub fn ffn_forward_nongated(&self, ws: &TwellWorkspace, x: &Tensor, w1: &Tensor, wdt: &Tensor) -> Result<Tensor> {
        ws.check_inputs(x, &[w1, wdt])?;
        self.gate(ws, x, w1)?;
        self.updown(ws, x, w1, wdt, false)
    }

    fn gate(&self, ws: &TwellWorkspace, x: &Tensor, w: &Tensor) -> Result<()> {
        let (n, d, h) = (ws.n as i32, ws.d as i32, ws.h as i32);
        let ntiles = ws.ntiles as u32;
        let (xp, wp) = (ptr(x), ptr(w));
        let (twp, spp, ctp) = (ptr(&ws.twell), ptr(&ws.spill), ptr(&ws.ctrl));
        let spill_cap = ws.spill_cap as i32;
        let ti = tw_index(ws.tw);
        unsafe {
            if let Some(g) = &ws.scratch {
                let ldg = (ws.ntiles * TILE) as i32;
                let gp = ptr(g);
                let mut b = self.stream.launch_builder(&self.skinny);
                b.arg(&xp).arg(&wp).arg(&gp).arg(&n).arg(&d).arg(&h).arg(&ldg).arg(&ctp);
                b.launch(cfg((ntiles * 8, ((n + 63) / 64) as u32), 128, 0))?;
                let warps = (ws.n * ws.ntiles) as u32;
                let nt = ws.ntiles as i32;
                let mut b = self.stream.launch_builder(&self.pack[ti]);
                b.arg(&gp).arg(&ldg).arg(&twp).arg(&spp).arg(&spill_cap).arg(&ctp).arg(&n).arg(&nt);
                b.launch(cfg((warps.div_ceil(8), 1), 256, 0))?;
            } else if let (true, Some(wf)) = (self.sm90a, &self.wgmma) {
                let ta = tensor_map(xp, ws.n, ws.d, 128)?;
                let tb = tensor_map(wp, ws.h, ws.d, 256)?;
                let mut b = self.stream.launch_builder(&wf[ti]);
                b.arg(&ta).arg(&tb).arg(&twp).arg(&spp).arg(&spill_cap).arg(&ctp).arg(&n).arg(&d).arg(&h);
                b.launch(cfg((ntiles, (n as u32).div_ceil(128)), 384, WGMMA_SMEM))?;
            } else {
                let mut b = self.stream.launch_builder(&self.gemm[ti]);
                b.arg(&xp).arg(&wp).arg(&twp).arg(&spp).arg(&spill_cap).arg(&ctp).arg(&n).arg(&d).arg(&h);
                b.launch(cfg((ntiles, (n as u32).div_ceil(128)), 256, GEMM_SMEM))?;
            }
        }
        Ok(())
    }

    fn updown(&self, ws: &TwellWorkspace, x: &Tensor, wu: &Tensor, wdt: &Tensor, gated: bool) -> Result<Tensor> {
        let y = Tensor::empty([ws.n, ws.d], (Kind::BFloat16, ws.device));
        let (n, d, nt, tw, chunk) = (ws.n as i32, ws.d as i32, ws.ntiles as i32, ws.tw as i32, ws.chunk as i32);
        let slot_cap = ws.slot_cap as i32;
        let (twp, spp, ctp) = (ptr(&ws.twell), ptr(&ws.spill), ptr(&ws.ctrl));
        let (tip, itp, pap, arp) = (ptr(&ws.tokinfo), ptr(&ws.items), ptr(&ws.part), ptr(&ws.arrive));
        let (xp, wup, wdp, yp) = (ptr(x), ptr(wu), ptr(wdt), ptr(&y));
        let wide = usize::from(ws.d > 2048);
        let f = if gated { &self.updown[wide] } else { &self.down[wide] };
        let grid = (self.sms * 8).min((ws.n as u32).saturating_mul(16)).max(1);
        unsafe {
            let mut b = self.stream.launch_builder(&self.plan);
            b.arg(&twp).arg(&n).arg(&nt).arg(&tw).arg(&chunk).arg(&tip).arg(&itp).arg(&slot_cap).arg(&ctp);
            b.launch(cfg(((ws.n as u32).div_ceil(8), 1), 256, 0))?;
            let mut b = self.stream.launch_builder(f);
            b.arg(&xp).arg(&twp).arg(&spp).arg(&wup).arg(&wdp).arg(&yp).arg(&tip).arg(&itp).arg(&pap).arg(&arp);
            b.arg(&ctp).arg(&n).arg(&d).arg(&nt).arg(&tw).arg(&chunk);
            b.launch(cfg((grid, 1), 256, (ws.d * 2) as u32))?;
        }
        Ok(y)
    }
}

fn ptr(t: &Tensor) -> u64 {
    t.data_ptr() as u64
}

fn cfg(grid: (u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem }
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
    pub fn new(n: i64, d: i64, h: i64, tw: i64, chunk: i64, spill_cap: Option<i64>, slot_cap: i64, device: Device) -> Result<Self> {
        if n < 1 || d % 64 != 0 || d > 8192 || h < 1 || h > 65536 || ![32, 64, 128].contains(&tw) || chunk < 1 {
            return Err(CudaKernelError::Shape(format!("N={n} D={d} H={h} tw={tw} chunk={chunk}")));
        }
        let ntiles = (h + TILE - 1) / TILE;
        let spill_cap = spill_cap.unwrap_or(n * ntiles).max(1);
        let i32o = (Kind::Int, device);
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
            twell: Tensor::empty([n * ntiles * tw], i32o),
            spill: Tensor::empty([spill_cap * TILE], i32o),
            ctrl: Tensor::zeros([CTRL_WORDS], i32o),
            tokinfo: Tensor::empty([n * 4], i32o),
            items: Tensor::empty([slot_cap.max(1) * 4], i32o),
            part: Tensor::empty([slot_cap.max(1) * d], (Kind::Float, device)),
            arrive: Tensor::zeros([slot_cap.max(1)], i32o),
            scratch: (n <= SKINNY_MAX_TOKENS).then(|| Tensor::empty([n, ntiles * TILE], (Kind::BFloat16, device))),
        })
    }

    /// Status of the last forward (synchronises): 0 = exact; 1 = spill buffer was full
    /// (re-run with a larger `spill_cap`).
    pub fn status(&self) -> i32 {
        self.ctrl.int64_value(&[CTRL_LAST_STATUS]) as i32
    }

    fn check_inputs(&self, x: &Tensor, ws: &[&Tensor]) -> Result<()> {
        let ok_x = x.size() == [self.n, self.d] && x.kind() == Kind::BFloat16 && x.is_contiguous();
        let ok_w = ws.iter().all(|w| w.size() == [self.h, self.d] && w.kind() == Kind::BFloat16 && w.is_contiguous());
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
