//! The sparse gated FFN op: one interface, several paths.
use tch::{Kind, Tensor};

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
            other => Err(format!("unknown FFN path `{other}` (expected dense, twell or hybrid)")),
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
}

/// Runs the gated FFN on `x: [N, D]`.
pub fn sparse_ffn(x: &Tensor, w: &FfnWeights, path: FfnPath) -> FfnOutput {
    match path {
        FfnPath::Dense | FfnPath::Twell | FfnPath::Hybrid => dense_ffn(x, w),
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
    FfnOutput { y, l1_sum, active_per_token, active_per_unit }
}
