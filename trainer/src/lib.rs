//! sparse-train: train and serve Llama-style models whose FFN is >99 % sparse.
//!
//! One room per job: [`model`] (the decoder, KV cache, generation, tensor-parallel
//! primitives), [`train`] (the loop and its log), [`sparsity`] (lambda schedule, path
//! choice, activity, dead units, repack), [`checkpoint`] (state, restore, inference load),
//! [`data`] (shards, loader, tokenization), [`optim`], [`config`], the subcommands in
//! [`cmd`] and the GPU benchmarks in [`bench`]. Imports point one way: `model` uses only
//! `config`; `sparsity` uses `model`; `checkpoint` uses both; `train` uses all of them.
pub mod bench;
pub mod checkpoint;
pub mod cmd;
pub mod config;
pub mod data;
pub mod model;
pub mod optim;
pub mod sparsity;
pub mod train;
