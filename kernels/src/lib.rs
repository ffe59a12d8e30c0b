//! sparse-kernels: the sparse gated FFN of sparse-train.
//!
//! The FFN is `h = relu(x Wg^T) * (x Wu^T)`, `y = h Wd^T`. All three weights are stored
//! as `[H, D]` row-major (the down projection as its transpose `Wd^T`), so every sparse
//! kernel reads whole contiguous rows of the live units and tensor parallelism splits all
//! three along the same axis. Checkpoints export `down_proj.weight` in the HF `[D, H]` layout.
//!
//! [`ffn::sparse_ffn`] is the one entry point; it runs the `dense`, `twell` or `hybrid` path
//! and callers never branch on the device.
//!
//! Modules: [`twell`] and [`hybrid`] are the packed formats of the gate activations,
//! [`reference`] the CPU reference computed from them, [`autograd`] the `SparseFfn` custom
//! autograd function (C++ side in `bridge/`) that the sparse paths run through.
pub mod autograd;
pub mod cuda;
pub mod cuda_runtime;
pub mod ffn;
pub mod hooks;
pub mod hybrid;
pub mod reference;
pub mod twell;

pub use autograd::{FfnError, SparseFfnConfig};
pub use ffn::{sparse_ffn, try_sparse_ffn, FfnOutput, FfnPath, FfnWeights};
