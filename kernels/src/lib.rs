//! sparse-kernels: the sparse gated FFN of sparse-train.
//!
//! The FFN is `h = relu(x Wg^T) * (x Wu^T)`, `y = h Wd^T`. All three weights are stored
//! as `[H, D]` row-major (the down projection as its transpose `Wd^T`), so every sparse
//! kernel reads whole contiguous rows of the live units and tensor parallelism splits all
//! three along the same axis. Checkpoints export `down_proj.weight` in the HF `[D, H]` layout.
//!
//! [`sparse_ffn`] / [`try_sparse_ffn`] is the one entry point; it runs the `dense`, `twell`
//! or `hybrid` path ([`FfnPath`]) and callers never branch on the device.
//!
//! Modules: [`types`] the vocabulary; [`op`] the op and its one dispatch (the `SparseFfn`
//! custom autograd function, C++ side in `bridge/`); [`format`] the CPU packed formats of
//! the gate activations and the reference computed from them; [`cuda`] the CUDA kernels;
//! [`torch`] the libtorch extensions ([`hooks`], [`cuda_runtime`]); [`fused`] the fused ops
//! outside the FFN (master-weight products, chunked linear + cross-entropy, multi-tensor
//! AdamW); [`testing`] the input generator of the GPU tests and benchmarks.
pub mod cuda;
pub mod format;
pub mod fused;
pub mod op;
pub mod testing;
pub mod torch;
pub mod types;

pub use op::dense::dense_ffn;
pub use op::{sparse_ffn, try_sparse_ffn};
pub use torch::{cuda_runtime, hooks};
pub use types::{FfnError, FfnOutput, FfnPath, FfnWeights, SparseFfnConfig};
