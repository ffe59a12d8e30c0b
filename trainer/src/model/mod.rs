//! The model: a Llama-style decoder with the ReLU-gated sparse FFN, written for one device
//! ([`llama`]), its activation recompute (`recompute`), its attention core and KV cache, the
//! sampler, the fused inference forward ([`inference`]), the captured static-cache decoder
//! ([`decoder`]) and the eager generation loop it is checked against ([`generate`]), and the
//! tensor-parallel primitives that split it over a group of ranks ([`parallel`]).
mod attention;
pub mod decoder;
pub mod generate;
pub mod inference;
pub mod kv_cache;
pub mod llama;
pub mod parallel;
mod recompute;
pub mod sampler;

pub use decoder::{DecodeRun, Decoder};
pub use generate::{generate_tokens, synchronize, GenStats};
pub use inference::InferenceWeights;
pub use kv_cache::KvCache;
pub use llama::{
    cross_entropy, rms_norm, to_bf16, Block, CachedOutput, ComputeWeights, ForwardOutput,
    LayerStats, Llama, TrainingForward,
};
pub use sampler::Sampler;
