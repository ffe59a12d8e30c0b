//! The sparse gated FFN op: one interface, several paths.
use tch::{Kind, Tensor};

use crate::autograd::{self, FfnError, SparseFfnConfig, SparseFormat};

/// Which implementation runs a layer's FFN. Every path computes the same function up to
/// floating-point rounding; `Dense` is the oracle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FfnPath {
    /// tch ops and tch autograd.
    Dense,
    /// TwELL packed gate activations (inference layout).
    Twell,
    /// Hybrid ELL + dense-tail format (training layout).
    Hybrid,
}

impl FfnPath {
    pub fn name(self) -> &'static str {
        match self {
            FfnPath::Dense => "dense",
            FfnPath::Twell => "twell",
            FfnPath::Hybrid => "hybrid",
        }
    }

    /// Numeric id used in metrics (0 dense, 1 twell, 2 hybrid).
    pub fn id(self) -> u8 {
        match self {
            FfnPath::Dense => 0,
            FfnPath::Twell => 1,
            FfnPath::Hybrid => 2,
        }
    }
}

impl std::str::FromStr for FfnPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dense" => Ok(FfnPath::Dense),
            "twell" => Ok(FfnPath::Twell),
            "hybrid" => Ok(FfnPath::Hybrid),
            other => Err(format!(
                "unknown FFN path `{other}` (expected dense, twell or hybrid)"
            )),
        }
    }
}

/// The FFN weights of one layer, all `[H, D]`.
pub struct FfnWeights<'a> {
    /// `Wg: [H, D]`
    pub gate: &'a Tensor,
    /// `Wu: [H, D]`
    pub up: &'a Tensor,
    /// `Wd^T: [H, D]`
    pub down_t: &'a Tensor,
}

/// What one FFN call returns.
pub struct FfnOutput {
    /// `y: [N, D]`, differentiable.
    pub y: Tensor,
    /// `sum_t sum_j |h_tj|` over the N tokens of this call (a 0-dim f32 tensor,
    /// differentiable). The trainer divides by the global token count, so lambda is defined
    /// on the global mean over tokens whatever the world size or accumulation.
    pub l1_sum: Tensor,
    /// Active units per token, `[N]` int64, no grad.
    pub active_per_token: Tensor,
    /// Tokens on which each unit fired, `[H]` int64, no grad.
    pub active_per_unit: Tensor,
    /// `[2]` int64, no grad: token rows the packed format had to store whole in its dense
    /// part (TwELL overflow rows / hybrid tail rows), and how many of those lay beyond the
    /// configured tail capacity (always 0 for TwELL, whose overflow part is unbounded).
    /// Nothing is ever dropped; zeros on the dense path.
    pub overflow_rows: Tensor,
}

/// Runs the gated FFN on `x: [N, D]` with the default format parameters.
///
/// # Panics
/// On the errors of [`try_sparse_ffn`] (bad shapes or dtypes, unsupported device, an `H`
/// beyond TwELL's 16-bit column indices).
pub fn sparse_ffn(x: &Tensor, w: &FfnWeights, path: FfnPath) -> FfnOutput {
    try_sparse_ffn(x, w, path, &SparseFfnConfig::default())
        .unwrap_or_else(|e| panic!("{} FFN failed: {e}", path.name()))
}

/// Runs the gated FFN on `x: [N, D]`. `Twell` and `Hybrid` go through the `SparseFfn`
/// autograd function with the formats of `config`; `Dense` is [`dense_ffn`].
pub fn try_sparse_ffn(
    x: &Tensor,
    w: &FfnWeights,
    path: FfnPath,
    config: &SparseFfnConfig,
) -> Result<FfnOutput, FfnError> {
    match path {
        FfnPath::Dense if !config.statistics && !autograd::grad_needed(x, w) => {
            Ok(dense_ffn_inference(x, w))
        }
        FfnPath::Dense => Ok(dense_ffn(x, w)),
        FfnPath::Twell => autograd::apply(x, w, SparseFormat::Twell, config),
        FfnPath::Hybrid => autograd::apply(x, w, SparseFormat::Hybrid, config),
    }
}

/// The dense FFN without statistics or L1 (inference; see [`SparseFfnConfig::statistics`]):
/// three matrix products and the gating, `l1_sum` NaN, empty counts.
pub fn dense_ffn_inference(x: &Tensor, w: &FfnWeights) -> FfnOutput {
    let h = x.matmul(&w.gate.tr()).relu_() * x.matmul(&w.up.tr());
    let empty = || Tensor::zeros([0], (Kind::Int64, x.device()));
    FfnOutput {
        y: h.matmul(w.down_t),
        l1_sum: Tensor::full([], f64::NAN, (Kind::Float, x.device())),
        active_per_token: empty(),
        active_per_unit: empty(),
        overflow_rows: empty(),
    }
}

/// The dense oracle: tch ops, tch autograd.
pub fn dense_ffn(x: &Tensor, w: &FfnWeights) -> FfnOutput {
    let g = x.matmul(&w.gate.tr());
    let u = x.matmul(&w.up.tr());
    let h = g.relu() * u;
    let y = h.matmul(w.down_t);
    let l1_sum = h.abs().sum(Kind::Float);
    let (active_per_token, active_per_unit) = tch::no_grad(|| {
        let active = h.ne(0.0);
        (
            active.sum_dim_intlist(-1, false, Kind::Int64),
            active.sum_dim_intlist(0, false, Kind::Int64),
        )
    });
    let overflow_rows = Tensor::zeros([2], (Kind::Int64, x.device()));
    FfnOutput {
        y,
        l1_sum,
        active_per_token,
        active_per_unit,
        overflow_rows,
    }
}
