//! Tokenizers: any Hugging Face `tokenizer.json` (through the `tokenizers` crate), or `gpt2`,
//! GPT-2's byte-level BPE rebuilt offline from the ranks `tiktoken-rs` bundles.
//!
//! A [`Tokenizer`] keeps the bytes of the `tokenizer.json` it was made from, so shards and
//! checkpoints can carry an exact copy (HF `AutoTokenizer` loads it from a checkpoint with the
//! [`Tokenizer::hf_tokenizer_config`] beside it), and the end-of-text token appended to every
//! document.
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use sparse_kernels::torch::panic_message;
use std::collections::HashMap;
use std::path::Path;

/// The end-of-text token of GPT-2 and of the tokenizers `tokenizer train` makes.
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// File name of a tokenizer beside shards and in checkpoints.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// HF's companion file naming the tokenizer class and special tokens (checkpoints).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// End-of-text tokens recognised in a `tokenizer.json`, in order of preference.
const EOT_CANDIDATES: [&str; 5] = [ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>"];

/// A loaded tokenizer with its end-of-text token and the `tokenizer.json` bytes it came from.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// For `gpt2`: tiktoken's encoder of the same ranks, which gives the same ids several
    /// times faster (the tests compare the two).
    tiktoken: Option<tiktoken_rs::CoreBPE>,
    json: Vec<u8>,
    /// `gpt2`, or the file name it was loaded from.
    pub name: String,
    pub eot_token: String,
    pub eot_id: u32,
    /// Largest token id + 1.
    pub vocab_size: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("name", &self.name)
            .field("vocab_size", &self.vocab_size)
            .field("eot_token", &self.eot_token)
            .field("eot_id", &self.eot_id)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// `gpt2`, or a path to a `tokenizer.json`. `eot` picks the end-of-text token (default:
    /// the first of `<|endoftext|>`, `<|end_of_text|>`, `</s>`, `<eos>`, `<|eot_id|>` present).
    pub fn load(spec: &str, eot: Option<&str>) -> Result<Tokenizer> {
        if spec == "gpt2" {
            if eot.is_some_and(|e| e != ENDOFTEXT) {
                bail!("--eot-token: gpt2's end-of-text token is {ENDOFTEXT}");
            }
            return Tokenizer::gpt2();
        }
        let path = Path::new(spec);
        let json = std::fs::read(path).with_context(|| {
            format!("tokenizer {spec}: not `gpt2` and not a readable tokenizer.json file")
        })?;
        let name = path
            .file_name()
            .map_or(spec.to_string(), |n| n.to_string_lossy().into_owned());
        Tokenizer::from_json(&name, json, eot).with_context(|| format!("tokenizer {spec}"))
    }

    /// A tokenizer from the bytes of a `tokenizer.json`.
    pub fn from_json(name: &str, json: Vec<u8>, eot: Option<&str>) -> Result<Tokenizer> {
        // JSON syntax first, named with its line and column; the tokenizers crate panics on
        // some malformed files (found by fuzzing: a broken decoder entry unwraps a parse
        // error), so past this check a panic is still caught and named like an error.
        serde_json::from_slice::<serde::de::IgnoredAny>(&json)
            .map_err(|e| anyhow!("not a valid Hugging Face tokenizer.json: {e}"))?;
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&json))
            .map_err(|p| {
                let why = panic_message(p);
                anyhow!("not a valid Hugging Face tokenizer.json: {why}")
            })?;
        let inner = parsed.map_err(|e| anyhow!("not a valid Hugging Face tokenizer.json: {e}"))?;
        let vocab = inner.get_vocab(true);
        let eot_token = match eot {
            Some(t) => t.to_string(),
            None => EOT_CANDIDATES
                .iter()
                .find(|t| vocab.contains_key(**t))
                .map(|t| t.to_string())
                .ok_or_else(|| {
                    anyhow!(
                        "none of the end-of-text tokens {} is in the vocabulary: name one with --eot-token",
                        EOT_CANDIDATES.join(", ")
                    )
                })?,
        };
        let eot_id = *vocab
            .get(&eot_token)
            .ok_or_else(|| anyhow!("end-of-text token {eot_token:?} is not in the vocabulary"))?;
        let vocab_size = vocab.values().max().map_or(0, |&m| m + 1);
        Ok(Tokenizer {
            inner,
            tiktoken: None,
            json,
            name: name.to_string(),
            eot_token,
            eot_id,
            vocab_size,
        })
    }

    /// GPT-2's byte-level BPE as an HF tokenizer, built from `tiktoken-rs`'s r50k ranks (see
    /// [`gpt2_merges`]); encodes exactly as `tiktoken`'s `r50k_base`.
    pub fn gpt2() -> Result<Tokenizer> {
        let bpe = tiktoken_rs::r50k_base().context("loading the bundled GPT-2 ranks")?;
        let eot = bpe.encode_with_special_tokens(ENDOFTEXT);
        let [eot] = eot[..] else {
            bail!("bundled GPT-2 ranks: {ENDOFTEXT} is not one token");
        };
        let ranks: Vec<Vec<u8>> = (0..eot)
            .map(|r| bpe.decode_bytes(&[r]))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow!("bundled GPT-2 ranks: {e}"))?;
        let json = serde_json::to_vec(&byte_level_bpe_json(&ranks)?)?;
        let mut t = Tokenizer::from_json("gpt2", json, Some(ENDOFTEXT))?;
        t.tiktoken = Some(bpe);
        Ok(t)
    }

    /// The token ids of `text` (no special tokens added; special tokens written in the text,
    /// e.g. `<|endoftext|>`, are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if let Some(bpe) = &self.tiktoken {
            return Ok(bpe.encode_with_special_tokens(text));
        }
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenizer {}: encoding: {e}", self.name))?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("tokenizer {}: decoding: {e}", self.name))
    }

    /// The `tokenizer.json` bytes this tokenizer was made from.
    pub fn json(&self) -> &[u8] {
        &self.json
    }

    /// SHA-256 of [`Tokenizer::json`], hex: identifies the tokenizer in shard manifests.
    pub fn sha256(&self) -> String {
        sha256_hex(&self.json)
    }

    /// A minimal HF `tokenizer_config.json`: `AutoTokenizer.from_pretrained(dir)` then loads
    /// `tokenizer.json` as a `PreTrainedTokenizerFast` with this end-of-text token as EOS.
    pub fn hf_tokenizer_config(&self, model_max_length: usize) -> serde_json::Value {
        serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eot_token,
            "bos_token": self.eot_token,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": false,
        })
    }

    /// The HF files a checkpoint carries: `tokenizer.json` and `tokenizer_config.json`.
    pub fn checkpoint_files(&self, model_max_length: usize) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(vec![
            (TOKENIZER_FILE.to_string(), self.json.clone()),
            (
                TOKENIZER_CONFIG_FILE.to_string(),
                serde_json::to_vec_pretty(&self.hf_tokenizer_config(model_max_length))?,
            ),
        ])
    }

    /// The tokenizer a checkpoint carries (`files` as loaded), with the end-of-text token its
    /// `tokenizer_config.json` names; `None` when it carries none.
    pub fn from_checkpoint_files(files: &HashMap<&str, &[u8]>) -> Result<Option<Tokenizer>> {
        let Some(json) = files.get(TOKENIZER_FILE) else {
            return Ok(None);
        };
        let eot = match files.get(TOKENIZER_CONFIG_FILE) {
            Some(cfg) => serde_json::from_slice::<serde_json::Value>(cfg)
                .with_context(|| format!("{TOKENIZER_CONFIG_FILE}: not JSON"))?
                .get("eos_token")
                .and_then(|t| t.as_str())
                .map(str::to_string),
            None => None,
        };
        Tokenizer::from_json(TOKENIZER_FILE, json.to_vec(), eot.as_deref())
            .with_context(|| format!("the checkpoint's {TOKENIZER_FILE}"))
            .map(Some)
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// GPT-2's map from bytes to printable characters: byte-level BPE vocabularies are written in
/// it (`Ġ` for a space).
pub fn bytes_to_unicode() -> [char; 256] {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut map = ['\0'; 256];
    for (b, c) in printable.into_iter().zip(chars) {
        map[b as usize] = char::from_u32(c).expect("below 0x200");
    }
    map
}

/// The merges that rebuild a rank table (tiktoken's format: `ranks[r]` is the bytes of token
/// `r`): for each multi-byte token, the two parts it is made of, found by running tiktoken's
/// own procedure (repeatedly join the adjacent pair whose join has the lowest rank) on its
/// bytes until two parts are left. Merge `i` makes the `i`-th multi-byte token by rank, so HF's
/// merge priorities order pairs exactly as tiktoken's ranks do.
pub fn gpt2_merges(ranks: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let index: HashMap<&[u8], usize> = ranks.iter().enumerate().map(|(r, t)| (&t[..], r)).collect();
    let mut merges = Vec::new();
    for token in ranks.iter().filter(|t| t.len() > 1) {
        let mut parts: Vec<&[u8]> = token.chunks(1).collect();
        while parts.len() > 2 {
            let (best, _) = (0..parts.len() - 1)
                .filter_map(|i| {
                    let joined = [parts[i], parts[i + 1]].concat();
                    index.get(&joined[..]).map(|&r| (i, r))
                })
                .min_by_key(|&(_, r)| r)
                .ok_or_else(|| anyhow!("rank table: token {token:?} is not reachable by merges"))?;
            let len = parts[best].len() + parts[best + 1].len();
            let start = parts[..best].iter().map(|p| p.len()).sum::<usize>();
            parts[best] = &token[start..start + len];
            parts.remove(best + 1);
        }
        merges.push((parts[0].to_vec(), parts[1].to_vec()));
    }
    Ok(merges)
}

/// The `tokenizer.json` of a rank table's byte-level BPE, with [`ENDOFTEXT`] as a special token
/// after the last rank: GPT-2's pre-tokenizer, decoder and post-processor (`ByteLevel`, no
/// prefix space), as HF's own GPT-2 file has them.
fn byte_level_bpe_json(ranks: &[Vec<u8>]) -> Result<serde_json::Value> {
    let map = bytes_to_unicode();
    let text = |bytes: &[u8]| -> String { bytes.iter().map(|&b| map[b as usize]).collect() };
    let mut vocab = serde_json::Map::new();
    for (r, t) in ranks.iter().enumerate() {
        if vocab.insert(text(t), r.into()).is_some() {
            bail!("rank table: token {t:?} appears twice");
        }
    }
    let eot = ranks.len();
    vocab.insert(ENDOFTEXT.into(), eot.into());
    let merges: Vec<[String; 2]> = gpt2_merges(ranks)?
        .into_iter()
        .map(|(a, b)| [text(&a), text(&b)])
        .collect();
    let byte_level = |add_prefix_space: bool, trim_offsets: bool| {
        serde_json::json!({
            "type": "ByteLevel",
            "add_prefix_space": add_prefix_space,
            "trim_offsets": trim_offsets,
            "use_regex": true,
        })
    };
    Ok(serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": eot, "content": ENDOFTEXT, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": true, "special": true,
        }],
        "normalizer": null,
        "pre_tokenizer": byte_level(false, true),
        "post_processor": byte_level(true, false),
        "decoder": byte_level(true, true),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// English, code, digits, runs of spaces and newlines, non-Latin scripts, emoji.
    pub(crate) const MIXED_TEXT: &str = "The history of Rome's 2,753-year-old   republic, \
        told\n\n  in 12 parts.\tfn main() { println!(\"héllo, wörld\"); }  \n\
        Ελληνικά, русский, 日本語のテキスト 🦀🚀 it's we'll they've I'd <|endoftext|> tail  ";

    #[test]
    fn gpt2_encodes_exactly_as_tiktoken() {
        // The HF tokenizer alone (a copy from its JSON has no tiktoken fast path).
        let gpt2 = Tokenizer::gpt2().unwrap();
        let ours = Tokenizer::from_json("gpt2", gpt2.json().to_vec(), None).unwrap();
        assert!(ours.tiktoken.is_none() && gpt2.tiktoken.is_some());
        let bpe = tiktoken_rs::r50k_base().unwrap();
        assert_eq!(ours.vocab_size, 50257);
        assert_eq!(ours.eot_id, 50256);
        for text in MIXED_TEXT.split_inclusive(['.', '\n']).chain([MIXED_TEXT]) {
            let want = bpe.encode_with_special_tokens(text);
            assert_eq!(ours.encode(text).unwrap(), want, "{text:?}");
            assert_eq!(ours.decode(&want).unwrap(), text);
        }
        // The ids the README's `logits` example uses.
        assert_eq!(ours.encode("The quick brown").unwrap(), [464, 2068, 7586]);
    }

    #[test]
    fn gpt2_json_round_trips_through_from_json() {
        let a = Tokenizer::gpt2().unwrap();
        let b = Tokenizer::from_json("copy", a.json().to_vec(), None).unwrap();
        assert_eq!(b.eot_token, ENDOFTEXT);
        assert_eq!(b.encode(MIXED_TEXT).unwrap(), a.encode(MIXED_TEXT).unwrap());
        assert_eq!(a.sha256(), b.sha256());
        assert_eq!(a.sha256().len(), 64);
    }

    #[test]
    fn merges_follow_tiktoken_procedure() {
        // a=0 b=1 c=2 ab=3 bc=4 abc=5: `abc` is made from `ab` + `c` (ab ranks below bc).
        let ranks: Vec<Vec<u8>> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        let m = gpt2_merges(&ranks).unwrap();
        assert_eq!(
            m,
            [
                (b"a".to_vec(), b"b".to_vec()),
                (b"b".to_vec(), b"c".to_vec()),
                (b"ab".to_vec(), b"c".to_vec())
            ]
        );
    }

    #[test]
    fn bad_tokenizer_files_are_named_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("broken.json");
        std::fs::write(&p, b"{\"model\": 3}").unwrap();
        let e = format!(
            "{:#}",
            Tokenizer::load(p.to_str().unwrap(), None).err().unwrap()
        );
        assert!(
            e.contains("broken.json") && e.contains("tokenizer.json"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            Tokenizer::load("/no/such/tok.json", None).err().unwrap()
        );
        assert!(e.contains("/no/such/tok.json"), "{e}");
        let gpt2 = Tokenizer::gpt2().unwrap();
        let e = format!(
            "{:#}",
            Tokenizer::from_json("t", gpt2.json().to_vec(), Some("<nope>"))
                .err()
                .unwrap()
        );
        assert!(e.contains("<nope>"), "{e}");
    }
}
