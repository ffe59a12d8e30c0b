//! Text to token shards (the work of `sparse-train prepare`).
//!
//! Inputs are `.jsonl` files (one JSON object with a `"text"` field per line, one document
//! each) or `.txt` files (the whole file is one document). Each document is tokenized with
//! the GPT-2 BPE (bundled with `tiktoken-rs`, works offline) and followed by the
//! end-of-text token; documents are concatenated and cut into shards of at most
//! `shard_tokens` tokens, written as `shard_00000.bin`, ... (format in [`super::shards`]).
use super::shards::write_shard;
use anyhow::{bail, Context, Result};
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// GPT-2's `<|endoftext|>`.
pub const GPT2_EOT: u32 = 50256;
pub const GPT2_VOCAB: u32 = 50257;

pub fn gpt2() -> Result<tiktoken_rs::CoreBPE> {
    tiktoken_rs::r50k_base().context("loading the bundled GPT-2 tokenizer")
}

/// Reads the documents of one input file.
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => {
            let f =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let mut docs = Vec::new();
            for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
                let line = line.with_context(|| format!("reading {}", path.display()))?;
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(&line)
                    .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
                match v.get("text").and_then(|t| t.as_str()) {
                    Some(t) => docs.push(t.to_string()),
                    None => bail!("{} line {}: no string field `text`", path.display(), i + 1),
                }
            }
            Ok(docs)
        }
        Some("txt") => Ok(vec![std::fs::read_to_string(path)
            .with_context(|| format!("reading {} as UTF-8 text", path.display()))?]),
        _ => bail!("input {}: expected a .jsonl or .txt file", path.display()),
    }
}

/// Summary of a prepare run.
#[derive(Debug, Default, serde::Serialize)]
pub struct PrepareStats {
    pub documents: usize,
    pub tokens: usize,
    pub shards: usize,
    pub text_bytes: usize,
}

/// Tokenizes `inputs` into shards under `out`. Existing shards in `out` are replaced.
pub fn prepare(inputs: &[PathBuf], out: &Path, shard_tokens: usize) -> Result<PrepareStats> {
    if inputs.is_empty() {
        bail!("prepare: no --input files given");
    }
    if shard_tokens == 0 {
        bail!("prepare: --shard-tokens must be > 0");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for e in std::fs::read_dir(out)?.flatten() {
        if e.path().extension().is_some_and(|x| x == "bin") {
            std::fs::remove_file(e.path())?;
        }
    }
    let bpe = gpt2()?;
    let mut stats = PrepareStats::default();
    let mut buf: Vec<u32> = Vec::with_capacity(shard_tokens.min(1 << 26));
    let flush = |buf: &mut Vec<u32>, stats: &mut PrepareStats| -> Result<()> {
        let path = out.join(format!("shard_{:05}.bin", stats.shards));
        write_shard(&path, buf, GPT2_VOCAB)?;
        stats.shards += 1;
        buf.clear();
        Ok(())
    };
    for input in inputs {
        let docs = read_documents(input)?;
        // Tokenize on every core; order is kept, so shards are deterministic.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .max(1);
        let chunk = docs.len().div_ceil(threads).max(1);
        let encoded: Vec<Vec<u32>> = std::thread::scope(|s| {
            let handles: Vec<_> = docs
                .chunks(chunk)
                .map(|part| {
                    let bpe = &bpe;
                    s.spawn(move || {
                        part.iter()
                            .map(|d| {
                                let mut t = bpe.encode_ordinary(d);
                                t.push(GPT2_EOT);
                                t
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("tokenizer thread"))
                .collect()
        });
        stats.documents += docs.len();
        stats.text_bytes += docs.iter().map(|d| d.len()).sum::<usize>();
        for doc in encoded {
            stats.tokens += doc.len();
            let mut rest = &doc[..];
            while !rest.is_empty() {
                let take = (shard_tokens - buf.len()).min(rest.len());
                buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if buf.len() == shard_tokens {
                    flush(&mut buf, &mut stats)?;
                }
            }
        }
    }
    if !buf.is_empty() {
        flush(&mut buf, &mut stats)?;
    }
    std::fs::write(
        out.join("prepare_stats.json"),
        serde_json::to_string_pretty(&stats)?,
    )?;
    Ok(stats)
}
