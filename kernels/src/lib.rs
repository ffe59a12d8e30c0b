//! sparse-kernels: the sparse gated FFN of sparse-train.
//!
//! The FFN is `h = relu(x Wg^T) * (x Wu^T)`, `y = h Wd^T`. All three weights are stored
//! as `[H, D]` row-major (the down projection as its transpose `Wd^T`), so every sparse
//! kernel reads whole contiguous rows of the live units and tensor parallelism splits all
//! three along the same axis. Checkpoints export `down_proj.weight` in the HF `[D, H]` layout.
//!
//! [`ffn::sparse_ffn`] is the one entry point; it runs the `dense`, `twell` or `hybrid` path
//! and callers never branch on the device.
pub mod ffn;

pub use ffn::{sparse_ffn, FfnOutput, FfnPath, FfnWeights};
