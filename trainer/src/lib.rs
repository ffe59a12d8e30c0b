//! sparse-train: configs, model, data, optimizer, sparsity scheduler and the training loop.
pub mod bench;
pub mod bench_e2e;
pub mod checkpointing;
pub mod config;
pub mod corpus_cmd;
pub mod data;
pub mod dead_units;
pub mod generate;
pub mod inference;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod prepare;
pub mod repack;
pub mod scheduler;
pub mod stop;
pub mod train;
