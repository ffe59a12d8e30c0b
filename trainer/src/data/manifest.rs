//! `manifest.json` of a shard directory: which tokenizer made the shards (name, SHA-256 of
//! the `tokenizer.json` copied beside them, vocabulary size, end-of-text token), the inputs,
//! and the counts. `prepare` writes it last; the trainer reads it to check the tokenizer and to
//! put it into checkpoints.
use super::tokenizer::{sha256_hex, Tokenizer, TOKENIZER_FILE};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const MANIFEST_FILE: &str = "manifest.json";

/// The tokenizer that made a shard directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerRecord {
    /// `gpt2`, or the file name it was loaded from.
    pub name: String,
    /// SHA-256 of `tokenizer.json` in the same directory.
    pub sha256: String,
    pub vocab_size: u32,
    pub eot_token: String,
    pub eot_id: u32,
}

impl TokenizerRecord {
    pub fn of(t: &Tokenizer) -> TokenizerRecord {
        TokenizerRecord {
            name: t.name.clone(),
            sha256: t.sha256(),
            vocab_size: t.vocab_size,
            eot_token: t.eot_token.clone(),
            eot_id: t.eot_id,
        }
    }
}

/// `manifest.json` of a shard directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardManifest {
    pub tokenizer: TokenizerRecord,
    /// The input files, as given to `prepare`.
    pub inputs: Vec<String>,
    pub documents: usize,
    pub tokens: usize,
    pub text_bytes: usize,
    /// Shard file names, in order.
    pub shards: Vec<String>,
}

impl ShardManifest {
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// The manifest of shard directory `dir`; `None` when it has none (shards written by
    /// other means, or a single shard file).
    pub fn read(dir: &Path) -> Result<Option<ShardManifest>> {
        let path = dir.join(MANIFEST_FILE);
        if !dir.is_dir() || !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let m = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a shard manifest (re-run `sparse-train prepare` into {})",
                path.display(),
                dir.display()
            )
        })?;
        Ok(Some(m))
    }
}

/// The tokenizer of shard directory `dir`, checked against its manifest's SHA-256; `None`
/// when the directory has no manifest.
pub fn tokenizer_of(dir: &Path) -> Result<Option<Tokenizer>> {
    let Some(m) = ShardManifest::read(dir)? else {
        return Ok(None);
    };
    let path = dir.join(TOKENIZER_FILE);
    let json = std::fs::read(&path).with_context(|| {
        format!(
            "{}: named by {} but unreadable (re-run `sparse-train prepare`)",
            path.display(),
            dir.join(MANIFEST_FILE).display()
        )
    })?;
    let sha = sha256_hex(&json);
    if sha != m.tokenizer.sha256 {
        bail!(
            "{}: SHA-256 {sha} differs from the {} recorded in {}: the shards were made by another tokenizer (re-run `sparse-train prepare`)",
            path.display(),
            m.tokenizer.sha256,
            MANIFEST_FILE
        );
    }
    let t = Tokenizer::from_json(&m.tokenizer.name, json, Some(&m.tokenizer.eot_token))
        .with_context(|| path.display().to_string())?;
    Ok(Some(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_tokenizer_is_refused_by_its_checksum() {
        let d = tempfile::tempdir().unwrap();
        let tok = Tokenizer::gpt2().unwrap();
        std::fs::write(d.path().join(TOKENIZER_FILE), tok.json()).unwrap();
        ShardManifest {
            tokenizer: TokenizerRecord::of(&tok),
            inputs: vec!["a.jsonl".into()],
            documents: 1,
            tokens: 2,
            text_bytes: 3,
            shards: vec!["shard_00000.bin".into()],
        }
        .write(d.path())
        .unwrap();
        let back = tokenizer_of(d.path()).unwrap().unwrap();
        assert_eq!(back.sha256(), tok.sha256());
        assert_eq!(back.eot_id, 50256);
        let mut other = tok.json().to_vec();
        other.push(b' ');
        std::fs::write(d.path().join(TOKENIZER_FILE), other).unwrap();
        let e = format!("{:#}", tokenizer_of(d.path()).err().unwrap());
        assert!(e.contains("tokenizer.json: SHA-256"), "{e}");
        assert!(tokenizer_of(&d.path().join("none")).unwrap().is_none());
    }
}
