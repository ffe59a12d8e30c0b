//! Launches the hybrid training kernels of `kernels/cuda/hybrid.cu` (forward AND backward of
//! the gated FFN with the L1 term) on tch CUDA tensors, on **tch's current stream**.
//!
//! Forward (`hybrid_forward`): the TwELL gate GEMM of twell.cu (C = 8, exact spill) ->
//! `hyb_count` -> `hyb_segscan` -> `hyb_unitscan` -> `hyb_scan` -> `hyb_fill` -> `hyb_fwd` ->
//! `hyb_l1`, then **one 12-byte read of the status word** (a host sync): if the active pool or
//! the gate's spill buffer was too small, both are grown to the size the kernels report and
//! the forward reruns (never drops). What survives until the backward is [`HybridState`]: the
//! exact token-major CSR of the actives (`row_ptr`, unit, bf16 relu(g), fp32 u: 14 B per active)
//! and its unit-major transpose (`cpos`, and `uspan`: the units heaviest first with their
//! spans): no dense `[N, H]` tensor.
//! The forward scratch (TwELL tiles, counting-sort tables) is allocated per call from tch's
//! caching allocator and freed when the forward returns.
//!
//! Backward (`hybrid_backward`): `hyb_bwd_tok` (dh, du, dg per active; dx) -> `hyb_bwd_w`
//! (dWg, dWu, dWd^T: new bf16 tensors, every row written, or [`WeightGrads::AddInto`] f32
//! gradients such as the fp32 masters' `.grad`, added into by the kernel). No sync.
//!
//! Shapes: `x, dy: [N, D]`, `Wg, Wu, Wd^T: [H, D]`, all bf16 contiguous (callers cast);
//! `D % 64 == 0`, `D <= 8192`, `H <= 65536` and `4 H` bytes of shared memory per block
//! ([`HybridKernels::supports`]). fp32 accumulation, deterministic.
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, CudaModule};
use tch::{Device, Kind, Tensor};

use super::consts::{
    HCTRL_WORDS, HC_GSPILL, HC_NNZ, HC_STATUS, HYB_BLK, HYB_BWD_W_SLICE, HYB_BWD_W_THREADS,
    HYB_SCAN_THREADS, HYB_SEG, HYB_THREADS, MAX_TILES, ROW_GRANULES, ROW_GRANULES_WIDE,
    ST_NNZ_OVER, TILE_COLS,
};
use super::hybrid_sizes::{self, PoolSizes};
use super::image::load_image;
use super::launch::{
    check_device_scalar, check_tensor, cuda_ordinal, hyb_bwd_tok, hyb_bwd_w, hyb_count, hyb_fill,
    hyb_fwd, hyb_l1, hyb_scan, hyb_segscan, hyb_unitscan, load_functions, load_once, ptr,
    row_kernel_max_d, LaunchShape, PerDevice,
};
use super::twell::{TwellKernels, TwellWorkspace};
use super::{CudaKernelError, Result};

/// Words per gate tile: C = 8 (31 actives inline, more spill to a 256-entry slot).
const TW: i64 = 32;
/// Static shared memory of hyb_count / hyb_fill (`int pre[8][MAX_TILES + 1]`).
const FILL_STATIC_SMEM: i64 = 8 * (MAX_TILES + 1) * 4;
/// Most grow-and-rerun rounds of one forward (each at least doubles what was short).
const MAX_ROUNDS: usize = 4;

/// The hybrid module of one device, with the TwELL module whose gate it uses.
pub struct HybridKernels {
    tw: Arc<TwellKernels>,
    _module: Arc<CudaModule>,
    count: CudaFunction,
    segscan: CudaFunction,
    unitscan: CudaFunction,
    scan: CudaFunction,
    fill: CudaFunction,
    fwd: [CudaFunction; 2],
    l1: CudaFunction,
    bwd_tok: [CudaFunction; 2],
    /// `hyb_bwd_w` (bf16 gradients) and `hyb_bwd_w_acc` (added into f32).
    bwd_w: [CudaFunction; 2],
    /// Largest dynamic shared memory hyb_count / hyb_fill may take (bytes).
    max_dyn_smem: i64,
}

impl HybridKernels {
    fn load(ordinal: usize) -> Result<Self> {
        let tw = TwellKernels::for_device(Device::Cuda(ordinal))?;
        let ctx = tw.ctx.clone();
        let (module, _) = load_image(&ctx, "hybrid")?;
        let f = |name: &str| module.load_function(name);
        let optin = ctx.attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )? as i64;
        let max_dyn_smem = (optin - FILL_STATIC_SMEM - 1024).max(0);
        let [count, fill] = load_functions(&module, ["hyb_count", "hyb_fill"], max_dyn_smem)?;
        Ok(Self {
            segscan: f("hyb_segscan")?,
            unitscan: f("hyb_unitscan")?,
            scan: f("hyb_scan")?,
            fwd: [f("hyb_fwd")?, f("hyb_fwd_wide")?],
            l1: f("hyb_l1")?,
            bwd_tok: [f("hyb_bwd_tok")?, f("hyb_bwd_tok_wide")?],
            bwd_w: [f("hyb_bwd_w")?, f("hyb_bwd_w_acc")?],
            count,
            fill,
            max_dyn_smem,
            _module: module,
            tw,
        })
    }

    /// The loaded module of `device`, loaded once per process.
    pub fn for_device(device: Device) -> Result<Arc<HybridKernels>> {
        static LOADED: PerDevice<HybridKernels> = OnceLock::new();
        load_once(&LOADED, device, HybridKernels::load)
    }

    /// The device's name as the driver reports it.
    pub fn device_name(&self) -> &str {
        self.tw.device_name()
    }

    /// Whether the kernels take `[N, D] x [H, D]` (otherwise callers fall back to dense ops).
    pub fn supports(&self, n: i64, d: i64, h: i64) -> bool {
        n >= 1
            && d >= 64
            && d % 64 == 0
            && d <= row_kernel_max_d(HYB_THREADS, ROW_GRANULES_WIDE)
            && (1..=MAX_TILES * TILE_COLS).contains(&h)
            && 4 * h <= self.max_dyn_smem
            && n.checked_mul(h).is_some_and(|p| p < i32::MAX as i64)
    }
}

/// What the hybrid forward keeps for the backward: the exact CSR of the actives and its
/// transpose. Bytes: 14 per active (`ecol`, `eg`, `eu`, and `cpos`, each entry's place in the
/// unit-major order), 4 (N + 1) for `row_ptr`, 16 H for `uspan`, and the status words.
pub struct HybridState {
    n: i64,
    d: i64,
    h: i64,
    nnz: i64,
    row_ptr: Tensor,
    ecol: Tensor,
    eg: Tensor,
    eu: Tensor,
    cpos: Tensor,
    uspan: Tensor,
    hctrl: Tensor,
}

impl HybridState {
    /// Actives of the forward (all tokens, all units); the pool's size when its status
    /// check was deferred.
    pub fn nnz(&self) -> i64 {
        self.nnz
    }

    /// Device bytes held from the forward to the backward.
    pub fn saved_bytes(&self) -> i64 {
        [
            &self.row_ptr,
            &self.ecol,
            &self.eg,
            &self.eu,
            &self.cpos,
            &self.uspan,
            &self.hctrl,
        ]
        .iter()
        .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
        .sum()
    }
}

/// The forward's results besides the state.
pub struct HybridForward {
    /// `[N, D]` bf16.
    pub y: Tensor,
    /// 0-dim f32: sum over tokens and units of |h|.
    pub l1_sum: Tensor,
    /// `[N]` int64: actives per token (`relu(g) > 0`), from the kernels' counts.
    pub active_per_token: Tensor,
    /// `[H]` int64: tokens per unit.
    pub active_per_unit: Tensor,
    /// `[2]` int64: token rows with a gate tile over 31 actives (stored in a spill slot,
    /// exact), and 0 (the CSR has no fixed width: nothing lies beyond a capacity).
    pub overflow_rows: Tensor,
    /// How often the pool or the spill buffer had to grow (the forward reran).
    pub grows: usize,
    pub state: HybridState,
}

/// Hybrid forward of `y = (relu(x Wg^T) * (x Wu^T)) Wd^T` and `l1_sum = sum |h|` on tch's
/// current stream. Inputs bf16 contiguous on one CUDA device. Exact: grows and reruns until
/// the status word is clean (one host sync per round), or, for a shape of known sizes while
/// [`DeferredChecks`](super::hybrid_sizes::DeferredChecks) are open, leaves the status to
/// those checks (no sync; the caller reruns its step on an overflow).
pub fn hybrid_forward(x: &Tensor, wg: &Tensor, wu: &Tensor, wdt: &Tensor) -> Result<HybridForward> {
    let device = x.device();
    let k = HybridKernels::for_device(device)?;
    let (n, d) = x.size2()?;
    let h = wg.size().first().copied().unwrap_or(0);
    check_tensor("x", x, Kind::BFloat16, &[n, d], device)?;
    for (name, w) in [("Wg", wg), ("Wu", wu), ("Wd^T", wdt)] {
        check_tensor(name, w, Kind::BFloat16, &[h, d], device)?;
    }
    if !k.supports(n, d, h) {
        return Err(CudaKernelError::Shape(format!(
            "hybrid kernels: N={n} D={d} H={h} not supported (D % 64 == 0, D <= 8192, 4H <= {} B)",
            k.max_dyn_smem
        )));
    }
    let stream = k.tw.bind(device)?;
    let ordinal = cuda_ordinal(device)?;
    let ntiles = (h + TILE_COLS - 1) / TILE_COLS;
    let key = (ordinal, n, d, h);
    let max_spill = n * ntiles;
    let deferred = hybrid_sizes::defers(key);
    let mut sizes = hybrid_sizes::known_sizes(key).unwrap_or(PoolSizes::initial(n, ntiles));
    let i32o = (Kind::Int, device);
    let nblk = (n + HYB_BLK - 1) / HYB_BLK;
    let nseg = (nblk + HYB_SEG - 1) / HYB_SEG;
    // Scratch of this forward (freed on return) and the per-call state.
    let row_cnt = Tensor::f_empty([n], i32o)?;
    let blkcnt = Tensor::f_empty([nblk * h], (Kind::Uint8, device))?;
    let boff = Tensor::f_empty([nblk * h], (Kind::Int16, device))?;
    let segoff = Tensor::f_empty([nseg * h], i32o)?;
    let unit_cnt = Tensor::f_empty([h], i32o)?;
    let l1_tok = Tensor::f_empty([n], (Kind::Float, device))?;
    let l1 = Tensor::f_empty([1], (Kind::Float, device))?;
    let row_ptr = Tensor::f_empty([n + 1], i32o)?;
    let unit_ptr = Tensor::f_empty([h + 1], i32o)?;
    let uspan = Tensor::f_empty([h, 4], i32o)?;
    let hctrl = Tensor::f_zeros([HCTRL_WORDS], i32o)?;
    let y = Tensor::f_empty([n, d], (Kind::BFloat16, device))?;
    let (ni, di, hi) = (n as i32, d as i32, h as i32);
    let (nti, twi) = (ntiles as i32, TW as i32);
    let (nblki, nsegi) = (nblk as i32, nseg as i32);
    let smem = (4 * h) as u32;
    let wide = usize::from(d > row_kernel_max_d(HYB_THREADS, ROW_GRANULES));
    let mut grows = 0;
    loop {
        let PoolSizes { cap, spill_cap } = sizes;
        let ws = TwellWorkspace::new(n, d, h, TW, 128, Some(spill_cap), 0, device)?;
        let ecol = Tensor::f_empty([cap], i32o)?;
        let eg = Tensor::f_empty([cap], (Kind::Int16, device))?;
        let eu = Tensor::f_empty([cap], (Kind::Float, device))?;
        let cpos = Tensor::f_empty([cap], i32o)?;
        k.tw.gate(stream, &ws, x, wg)?;
        let (twp, spp, gcp) = (ptr(&ws.twell), ptr(&ws.spill), ptr(&ws.ctrl));
        let (rcp, bcp, bop, sop, ucp) = (
            ptr(&row_cnt),
            ptr(&blkcnt),
            ptr(&boff),
            ptr(&segoff),
            ptr(&unit_cnt),
        );
        let (rpp, upp, uop, hcp) = (ptr(&row_ptr), ptr(&unit_ptr), ptr(&uspan), ptr(&hctrl));
        let (ecp, egp, eup, cpp) = (ptr(&ecol), ptr(&eg), ptr(&eu), ptr(&cpos));
        let (xp, wup, wdp, yp, ltp, l1p) =
            (ptr(x), ptr(wu), ptr(wdt), ptr(&y), ptr(&l1_tok), ptr(&l1));
        let capi = cap as i32;
        let hgrid = ((h + HYB_THREADS - 1) / HYB_THREADS) as u32;
        let shape = LaunchShape::on(stream);
        let blocks = (nblk as u32, 1);
        // SAFETY: the launchers carry the kernels' parameter lists; every buffer is sized
        // above for (N, D, H, cap).
        unsafe {
            hyb_count(
                &k.count,
                shape(blocks, HYB_THREADS, smem),
                twp,
                spp,
                ni,
                hi,
                nti,
                twi,
                rcp,
                bcp,
            )?;
            hyb_segscan(
                &k.segscan,
                shape((hgrid, nseg as u32), HYB_THREADS, 0),
                bcp,
                bop,
                sop,
                nblki,
                hi,
            )?;
            hyb_unitscan(
                &k.unitscan,
                shape((hgrid, 1), HYB_THREADS, 0),
                sop,
                ucp,
                nsegi,
                hi,
            )?;
            hyb_scan(
                &k.scan,
                shape((1, 1), HYB_SCAN_THREADS, 0),
                rcp,
                rpp,
                ucp,
                upp,
                uop,
                ni,
                hi,
                capi,
                gcp,
                hcp,
            )?;
            hyb_fill(
                &k.fill,
                shape(blocks, HYB_THREADS, smem),
                twp,
                spp,
                ni,
                hi,
                nti,
                twi,
                rpp,
                upp,
                bop,
                sop,
                hcp,
                ecp,
                egp,
                cpp,
            )?;
            hyb_fwd(
                &k.fwd[wide],
                shape((n as u32, 1), HYB_THREADS, (2 * d) as u32),
                xp,
                wup,
                wdp,
                rpp,
                ecp,
                egp,
                eup,
                yp,
                ltp,
                hcp,
                di,
            )?;
            hyb_l1(&k.l1, shape((1, 1), HYB_SCAN_THREADS, 0), ltp, ni, l1p, hcp)?;
        }
        let (st, nnz) = if deferred {
            // The open checks take the status; the backward's scratch is sized for the pool.
            hybrid_sizes::record(key, &hctrl)?;
            (0, cap)
        } else {
            // The one host sync: status, actives, spill slots asked for.
            let ctl = Vec::<i32>::try_from(hctrl.f_narrow(0, 0, 3)?.f_to_device(Device::Cpu)?)
                .map_err(CudaKernelError::Torch)?;
            let word = |i: i64| ctl[i as usize] as i64;
            let (st, nnz, gspill) = (word(HC_STATUS), word(HC_NNZ), word(HC_GSPILL));
            sizes = sizes.grown(st, nnz, gspill, max_spill);
            if st == 0 {
                // Sizes for the next forward of this shape: what sufficed, with headroom.
                let kept = sizes.grown(ST_NNZ_OVER, nnz, 0, max_spill);
                hybrid_sizes::keep_sizes(key, kept, max_spill);
            }
            (st, nnz)
        };
        if st == 0 {
            let f = |t: Tensor| t.f_to_kind(Kind::Int64);
            let counts = ws.twell.f_view([n, ntiles, TW])?.f_select(2, 0)?;
            let spilled_rows = counts
                .f_gt(TW - 1)?
                .f_any_dim(-1, false)?
                .f_sum(Kind::Int64)?;
            let overflow_rows = Tensor::f_stack(
                &[spilled_rows, Tensor::f_zeros([], (Kind::Int64, device))?],
                0,
            )?;
            return Ok(HybridForward {
                y,
                l1_sum: l1.f_reshape([])?,
                active_per_token: f(row_cnt)?,
                active_per_unit: f(unit_cnt)?,
                overflow_rows,
                grows,
                state: HybridState {
                    n,
                    d,
                    h,
                    nnz,
                    row_ptr,
                    ecol,
                    eg,
                    eu,
                    cpos,
                    uspan,
                    hctrl,
                },
            });
        }
        grows += 1;
        if grows >= MAX_ROUNDS {
            return Err(CudaKernelError::Shape(format!(
                "hybrid forward: status {st} after {MAX_ROUNDS} rounds (nnz {nnz}, cap {cap}, spill cap {spill_cap})"
            )));
        }
    }
}

/// Where [`hybrid_backward`] puts the weight gradients.
pub enum WeightGrads<'a> {
    /// New bf16 `[H, D]` tensors, returned.
    Return,
    /// Added into these f32 `[H, D]` contiguous tensors (dWg, dWu, dWd^T; e.g. the fp32
    /// masters' `.grad`) by the kernel itself: no bf16 gradient and no separate add.
    AddInto([&'a Tensor; 3]),
}

/// Hybrid backward: `dx [N, D]` (bf16) and, with [`WeightGrads::Return`], `[dWg, dWu, dWd^T]`
/// (`[H, D]` bf16), on tch's current stream. `x, Wg, Wu, Wd^T` are the forward's (bf16
/// contiguous), `dy: [N, D]` bf16 contiguous, `dl1`: the gradient of `l1_sum`, a 1-element f32
/// tensor on the device.
#[allow(clippy::too_many_arguments)]
pub fn hybrid_backward(
    s: &HybridState,
    x: &Tensor,
    wg: &Tensor,
    wu: &Tensor,
    wdt: &Tensor,
    dy: &Tensor,
    dl1: &Tensor,
    weight_grads: WeightGrads,
) -> Result<(Tensor, Option<[Tensor; 3]>)> {
    let device = x.device();
    let k = HybridKernels::for_device(device)?;
    let (n, d, h) = (s.n, s.d, s.h);
    check_tensor("x", x, Kind::BFloat16, &[n, d], device)?;
    check_tensor("dy", dy, Kind::BFloat16, &[n, d], device)?;
    for (name, w) in [("Wg", wg), ("Wu", wu), ("Wd^T", wdt)] {
        check_tensor(name, w, Kind::BFloat16, &[h, d], device)?;
    }
    check_device_scalar("dl1", dl1, device)?;
    if s.row_ptr.device() != device {
        return Err(CudaKernelError::Shape(format!(
            "hybrid state on {:?}, tensors on {device:?}",
            s.row_ptr.device()
        )));
    }
    let stream = k.tw.bind(device)?;
    let bf = (Kind::BFloat16, device);
    let rec = Tensor::f_empty([s.nnz.max(1) * 4], (Kind::Float, device))?;
    let dx = Tensor::f_empty([n, d], bf)?;
    let new = || Tensor::f_empty([h, d], bf);
    let (returned, (dgp, dup, ddp)) = match weight_grads {
        WeightGrads::Return => {
            let r = [new()?, new()?, new()?];
            let p = (ptr(&r[0]), ptr(&r[1]), ptr(&r[2]));
            (Some(r), p)
        }
        WeightGrads::AddInto(into) => {
            for (name, g) in ["dWg", "dWu", "dWd^T"].into_iter().zip(into) {
                check_tensor(name, g, Kind::Float, &[h, d], device)?;
            }
            (None, (ptr(into[0]), ptr(into[1]), ptr(into[2])))
        }
    };
    let (dyp, dlp, wgp, wup, wdp, xp) = (ptr(dy), ptr(dl1), ptr(wg), ptr(wu), ptr(wdt), ptr(x));
    let (rpp, ecp, egp, eup, rcp, dxp, hcp) = (
        ptr(&s.row_ptr),
        ptr(&s.ecol),
        ptr(&s.eg),
        ptr(&s.eu),
        ptr(&rec),
        ptr(&dx),
        ptr(&s.hctrl),
    );
    let (usp, cpp) = (ptr(&s.uspan), ptr(&s.cpos));
    let (di, hi) = (d as i32, h as i32);
    let wide = usize::from(d > row_kernel_max_d(HYB_THREADS, ROW_GRANULES));
    let slices = ((d + HYB_BWD_W_SLICE - 1) / HYB_BWD_W_SLICE) as u32;
    let shape = LaunchShape::on(stream);
    // SAFETY: as in hybrid_forward; rec holds 4 floats per active of the forward.
    unsafe {
        hyb_bwd_tok(
            &k.bwd_tok[wide],
            shape((n as u32, 1), HYB_THREADS, (2 * d) as u32),
            dyp,
            dlp,
            wgp,
            wup,
            wdp,
            rpp,
            ecp,
            egp,
            eup,
            cpp,
            rcp,
            dxp,
            hcp,
            di,
        )?;
        hyb_bwd_w(
            &k.bwd_w[usize::from(returned.is_none())],
            shape((slices * h as u32, 1), HYB_BWD_W_THREADS, 0),
            xp,
            dyp,
            usp,
            rcp,
            dgp,
            dup,
            ddp,
            hcp,
            di,
            hi,
        )?;
    }
    Ok((dx, returned))
}
