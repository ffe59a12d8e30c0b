//! The vocabulary of the crate: which path runs a layer's FFN ([`FfnPath`]), its weights
//! ([`FfnWeights`]), what a call returns ([`FfnOutput`]), how it fails ([`FfnError`]) and the
//! format parameters of the sparse paths ([`SparseFfnConfig`]).
use tch::{Device, Kind, TchError, Tensor};
use thiserror::Error;

use crate::cuda::CudaKernelError;
use crate::format::{EllTailConfig, EllTailError, ReferenceError, TwellConfig, TwellError};

/// Which implementation runs a layer's FFN. Every path computes the same function up to
/// floating-point rounding; `Dense` is the oracle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FfnPath {
    /// tch ops and tch autograd.
    Dense,
    /// TwELL packed gate activations (inference layout).
    Twell,
    /// The training layout: the exact CSR/CSC pool of the CUDA kernels, the ELL + dense-tail
    /// format on the CPU.
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
    /// The master weights (`Wg, Wu, Wd^T`, `[H, D]` each, usually f32) of which the three
    /// above are compute copies (made once per optimizer step). When set, the backward adds
    /// the weight gradients into the masters' `.grad` (zero-filled when absent) and returns
    /// none for the copies; on CUDA the kernels add into it themselves (the hybrid
    /// weight-gradient kernel, cuBLAS with beta = 1): no compute-dtype gradient, no cast and
    /// no separate add per micro-batch.
    pub masters: Option<[&'a Tensor; 3]>,
}

impl<'a> FfnWeights<'a> {
    /// The weights `Wg, Wu, Wd^T`, differentiated as themselves (no masters).
    pub fn new(gate: &'a Tensor, up: &'a Tensor, down_t: &'a Tensor) -> Self {
        FfnWeights {
            gate,
            up,
            down_t,
            masters: None,
        }
    }

    /// These weights as compute copies of `masters` (see [`FfnWeights::masters`]).
    pub fn with_masters(self, masters: [&'a Tensor; 3]) -> Self {
        FfnWeights {
            masters: Some(masters),
            ..self
        }
    }
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
    /// `[2]` int64, no grad: token rows the packed format had to store apart (TwELL overflow
    /// rows or rows with a spilled tile, ELL + tail rows, hybrid kernel rows with a spilled
    /// gate tile), and how many of those lay beyond the configured tail capacity (only the
    /// CPU ELL + tail format has one; 0 elsewhere). Nothing is ever dropped; zeros on the
    /// dense path.
    pub overflow_rows: Tensor,
}

impl FfnOutput {
    /// The five outputs in the order the autograd function returns them: `y, l1_sum,
    /// active_per_token, active_per_unit, overflow_rows`.
    pub(crate) fn from_array(outs: [Tensor; 5]) -> Self {
        let [y, l1_sum, active_per_token, active_per_unit, overflow_rows] = outs;
        FfnOutput {
            y,
            l1_sum,
            active_per_token,
            active_per_unit,
            overflow_rows,
        }
    }
}

/// Format parameters of the sparse paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseFfnConfig {
    /// TwELL layout of `P: [N, H]` on the TwELL path (CPU, and the CUDA kernels where they
    /// take it: 256-column tiles, compression 2, 4 or 8).
    pub twell: TwellConfig,
    /// ELL + tail layout of `P: [N, H]` on the CPU hybrid path.
    pub ell_tail: EllTailConfig,
    /// ELL + tail layout of `P^T: [H, N]` (the backward of both CPU paths).
    pub ell_tail_transposed: EllTailConfig,
    /// Compute `l1_sum` and the activity counts. Inference turns it off: then, where no
    /// gradient is needed, the dense and CUDA TwELL paths skip that work (a pass over the
    /// packed format, one host synchronisation per call) and return `l1_sum` = NaN and
    /// empty (numel 0) counts. Paths that get the counts for free still return them.
    pub statistics: bool,
}

impl Default for SparseFfnConfig {
    fn default() -> Self {
        SparseFfnConfig {
            twell: TwellConfig::default(),
            ell_tail: EllTailConfig::TOKENS,
            ell_tail_transposed: EllTailConfig::UNITS,
            statistics: true,
        }
    }
}

/// Errors of the sparse FFN op.
#[derive(Debug, Error)]
pub enum FfnError {
    #[error("x must be [N, D], got {shape:?}")]
    InputShape { shape: Vec<i64> },
    #[error("{name} must be [H, D] with D = {d} and the same H as Wg = {h}, got {shape:?}")]
    WeightShape {
        name: &'static str,
        shape: Vec<i64>,
        h: i64,
        d: i64,
    },
    #[error("{name} is on {device:?} but x is on {x_device:?}")]
    Device {
        name: &'static str,
        device: Device,
        x_device: Device,
    },
    #[error("{name} has dtype {kind:?}; the sparse FFN takes f32 or bf16")]
    Dtype { name: &'static str, kind: Kind },
    #[error("the sparse FFN has no implementation on {device:?}")]
    UnsupportedDevice { device: Device },
    #[error(transparent)]
    Twell(#[from] TwellError),
    #[error(transparent)]
    EllTail(#[from] EllTailError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Torch(#[from] TchError),
    #[error("sparse FFN bridge: {0}")]
    Bridge(String),
    #[error("CUDA kernels: {0}")]
    Cuda(#[from] CudaKernelError),
}
