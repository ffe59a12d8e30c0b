//! The CPU side of the sparse FFN: the packed formats of the gate activations and the
//! reference computed from their non-zeros.
//!
//! [`twell`] is the inference layout (tile-wise ELL, bf16 values, the layout the CUDA TwELL
//! kernels write), [`ell_tail`] the ELL + dense-tail layout of the CPU `hybrid` path, and
//! [`reference`] the forward and backward computed from either through [`SparseRows`].
pub mod ell_tail;
pub mod reference;
pub mod twell;

pub use ell_tail::{EllTailConfig, EllTailError, EllTailMatrix, EllTailStats};
pub use reference::{
    DenseLengthError, Element, FfnGrads, FfnProblem, ForwardResult, ReferenceError, SparseRows,
};
pub use twell::{TwellConfig, TwellError, TwellMatrix};
