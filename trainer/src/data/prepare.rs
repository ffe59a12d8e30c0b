//! Text to token shards (the work of `sparse-train prepare`).
//!
//! Documents are read from the inputs in order ([`super::documents`]: parquet, JSONL plain,
//! gzip or zstd, text), tokenized on `threads` threads (each document independently, results
//! kept in document order, so the shards are byte-identical at any thread count), each
//! followed by the tokenizer's end-of-text token, concatenated and cut into shards of at most
//! `shard_tokens` tokens: `shard_00000.bin`, ... (format in [`super::shards`]). Beside them go
//! the tokenizer that made them (`tokenizer.json`) and `manifest.json` ([`ShardManifest`]).
use super::documents::for_each_batch;
use super::manifest::{ShardManifest, TokenizerRecord, MANIFEST_FILE};
use super::shards::write_shard;
use super::tokenizer::{Tokenizer, TOKENIZER_FILE};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Summary of a prepare run (what `manifest.json` records, plus the time taken).
#[derive(Debug, Default)]
pub struct PrepareStats {
    pub documents: usize,
    pub tokens: usize,
    pub shards: usize,
    pub text_bytes: usize,
    pub seconds: f64,
}

/// Tokenizes `inputs` with `tokenizer` into shards under `out` on `threads` threads (0: every
/// core). Existing shards, tokenizer and manifest in `out` are replaced.
pub fn prepare(
    inputs: &[PathBuf],
    out: &Path,
    tokenizer: &Tokenizer,
    shard_tokens: usize,
    threads: usize,
) -> Result<PrepareStats> {
    if inputs.is_empty() {
        bail!("prepare: no --input files given");
    }
    if shard_tokens == 0 {
        bail!("prepare: --shard-tokens must be > 0");
    }
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut input_bytes = 0;
    for input in inputs {
        super::documents::Format::of(input)?;
        input_bytes += std::fs::metadata(input)
            .with_context(|| format!("input {}", input.display()))?
            .len();
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for e in std::fs::read_dir(out)?.flatten() {
        let p = e.path();
        let name = e.file_name();
        if p.extension().is_some_and(|x| x == "bin")
            || name == MANIFEST_FILE
            || name == TOKENIZER_FILE
        {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }

    let started = Instant::now();
    let bar = progress_bar(input_bytes);
    let mut stats = PrepareStats::default();
    let mut shard_names = Vec::new();
    let mut buf: Vec<u32> = Vec::with_capacity(shard_tokens.min(1 << 26));
    let mut flush = |buf: &mut Vec<u32>, stats: &mut PrepareStats| -> Result<()> {
        let name = format!("shard_{:05}.bin", stats.shards);
        write_shard(&out.join(&name), buf, tokenizer.vocab_size)?;
        shard_names.push(name);
        stats.shards += 1;
        buf.clear();
        Ok(())
    };
    let mut bytes_before = 0;
    for input in inputs {
        for_each_batch(input, |docs, file_done| {
            let encoded = encode_parallel(tokenizer, &docs, threads)
                .with_context(|| format!("tokenizing {}", input.display()))?;
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
            bar.set_position(bytes_before + file_done);
            let rate = stats.tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{} tokens, {:.2} M tokens/s",
                stats.tokens,
                rate / 1e6
            ));
            Ok(())
        })?;
        bytes_before += std::fs::metadata(input).map_or(0, |m| m.len());
    }
    if !buf.is_empty() {
        flush(&mut buf, &mut stats)?;
    }
    bar.finish_and_clear();
    stats.seconds = started.elapsed().as_secs_f64();

    std::fs::write(out.join(TOKENIZER_FILE), tokenizer.json())
        .with_context(|| format!("writing {}", out.join(TOKENIZER_FILE).display()))?;
    let manifest = ShardManifest {
        tokenizer: TokenizerRecord::of(tokenizer),
        inputs: inputs.iter().map(|p| p.display().to_string()).collect(),
        documents: stats.documents,
        tokens: stats.tokens,
        text_bytes: stats.text_bytes,
        shards: shard_names,
    };
    manifest.write(out)?;
    Ok(stats)
}

/// The token ids of each document followed by the end-of-text token, in document order;
/// contiguous slices of `docs` go to `threads` threads.
fn encode_parallel(
    tokenizer: &Tokenizer,
    docs: &[String],
    threads: usize,
) -> Result<Vec<Vec<u32>>> {
    let encode = |part: &[String]| -> Result<Vec<Vec<u32>>> {
        part.iter()
            .map(|d| {
                let mut t = tokenizer.encode(d)?;
                t.push(tokenizer.eot_id);
                Ok(t)
            })
            .collect()
    };
    if threads <= 1 || docs.len() <= 1 {
        return encode(docs);
    }
    let chunk = docs.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = docs
            .chunks(chunk)
            .map(|part| s.spawn(move || encode(part)))
            .collect();
        let mut all = Vec::with_capacity(docs.len());
        for h in handles {
            all.extend(h.join().expect("a tokenizer thread panicked")?);
        }
        Ok(all)
    })
}

/// Bytes of input read, with tokens and tokens/s (drawn only on a terminal).
fn progress_bar(total_bytes: u64) -> ProgressBar {
    let bar = ProgressBar::new(total_bytes);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} {msg}")
            .expect("a valid template"),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::super::documents::tests::{write_jsonl, write_parquet};
    use super::super::shards::open_shards;
    use super::*;
    use parquet::basic::Compression;

    fn tokens_of(dir: &Path) -> Vec<u32> {
        open_shards(dir)
            .unwrap()
            .iter()
            .flat_map(|s| (0..s.tokens).map(|i| s.token(i)).collect::<Vec<_>>())
            .collect()
    }

    fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn docs(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                format!(
                    "Document {i}: the {} fox, {} times. ",
                    ["quick", "lazy"][i % 2],
                    i * 7
                )
                .repeat(1 + i % 5)
            })
            .collect()
    }

    #[test]
    fn parquet_and_zstd_jsonl_round_trip_through_prepare() {
        let d = tempfile::tempdir().unwrap();
        let docs = docs(40);
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let pq = d.path().join("part.parquet");
        write_parquet(&pq, &refs, 16, Compression::SNAPPY);
        let zst = d.path().join("part.jsonl.zst");
        write_jsonl(&zst, &refs);
        let tok = Tokenizer::gpt2().unwrap();
        let mut want = Vec::new();
        for doc in &docs {
            want.extend(tok.encode(doc).unwrap());
            want.push(tok.eot_id);
        }
        for (input, name) in [(&pq, "pq"), (&zst, "zst")] {
            let out = d.path().join(name);
            let stats = prepare(std::slice::from_ref(input), &out, &tok, 300, 2).unwrap();
            assert_eq!(stats.documents, 40);
            assert_eq!(tokens_of(&out), want, "{name}");
            assert!(stats.shards > 1);
            let m = ShardManifest::read(&out).unwrap().unwrap();
            assert_eq!(m.tokens, want.len());
            assert_eq!(m.tokenizer.sha256, tok.sha256());
            assert_eq!(std::fs::read(out.join(TOKENIZER_FILE)).unwrap(), tok.json());
        }
    }

    #[test]
    fn shards_are_byte_identical_at_any_thread_count() {
        let d = tempfile::tempdir().unwrap();
        let docs = docs(101);
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let a = d.path().join("a.jsonl");
        write_jsonl(&a, &refs[..60]);
        let b = d.path().join("b.parquet");
        write_parquet(&b, &refs[60..], 7, Compression::UNCOMPRESSED);
        let tok = Tokenizer::gpt2().unwrap();
        let serial = d.path().join("serial");
        prepare(&[a.clone(), b.clone()], &serial, &tok, 1000, 1).unwrap();
        for threads in [2, 3, 8] {
            let par = d.path().join(format!("par{threads}"));
            prepare(&[a.clone(), b.clone()], &par, &tok, 1000, threads).unwrap();
            assert_eq!(files_of(&serial), files_of(&par), "{threads} threads");
        }
    }

    #[test]
    fn a_corrupt_input_is_named_and_bad_arguments_refused() {
        let d = tempfile::tempdir().unwrap();
        let tok = Tokenizer::gpt2().unwrap();
        let p = d.path().join("x.jsonl");
        std::fs::write(&p, "{\"text\": \"a\"}\nnot json\n").unwrap();
        let e = format!(
            "{:#}",
            prepare(std::slice::from_ref(&p), &d.path().join("o"), &tok, 10, 1).unwrap_err()
        );
        assert!(e.contains("x.jsonl line 2: not JSON"), "{e}");
        let e = format!(
            "{:#}",
            prepare(&[d.path().join("y.csv")], &d.path().join("o"), &tok, 10, 1).unwrap_err()
        );
        assert!(e.contains("y.csv"), "{e}");
        assert!(prepare(&[], &d.path().join("o"), &tok, 10, 1).is_err());
        assert!(prepare(&[p], &d.path().join("o"), &tok, 0, 1).is_err());
    }
}
