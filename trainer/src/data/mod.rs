//! Training data: the token shard format ([`shards`]) and its directory manifest
//! ([`manifest`]), the deterministic loader over them ([`loader`]), the input formats
//! ([`documents`]), tokenizers ([`tokenizer`]) and training one ([`bpe_train`]), and
//! text-to-shards tokenization ([`prepare`]).
pub mod bpe_train;
pub mod documents;
pub mod loader;
pub mod manifest;
pub mod prepare;
pub mod shards;
pub mod tokenizer;

pub use loader::{DataLoader, TokenSource};
