//! Training a byte-level BPE tokenizer on text files (the work of `sparse-train tokenizer
//! train`), with the `tokenizers` crate's `BpeTrainer`.
//!
//! The tokenizer is GPT-2's kind: the GPT-2 regex split, bytes mapped to printable characters
//! (all 256 in the initial alphabet, so no text is unknown), no prefix space, and
//! `<|endoftext|>` as its one special token (id 0). Documents come from the same formats
//! `prepare` reads ([`super::documents`]), streamed from a reader thread.
use super::documents::{for_each_batch, Format};
use super::tokenizer::{Tokenizer, ENDOFTEXT};
use anyhow::{anyhow, bail, Result};
use std::path::PathBuf;
use std::sync::mpsc::sync_channel;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

/// Options of a training run.
#[derive(Clone, Debug)]
pub struct BpeOptions {
    /// Entries of the vocabulary, special token and the 256 bytes included.
    pub vocab_size: usize,
    /// Pairs seen fewer times are never merged.
    pub min_frequency: u64,
    pub show_progress: bool,
}

/// Trains a tokenizer on the documents of `inputs`.
pub fn train_bpe(inputs: &[PathBuf], opts: &BpeOptions) -> Result<Tokenizer> {
    if inputs.is_empty() {
        bail!("tokenizer train: no --input files given");
    }
    if opts.vocab_size < 257 {
        bail!(
            "--vocab-size {}: must be at least 257 (the 256 bytes and {ENDOFTEXT})",
            opts.vocab_size
        );
    }
    for input in inputs {
        Format::of(input)?;
        if !input.is_file() {
            bail!("input {}: no such file", input.display());
        }
    }
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_post_processor(Some(ByteLevel::new(true, false, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainer::builder()
            .vocab_size(opts.vocab_size)
            .min_frequency(opts.min_frequency)
            .show_progress(opts.show_progress)
            .special_tokens(vec![AddedToken::from(ENDOFTEXT, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );

    // A reader thread streams the documents in; the trainer counts words on every core.
    let (tx, rx) = sync_channel::<Vec<String>>(2);
    let paths = inputs.to_vec();
    let reader = std::thread::spawn(move || -> Result<()> {
        for path in &paths {
            for_each_batch(path, |docs, _| {
                tx.send(docs)
                    .map_err(|_| anyhow!("the tokenizer trainer stopped reading"))
            })?;
        }
        Ok(())
    });
    let trained = tok.train(&mut trainer, rx.into_iter().flatten());
    reader
        .join()
        .map_err(|_| anyhow!("the document reader thread panicked"))??;
    trained.map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    let json = tok
        .to_string(false)
        .map_err(|e| anyhow!("serializing the trained tokenizer: {e}"))?;
    Tokenizer::from_json("tokenizer.json", json.into_bytes(), Some(ENDOFTEXT))
}

#[cfg(test)]
mod tests {
    use super::super::documents::tests::write_jsonl;
    use super::*;

    #[test]
    fn trains_a_byte_level_bpe_that_round_trips_text() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.jsonl.gz");
        let docs: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    "the cat sat on the mat {i} times; the dog did not. Ünïcödé ✓ {}",
                    i % 7
                )
            })
            .collect();
        write_jsonl(&p, &docs.iter().map(String::as_str).collect::<Vec<_>>());
        let opts = BpeOptions {
            vocab_size: 300,
            min_frequency: 2,
            show_progress: false,
        };
        let tok = train_bpe(std::slice::from_ref(&p), &opts).unwrap();
        assert_eq!(tok.vocab_size, 300);
        assert_eq!(tok.eot_id, 0);
        let text = "the cat sat on a new mat: ©∑ 日本 <|endoftext|>";
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(*ids.last().unwrap(), 0);
        // Frequent words became single tokens.
        assert_eq!(tok.encode(" the").unwrap().len(), 1);
        // The same input trains the same tokenizer.
        assert_eq!(train_bpe(&[p], &opts).unwrap().json(), tok.json());
    }

    #[test]
    fn a_corrupt_input_fails_the_training_by_name() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bad.jsonl");
        std::fs::write(&p, "{\"text\": \"fine\"}\n{\"txt\": \"no\"}\n").unwrap();
        let opts = BpeOptions {
            vocab_size: 300,
            min_frequency: 2,
            show_progress: false,
        };
        let e = format!("{:#}", train_bpe(&[p], &opts).unwrap_err());
        assert!(e.contains("bad.jsonl line 2"), "{e}");
        let e = format!(
            "{:#}",
            train_bpe(&[d.path().join("none.txt")], &opts).unwrap_err()
        );
        assert!(e.contains("none.txt"), "{e}");
        let opts = BpeOptions {
            vocab_size: 100,
            ..opts
        };
        assert!(train_bpe(&[d.path().join("x.txt")], &opts).is_err());
    }
}
