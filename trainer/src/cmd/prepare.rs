//! `sparse-train prepare`: tokenize text files into token shards
//! ([`crate::data::prepare`] does the work).
use crate::data::prepare::prepare;
use crate::data::tokenizer::Tokenizer;
use anyhow::Result;
use std::path::PathBuf;

/// Arguments of `sparse-train prepare`.
#[derive(clap::Args, Debug, Clone)]
pub struct PrepareArgs {
    /// Input files: .parquet (a `text` column), .jsonl, .jsonl.gz, .jsonl.zst (a `text` field
    /// per line), .txt (one document per file).
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// `gpt2` (bundled, offline), or a Hugging Face tokenizer.json.
    #[arg(long, default_value = "gpt2")]
    pub tokenizer: String,
    /// The end-of-text token appended to each document [default: the tokenizer's
    /// <|endoftext|>, <|end_of_text|>, </s>, <eos> or <|eot_id|>].
    #[arg(long)]
    pub eot_token: Option<String>,
    #[arg(long)]
    pub out: PathBuf,
    /// Tokens per shard file.
    #[arg(long, default_value_t = 64 << 20)]
    pub shard_tokens: usize,
    /// Tokenizer threads (0: every core); the shards are the same at any count.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

pub fn run(args: &PrepareArgs) -> Result<()> {
    let tokenizer = Tokenizer::load(&args.tokenizer, args.eot_token.as_deref())?;
    let stats = prepare(
        &args.input,
        &args.out,
        &tokenizer,
        args.shard_tokens,
        args.threads,
    )?;
    println!(
        "prepared {} documents, {} tokens ({} tokenizer, vocabulary {}), {} shard(s) in {} ({:.1} s, {:.2} M tokens/s)",
        stats.documents,
        stats.tokens,
        tokenizer.name,
        tokenizer.vocab_size,
        stats.shards,
        args.out.display(),
        stats.seconds,
        stats.tokens as f64 / stats.seconds.max(1e-9) / 1e6
    );
    Ok(())
}
