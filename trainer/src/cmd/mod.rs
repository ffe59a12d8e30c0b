//! The subcommands' bodies: argument structs (clap) and what each runs. `main.rs` only
//! dispatches to them.
pub mod corpus;
pub mod generate;
pub mod logits;
pub mod prepare;
pub mod tokenizer;
pub mod train;
