//! The TwELL inference kernels of `kernels/cuda/twell.cu` on tch CUDA tensors.
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
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use tch::{Device, Kind, Tensor};

use super::consts::{
    CTRL_LAST_STATUS, CTRL_WORDS, GATE_ROWS, GEMM_SMEM_BYTES, GEMM_THREADS, MAX_TILES,
    PACK_THREADS, PLAN_THREADS, ROW_GRANULES, ROW_GRANULES_WIDE, SKINNY_THREADS, SKINNY_TOKENS,
    SKINNY_UNITS, TILE_COLS, UPDOWN_THREADS, WGMMA_SMEM_BYTES, WGMMA_THREADS,
};
use super::image::{load_image, LoadedImage};
use super::launch::{
    cuda_ordinal, load_functions, load_once, ptr, row_kernel_max_d, tch_stream, tensor_map,
    twell_gate_gemm, twell_gate_skinny, twell_gate_wgmma, twell_pack, twell_plan, twell_updown,
    LaunchShape, PerDevice,
};
use super::{CudaKernelError, Result};

/// Spare bins that empty TwELL slots are counted into (then dropped) by [`TwellWorkspace::stats`].
const DUMP_BINS: i64 = 4096;
/// Largest N handled by the skinny decode gate; larger N use the tiled GEMM (measured at
/// N = 32 on an H200, both take 27 us a layer at D 2048, H 5632).
pub const SKINNY_MAX_TOKENS: i64 = 16;

/// The loaded TwELL module of one device.
pub struct TwellKernels {
    pub(super) ctx: Arc<CudaContext>,
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
        let gemm = load_functions(
            &module,
            [
                "twell_gate_gemm_tw32",
                "twell_gate_gemm_tw64",
                "twell_gate_gemm_tw128",
            ],
            GEMM_SMEM_BYTES,
        )?;
        let wgmma = if sm90a {
            Some(load_functions(
                &module,
                [
                    "twell_gate_wgmma_tw32",
                    "twell_gate_wgmma_tw64",
                    "twell_gate_wgmma_tw128",
                ],
                WGMMA_SMEM_BYTES,
            )?)
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
            pack: load_functions(
                &module,
                ["twell_pack_tw32", "twell_pack_tw64", "twell_pack_tw128"],
                0,
            )?,
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
    pub(super) fn bind(&self, device: Device) -> Result<sys::CUstream> {
        if cuda_ordinal(device)? != self.ctx.ordinal() {
            return Err(CudaKernelError::Shape(format!(
                "tensors on {device:?}, kernels loaded for cuda:{}",
                self.ctx.ordinal()
            )));
        }
        self.ctx.bind_to_thread()?;
        tch_stream(device)
    }

    pub(super) fn gate(
        &self,
        stream: sys::CUstream,
        ws: &TwellWorkspace,
        x: &Tensor,
        w: &Tensor,
    ) -> Result<()> {
        let (n, d, h) = (ws.n as i32, ws.d as i32, ws.h as i32);
        let ntiles = ws.ntiles as u32;
        // Only the skinny gate reads the tokens in chunks; the GEMMs take GATE_ROWS per block.
        let (xp, wp) = (ptr(x), ptr(w));
        let (twp, spp, ctp) = (ptr(&ws.twell), ptr(&ws.spill), ptr(&ws.ctrl));
        let spill_cap = ws.spill_cap as i32;
        let ti = tw_index(ws.tw);
        let shape = LaunchShape::on(stream);
        let gate_grid = (ntiles, (ws.n as u32).div_ceil(GATE_ROWS as u32));
        // SAFETY: the launchers carry the kernels' parameter lists; every buffer was sized by
        // TwellWorkspace::new for this (N, D, H, tw) and the inputs were checked.
        unsafe {
            if let Some(g) = &ws.scratch {
                let ldg = (ws.ntiles * TILE_COLS) as i32;
                let gp = ptr(g);
                let grid = (
                    (ws.ntiles * TILE_COLS / SKINNY_UNITS) as u32,
                    (ws.n as u32).div_ceil(SKINNY_TOKENS as u32),
                );
                twell_gate_skinny(
                    &self.skinny,
                    shape(grid, SKINNY_THREADS, 0),
                    xp,
                    wp,
                    gp,
                    n,
                    d,
                    h,
                    ldg,
                    ctp,
                )?;
                let warps = (ws.n * ws.ntiles) as u32;
                let grid = (warps.div_ceil((PACK_THREADS / 32) as u32), 1);
                let nt = ws.ntiles as i32;
                twell_pack(
                    &self.pack[ti],
                    shape(grid, PACK_THREADS, 0),
                    gp,
                    ldg,
                    twp,
                    spp,
                    spill_cap,
                    ctp,
                    n,
                    nt,
                )?;
            } else if let (true, Some(wf)) = (self.sm90a, &self.wgmma) {
                let ta = tensor_map(xp, ws.n, ws.d, GATE_ROWS as u32)?;
                let tb = tensor_map(wp, ws.h, ws.d, TILE_COLS as u32)?;
                twell_gate_wgmma(
                    &wf[ti],
                    shape(gate_grid, WGMMA_THREADS, WGMMA_SMEM_BYTES as u32),
                    ta,
                    tb,
                    twp,
                    spp,
                    spill_cap,
                    ctp,
                    n,
                    d,
                    h,
                )?;
            } else {
                twell_gate_gemm(
                    &self.gemm[ti],
                    shape(gate_grid, GEMM_THREADS, GEMM_SMEM_BYTES as u32),
                    xp,
                    wp,
                    twp,
                    spp,
                    spill_cap,
                    ctp,
                    n,
                    d,
                    h,
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
        let wide = usize::from(ws.d > row_kernel_max_d(UPDOWN_THREADS, ROW_GRANULES));
        let f = if gated {
            &self.updown[wide]
        } else {
            &self.down[wide]
        };
        let grid = (self.sms * 8).min((ws.n as u32).saturating_mul(16)).max(1);
        let shape = LaunchShape::on(stream);
        let plan_grid = ((ws.n as u32).div_ceil((PLAN_THREADS / 32) as u32), 1);
        // SAFETY: as in `gate`; y is [N, D] bf16, freshly allocated on the same device.
        unsafe {
            twell_plan(
                &self.plan,
                shape(plan_grid, PLAN_THREADS, 0),
                twp,
                n,
                nt,
                tw,
                chunk,
                tip,
                itp,
                slot_cap,
                ctp,
            )?;
            twell_updown(
                f,
                shape((grid, 1), UPDOWN_THREADS, (ws.d * 2) as u32),
                xp,
                twp,
                spp,
                wup,
                wdp,
                yp,
                tip,
                itp,
                pap,
                arp,
                ctp,
                n,
                d,
                nt,
                tw,
                chunk,
            )?;
        }
        Ok(y)
    }
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
    pub(super) twell: Tensor,
    pub(super) spill: Tensor,
    pub(super) ctrl: Tensor,
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
            || d > row_kernel_max_d(UPDOWN_THREADS, ROW_GRANULES_WIDE)
            || !(1..=MAX_TILES * TILE_COLS).contains(&h)
            || ![32, 64, 128].contains(&tw)
            || chunk < 1
        {
            return Err(CudaKernelError::Shape(format!(
                "N={n} D={d} H={h} tw={tw} chunk={chunk}"
            )));
        }
        let ntiles = (h + TILE_COLS - 1) / TILE_COLS;
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
            spill: Tensor::f_empty([spill_cap * TILE_COLS], i32o)?,
            ctrl: Tensor::f_zeros([CTRL_WORDS], i32o)?,
            tokinfo: Tensor::f_empty([n * 4], i32o)?,
            items: Tensor::f_empty([slots * 4], i32o)?,
            part: Tensor::f_empty([slots * d], (Kind::Float, device))?,
            arrive: Tensor::f_zeros([slots], i32o)?,
            scratch: if n <= SKINNY_MAX_TOKENS {
                Some(Tensor::f_empty(
                    [n, ntiles * TILE_COLS],
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
            let entries = self
                .spill
                .f_view([-1, TILE_COLS])?
                .f_index_select(0, &slots)?;
            let ok = Tensor::f_arange(TILE_COLS, (Kind::Int64, dev))?
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

/// The TwELL forward of one fixed (N, D, H) with a workspace of its own, for captured steps
/// (a CUDA graph records the workspace's addresses, so it must not be shared, evicted or
/// regrown while the graph lives, as [`twell_ffn`]'s cache may). Its spill buffer holds the
/// worst case, so every forward is exact with no status read: nothing waits on the host.
/// At up to `DECODE_DISPATCH_TOKENS` tokens it runs the decode kernels instead
/// ([`super::decode::decode_ffn`]: the same values, no packed format, two launches where the
/// TwELL forward takes four; its scratch is allocated per call, from the graph's pool when
/// captured).
pub struct TwellStaticFfn {
    kernels: Arc<TwellKernels>,
    /// `None`: the decode kernels take these N.
    ws: Option<TwellWorkspace>,
}

impl TwellStaticFfn {
    /// For `n` tokens of width `d` through `h` units on `device`, launched as
    /// [`TwellLaunch::for_tokens`] picks.
    pub fn new(n: i64, d: i64, h: i64, device: Device) -> Result<Self> {
        let launch = TwellLaunch::for_tokens(n);
        let ws = if super::decode::decode_dispatch(n, d) {
            None
        } else {
            Some(TwellWorkspace::new(
                n,
                d,
                h,
                launch.tw,
                launch.chunk,
                None,
                SLOT_CAP,
                device,
            )?)
        };
        Ok(TwellStaticFfn {
            kernels: TwellKernels::for_device(device)?,
            ws,
        })
    }

    /// `y: [N, D]` bf16 for `x: [N, D]` and `Wg, Wu, WdT: [H, D]`, all bf16 contiguous.
    pub fn forward(&self, x: &Tensor, wg: &Tensor, wu: &Tensor, wdt: &Tensor) -> Result<Tensor> {
        match &self.ws {
            Some(ws) => self.kernels.ffn_forward(ws, x, wg, wu, wdt),
            None => super::decode::decode_ffn(x, wg, wu, wdt),
        }
    }
}

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
            let tiles = n * ((h + TILE_COLS - 1) / TILE_COLS);
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
