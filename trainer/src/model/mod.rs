//! The model: a Llama-style decoder with the ReLU-gated sparse FFN, written for one device
//! ([`llama`]), its attention core and KV cache, the generation loop, and the
//! tensor-parallel primitives that split it over a group of ranks ([`parallel`]).
mod attention;
pub mod generate;
pub mod kv_cache;
pub mod llama;
pub mod parallel;

pub use generate::{generate_tokens, synchronize, GenStats, Sampler};
pub use kv_cache::KvCache;
pub use llama::{
    cross_entropy, rms_norm, to_bf16, Block, CachedOutput, ComputeWeights, ForwardOutput,
    LayerStats, Llama, TrainingForward,
};
