//! The CUDA kernel arms: TwELL inference (no autograd node) and the hybrid training kernels
//! (forward and backward inside `SparseFfn`). Both run on tch's current stream in bf16.
use tch::{Kind, TchError, Tensor};

use super::{add_weight_grads, GradsInto, Inputs};
use crate::cuda::{self, HybridState, TwellLaunch, WeightGrads, TILE_COLS};
use crate::format::TwellConfig;
use crate::fused::master_weights::add_product;
use crate::types::{FfnError, FfnWeights};

/// Words per tile of the TwELL kernels for `cfg`, `None` where they do not take it (tiles
/// of other than 256 columns, a compression other than 8, 4 or 2).
pub(super) fn twell_words_per_tile(cfg: &TwellConfig) -> Option<i64> {
    (cfg.tile as i64 == TILE_COLS && [2, 4, 8].contains(&cfg.compression))
        .then(|| TILE_COLS / cfg.compression as i64)
}

/// The TwELL inference kernels, no gradient: `y` in x's dtype, `l1_sum` NaN on the CPU (the
/// kernels never form |h|), the counts from the packed format (`relu(g) > 0`), `overflow_rows` the
/// rows with a spilled tile; empty counts with `statistics` off.
pub(super) fn twell_forward(
    words_per_tile: i64,
    statistics: bool,
    x: &Tensor,
    w: &FfnWeights,
) -> Result<[Tensor; 5], FfnError> {
    let n = x.size()[0];
    let launch = TwellLaunch {
        tw: words_per_tile,
        ..TwellLaunch::for_tokens(n)
    };
    let _guard = tch::no_grad_guard();
    let (y, stats) = cuda::twell_ffn(x, w.gate, w.up, w.down_t, launch, statistics)?;
    let (apt, apu, overflow) = match stats {
        Some(s) => s,
        None => {
            let empty = || Tensor::f_zeros([0], (Kind::Int64, x.device()));
            (empty()?, empty()?, empty()?)
        }
    };
    let y = if y.kind() == x.kind() {
        y
    } else {
        y.f_to_kind(x.kind())?
    };
    // A CPU scalar: no device work (a decode step runs this once per layer).
    let l1 = Tensor::from(f32::NAN);
    Ok([y, l1, apt, apu, overflow])
}

fn bf16(t: &Tensor) -> Result<Tensor, TchError> {
    t.f_to_kind(Kind::BFloat16)?.f_contiguous()
}

/// `[x, Wg, Wu, Wd^T]` as the kernels take them: bf16 contiguous.
fn bf16_operands(t: &Inputs) -> Result<[Tensor; 4], TchError> {
    Ok([bf16(t.x)?, bf16(t.gate)?, bf16(t.up)?, bf16(t.down_t)?])
}

/// The gradient of `l1_sum` as the kernels read it: one contiguous f32 on the device.
fn device_dl1(dl1: &Tensor) -> Result<Tensor, TchError> {
    dl1.f_to_kind(Kind::Float)?.f_reshape([1])?.f_contiguous()
}

/// The hybrid forward (the caller checked [`cuda::HybridKernels::supports`]): `y` in
/// autocast's dtype under autocast, else x's; `l1_sum` f32; the counts are the kernels' (no
/// host sync beyond the forward's one status read).
pub(super) fn hybrid_forward(t: &Inputs) -> Result<([Tensor; 5], HybridState), FfnError> {
    let _guard = tch::no_grad_guard();
    let [x, gate, up, down_t] = bf16_operands(t)?;
    let f = cuda::hybrid_forward(&x, &gate, &up, &down_t)?;
    // Under autocast y takes autocast's dtype, as the dense path's matmuls would give; else
    // x's (the trainer casts explicitly and leaves autocast off).
    let kind = crate::torch::cuda_runtime::cuda_autocast_kind().unwrap_or(t.x.kind());
    let outs = [
        f.y.f_to_kind(kind)?,
        f.l1_sum,
        f.active_per_token,
        f.active_per_unit,
        f.overflow_rows,
    ];
    Ok((outs, f.state))
}

/// Whether the kernels can add into `into` themselves: f32 contiguous gradient buffers.
fn kernel_addable(into: GradsInto<'_>) -> Option<[&Tensor; 3]> {
    into.filter(|gs| {
        gs.iter()
            .all(|g| g.kind() == Kind::Float && g.is_contiguous())
    })
}

/// `[dx, dWg, dWu, dWd^T]` in the dtypes of x and the weights (bf16 kernels, converted);
/// with `into`, the weight-gradient kernel adds into those buffers (f32) and the last three
/// are undefined.
pub(super) fn hybrid_backward(
    state: &HybridState,
    t: &Inputs,
    dy: &Tensor,
    dl1: &Tensor,
    into: GradsInto,
) -> Result<[Tensor; 4], FfnError> {
    let _guard = tch::no_grad_guard();
    let [x, gate, up, down_t] = bf16_operands(t)?;
    let weight_grads = match kernel_addable(into) {
        Some(gs) => WeightGrads::AddInto(gs),
        None => WeightGrads::Return,
    };
    let (dx, dw) = cuda::hybrid_backward(
        state,
        &x,
        &gate,
        &up,
        &down_t,
        &bf16(dy)?,
        &device_dl1(dl1)?,
        weight_grads,
    )?;
    let dx = dx.f_to_kind(t.x.kind())?;
    let Some([dwg, dwu, dwd]) = dw else {
        return Ok([dx, Tensor::new(), Tensor::new(), Tensor::new()]);
    };
    let grads = [
        dx,
        dwg.f_to_kind(t.gate.kind())?,
        dwu.f_to_kind(t.up.kind())?,
        dwd.f_to_kind(t.down_t.kind())?,
    ];
    add_weight_grads(grads, into)
}

/// What the dense training arm keeps for its backward: the two pre-activations (`h` is
/// recomputed there from them, bit for bit).
pub(super) struct DenseState {
    g: Tensor,
    u: Tensor,
}

/// The dense training arm's forward: cuBLAS for the three products, one gating kernel
/// between them for `h = relu(g) u`, its L1 and the counts (no ATen passes over `[N, H]`).
/// `y` in x's dtype (autocast's under autocast), `l1_sum` f32.
pub(super) fn dense_forward(t: &Inputs) -> Result<([Tensor; 5], DenseState), FfnError> {
    let _guard = tch::no_grad_guard();
    let [x, gate, up, down_t] = bf16_operands(t)?;
    let g = x.f_mm(&gate.f_tr()?)?;
    let u = x.f_mm(&up.f_tr()?)?;
    let f = cuda::gating::gating_forward(&g, &u)?;
    let y = f.h.f_mm(&down_t)?;
    let kind = crate::torch::cuda_runtime::cuda_autocast_kind().unwrap_or(t.x.kind());
    let outs = [
        y.f_to_kind(kind)?,
        f.l1_row.f_sum(Kind::Float)?,
        f.active_per_token,
        f.active_per_unit,
        Tensor::f_zeros([2], (Kind::Int64, t.x.device()))?,
    ];
    Ok((outs, DenseState { g, u }))
}

/// `[dx, dWg, dWu, dWd^T]` of the dense training arm, in the dtypes of x and the weights;
/// with `into`, the weight gradients are added there (by the GEMMs themselves into f32
/// buffers) and the last three are undefined.
pub(super) fn dense_backward(
    state: &DenseState,
    t: &Inputs,
    dy: &Tensor,
    dl1: &Tensor,
    into: GradsInto,
) -> Result<[Tensor; 4], FfnError> {
    let _guard = tch::no_grad_guard();
    let [x, gate, up, down_t] = bf16_operands(t)?;
    let dy = bf16(dy)?;
    let dh = dy.f_mm(&down_t.f_tr()?)?;
    let (dg, du, h) = cuda::gating::gating_backward(&state.g, &state.u, &dh, &device_dl1(dl1)?)?;
    drop(dh);
    let f32 = Kind::Float;
    let add = |g: &Tensor, a: &Tensor, b: &Tensor| {
        add_product(g, a, b).map_err(|e| FfnError::Bridge(e.to_string()))
    };
    // dx = du Wu + dg Wg: the second GEMM accumulates into the first's f32 result.
    let dx = du.f_mm_dtype(&up, f32)?;
    add(&dx, &dg, &gate)?;
    let dx = dx.f_to_kind(t.x.kind())?;
    if let Some([gg, gu, gd]) = kernel_addable(into) {
        // The weight-gradient GEMMs accumulate into the f32 buffers (beta = 1).
        add(gg, &dg.f_tr()?, &x)?;
        add(gu, &du.f_tr()?, &x)?;
        add(gd, &h.f_tr()?, &dy)?;
        return Ok([dx, Tensor::new(), Tensor::new(), Tensor::new()]);
    }
    // f32 results, rounded once to the operands' dtype: bf16 outputs would let cuBLAS
    // reduce split-K partial sums in bf16 (the long token sums of the weight gradients).
    let dwg = dg.f_tr()?.f_mm_dtype(&x, f32)?;
    let dwu = du.f_tr()?.f_mm_dtype(&x, f32)?;
    let dwd = h.f_tr()?.f_mm_dtype(&dy, f32)?;
    let grads = [
        dx,
        dwg.f_to_kind(t.gate.kind())?,
        dwu.f_to_kind(t.up.kind())?,
        dwd.f_to_kind(t.down_t.kind())?,
    ];
    add_weight_grads(grads, into)
}
