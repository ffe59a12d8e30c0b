//! `sparse-train tokenizer train`: train a byte-level BPE tokenizer on text files and write it
//! as a Hugging Face tokenizer.json ([`crate::data::bpe_train`] does the work).
use crate::data::bpe_train::{train_bpe, BpeOptions};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `sparse-train tokenizer train`.
#[derive(clap::Args, Debug, Clone)]
pub struct TokenizerTrainArgs {
    /// Input files, in the formats `prepare` reads (.parquet, .jsonl, .jsonl.gz, .jsonl.zst,
    /// .txt).
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// Vocabulary entries, the 256 bytes and <|endoftext|> included.
    #[arg(long)]
    pub vocab_size: usize,
    /// Output tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Pairs seen fewer times are never merged.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
}

pub fn train(args: &TokenizerTrainArgs) -> Result<()> {
    let started = Instant::now();
    let opts = BpeOptions {
        vocab_size: args.vocab_size,
        min_frequency: args.min_frequency,
        show_progress: true,
    };
    let tok = train_bpe(&args.input, &opts)?;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, tok.json())
        .with_context(|| format!("writing {}", args.out.display()))?;
    if (tok.vocab_size as usize) < args.vocab_size {
        eprintln!(
            "note: the text has too few distinct pairs (of frequency >= {}) for {} entries: the vocabulary has {}",
            args.min_frequency, args.vocab_size, tok.vocab_size
        );
    }
    println!(
        "trained a {}-entry byte-level BPE ({} = id {}) in {:.1} s: {}",
        tok.vocab_size,
        tok.eot_token,
        tok.eot_id,
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
