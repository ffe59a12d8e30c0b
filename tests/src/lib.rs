//! Helpers for the end-to-end tests in `tests/`: locate the `sparse-train` binary, run it,
//! read its `metrics.jsonl`.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The release binary (`SPARSE_TRAIN_BIN`, else `target/release/sparse-train`).
pub fn binary() -> PathBuf {
    let p = std::env::var_os("SPARSE_TRAIN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/release/sparse-train"));
    assert!(
        p.exists(),
        "{} not built: run `cargo build --release` first",
        p.display()
    );
    p
}

/// Runs the binary with `args` from the repository root. One intra-op thread each: the
/// test harness runs several binaries at once on a small machine, and OpenMP threads that
/// spin against each other make CPU training many times slower.
pub fn run(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .current_dir(repo())
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("spawning sparse-train")
}

/// Per-step records (`"step"` present, not skipped) of a run directory's metrics.jsonl.
pub fn step_records(run_dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("step").is_some() && v.get("skipped").is_none())
        .collect()
}

/// Per-step losses of a run directory.
pub fn losses(run_dir: &Path) -> Vec<f64> {
    step_records(run_dir)
        .iter()
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

/// Asserts a command succeeded, printing its output otherwise.
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
