//! `sparse-train prepare`: tokenize text files into token shards
//! ([`crate::data::prepare`] does the work).
use crate::data::prepare::prepare;
use anyhow::{bail, Result};
use std::path::PathBuf;

/// Arguments of `sparse-train prepare`.
#[derive(clap::Args, Debug, Clone)]
pub struct PrepareArgs {
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// Tokenizer: `gpt2` (bundled, offline).
    #[arg(long, default_value = "gpt2")]
    pub tokenizer: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Tokens per shard file.
    #[arg(long, default_value_t = 64 << 20)]
    pub shard_tokens: usize,
}

pub fn run(args: &PrepareArgs) -> Result<()> {
    if args.tokenizer != "gpt2" {
        bail!("--tokenizer `{}`: only `gpt2` is supported", args.tokenizer);
    }
    let stats = prepare(&args.input, &args.out, args.shard_tokens)?;
    println!(
        "prepared {} documents, {} tokens, {} shard(s) in {}",
        stats.documents,
        stats.tokens,
        stats.shards,
        args.out.display()
    );
    Ok(())
}
