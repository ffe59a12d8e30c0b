//! GPU benchmarks: one FFN layer ([`ffn`]), whole-model training and inference ([`e2e`]),
//! generation ([`generate`]), and what the last two share ([`common`]).
pub mod common;
pub mod e2e;
pub mod ffn;
pub mod generate;
