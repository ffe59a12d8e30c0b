//! Training data: the token shard format ([`shards`]), the deterministic loader over them
//! ([`loader`]) and text-to-shards tokenization ([`prepare`]).
pub mod loader;
pub mod prepare;
pub mod shards;

pub use loader::{DataLoader, TokenSource};
