//! A tokenizer trained here, end to end: `tokenizer train`, `prepare` with it, a run on those
//! shards, and `generate` from its checkpoint, which decodes with the tokenizer the checkpoint
//! carries; data made by another tokenizer, or missing, stops the run by name.
use sparse_train_tests::{assert_fails_naming, assert_success, run};
use std::path::{Path, PathBuf};

const TEXT: &str = "The river town grew around its bridge. Merchants sold wool and salt by the \
    river, and the bridge tolls paid for the town walls. In winter the river froze and the \
    market moved onto the ice.";

/// `TEXT` variants as a JSONL file in `dir`.
fn corpus(dir: &Path) -> PathBuf {
    let p = dir.join("text.jsonl");
    let lines: String = (0..300)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({ "text": format!("{i}. {TEXT}") })
            )
        })
        .collect();
    std::fs::write(&p, lines).unwrap();
    p
}

/// Trains a 300-entry tokenizer on `text` into `dir/tokenizer.json`.
fn trained_tokenizer(dir: &Path, text: &Path) -> PathBuf {
    let tok = dir.join("tokenizer.json");
    assert_success(&run(&[
        "tokenizer",
        "train",
        "--input",
        text.to_str().unwrap(),
        "--vocab-size",
        "300",
        "--out",
        tok.to_str().unwrap(),
    ]));
    tok
}

fn prepare(text: &Path, tokenizer: &str, out: &Path) {
    assert_success(&run(&[
        "prepare",
        "--tokenizer",
        tokenizer,
        "--input",
        text.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--threads",
        "2",
    ]));
}

/// configs/tiny.yaml for 2 steps on `train` and `val` into `out`.
fn train_on(train: &Path, val: &Path, out: &Path) -> std::process::Output {
    run(&[
        "--config",
        "configs/tiny.yaml",
        "--max-steps",
        "2",
        "--quiet",
        "--out-dir",
        out.to_str().unwrap(),
        "--set",
        &format!("data.train={}", train.display()),
        "--set",
        &format!("data.val={}", val.display()),
    ])
}

#[test]
fn generate_decodes_with_the_checkpoints_tokenizer() {
    let d = tempfile::tempdir().unwrap();
    let text = corpus(d.path());
    let tok = trained_tokenizer(d.path(), &text);
    let shards = d.path().join("shards");
    prepare(&text, tok.to_str().unwrap(), &shards);
    let run_dir = d.path().join("run");
    assert_success(&train_on(&shards, &shards, &run_dir));
    let latest = std::fs::read_to_string(run_dir.join("checkpoints/latest")).unwrap();
    let ckpt = run_dir.join("checkpoints").join(latest.trim());
    assert_eq!(
        std::fs::read(ckpt.join("tokenizer.json")).unwrap(),
        std::fs::read(&tok).unwrap()
    );
    let out = run(&[
        "generate",
        "--checkpoint",
        run_dir.to_str().unwrap(),
        "--prompt",
        "The river town",
        "--max-tokens",
        "8",
        "--cpu",
    ]);
    assert_success(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("GPT-2"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("The river town"), "{stdout}");
}

#[test]
fn validation_data_of_another_tokenizer_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let text = corpus(d.path());
    let tok = trained_tokenizer(d.path(), &text);
    let (train, val) = (d.path().join("train"), d.path().join("val"));
    prepare(&text, tok.to_str().unwrap(), &train);
    prepare(&text, "gpt2", &val);
    let out = train_on(&train, &val, &d.path().join("run"));
    assert_fails_naming(&out, &["data.val", "gpt2", "same --tokenizer"]);
}

#[test]
fn missing_corpus_shards_name_the_command_that_makes_them() {
    let d = tempfile::tempdir().unwrap();
    let train = d.path().join("corpus/shards49k/train");
    let out = train_on(&train, &train, &d.path().join("run"));
    let root = d.path().join("corpus");
    let hint = format!("sparse-train corpus build --out {}", root.display());
    assert_fails_naming(&out, &["shards49k/train", "no such directory", &hint]);
}
