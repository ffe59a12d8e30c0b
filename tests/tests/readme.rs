//! Every shell command in README.md's code blocks either runs here as written (on the CPU,
//! from a scratch directory, training commands with a few steps appended) or is listed in
//! [`SKIPPED`] with the reason. A README command that is in neither list fails the test.
use sparse_train_tests::{assert_success, binary, repo, run, ONE_THREAD};
use std::path::Path;
use std::process::Command;

/// Commands run as written, with these arguments appended.
const RUN: [(&str, &str); 7] = [
    (
        "sparse-train train --config configs/tiny.yaml --max-steps 20",
        "",
    ),
    (
        "mpirun -n 2 sparse-train --config configs/tiny.yaml",
        "--max-steps 2",
    ),
    (
        "sparse-train prepare --input a.jsonl b.txt --out data/shards/mine",
        "",
    ),
    (
        "sparse-train tokenizer train --input a.jsonl b.txt --vocab-size 300 --out data/tok/tokenizer.json",
        "",
    ),
    (
        "sparse-train prepare --tokenizer data/tok/tokenizer.json --input a.jsonl --out data/shards/mine-bpe",
        "",
    ),
    (
        "sparse-train generate --checkpoint runs/125m --prompt \"The history of\" --max-tokens 64",
        "",
    ),
    (
        "sparse-train logits --checkpoint runs/tiny --tokens 464,2068,7586",
        "",
    ),
];

const GPU: &str = "needs a GPU (a 1.5b or 1b model, or several GPU ranks)";
const CORPUS: &str = "needs the real corpus (`sparse-train corpus build` downloads it)";

/// Commands not run here, and why.
const SKIPPED: [(&str, &str); 21] = [
    (
        "scripts/quickstart.sh",
        "set-up and build (apt, pip, cargo), which CI has done before this test; its training \
         step is the tiny.yaml run checked through the mpirun line",
    ),
    ("scripts/test.sh", "the whole suite, this test included"),
    ("sparse-train --config configs/125m.yaml", CORPUS),
    (
        "sparse-train --config configs/125m.yaml --set train.lr=3e-4",
        CORPUS,
    ),
    (
        "sparse-train --config configs/1.5b.yaml --synthetic-data",
        GPU,
    ),
    ("mpirun -n 8 sparse-train --config configs/1b.yaml", GPU),
    ("sparse-train --config configs/1b.yaml --resume", GPU),
    (
        "tensorboard --logdir runs/",
        "a server that runs until stopped (tests/python reads the event files)",
    ),
    (
        "mpirun -n 8 sparse-train --config configs/1b.yaml --set parallel.zero1=true",
        GPU,
    ),
    (
        "mpirun -n 8 sparse-train --config configs/1b.yaml --set parallel.tensor=2",
        GPU,
    ),
    (
        "sparse-train corpus build --out data/corpus",
        "downloads the 164 MB corpus",
    ),
    (
        "sparse-train prepare --tokenizer data/corpus/tokenizer49k/tokenizer.json --input fineweb/*.parquet --out data/shards/fineweb",
        "needs the corpus's tokenizer and FineWeb's parquet files (neither is fetched here)",
    ),
    (
        "mpirun -n 2 sparse-train --config configs/1b.yaml --max-steps 2 --set train.device=cpu --set train.precision=fp32 --set train.batch_size=2 --set train.micro_batch_size=1 --set train.log_every=1",
        "needs the real corpus and about 60 GB of RAM",
    ),
    (
        "sparse-train bench ffn --shape 1.5b --tokens 16384 --sparsity 0.995 --mode infer",
        GPU,
    ),
    ("sparse-train bench infer --config configs/1.5b.yaml", GPU),
    ("sparse-train bench train --config configs/1.5b.yaml", GPU),
    (
        "sparse-train bench generate --config configs/1.5b.yaml",
        GPU,
    ),
    (
        "bash scripts/gpu/pack.sh .carry",
        "builds the release and kernel test binaries with cargo (by hand, before a GPU run)",
    ),
    (
        "bash scripts/gpu/suite.sh tests .carry",
        "runs on the GPU machine",
    ),
    (
        "bash scripts/gpu/suite.sh benches .carry",
        "runs on the GPU machine",
    ),
    (
        "bash scripts/gpu/suite.sh study .carry",
        "runs on the GPU machine, with the corpus pack",
    ),
];

/// The shell commands of README.md's fenced code blocks, comments and blank lines dropped.
fn readme_commands(readme: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut in_block = false;
    for line in readme.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        let command = match line.find(" #") {
            Some(i) => &line[..i],
            None => line,
        }
        .trim();
        if !command.is_empty() && !command.starts_with('#') {
            commands.push(command.to_string());
        }
    }
    commands
}

/// A scratch directory laid out as the repository root is for the README's commands: the
/// configs and the tiny shards linked in, `sparse-train` on PATH (in `bin/`), the inputs of
/// the `prepare` line, and a tiny checkpoint at `runs/125m` for the `generate` line.
fn scratch_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::os::unix::fs::symlink(repo().join("configs"), root.join("configs")).unwrap();
    std::fs::create_dir_all(root.join("data/shards")).unwrap();
    std::os::unix::fs::symlink(
        repo().join("data/shards/tiny"),
        root.join("data/shards/tiny"),
    )
    .unwrap();
    std::fs::create_dir(root.join("bin")).unwrap();
    std::os::unix::fs::symlink(binary(), root.join("bin/sparse-train")).unwrap();
    std::fs::write(
        root.join("a.jsonl"),
        "{\"text\": \"The history of the city begins with a river.\"}\n",
    )
    .unwrap();
    std::fs::write(root.join("b.txt"), "A second document, as plain text.\n").unwrap();
    let checkpoint = root.join("runs/125m");
    assert_success(&run(&[
        "--config",
        "configs/tiny.yaml",
        "--quiet",
        "--max-steps",
        "2",
        "--out-dir",
        checkpoint.to_str().unwrap(),
    ]));
    dir
}

/// Runs `command args` with bash from `root`, as a user at a shell would. mpirun may start
/// as root and place more ranks than cores (what tests/src mpirun_command passes as flags);
/// one intra-op thread per process, as in every other end-to-end test.
fn shell(root: &Path, command: &str, args: &str) -> std::process::Output {
    let path = format!(
        "{}:{}",
        root.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .arg("-c")
        .arg(format!("{command} {args}"))
        .current_dir(root)
        .env("PATH", path)
        .envs(ONE_THREAD)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .output()
        .expect("spawning bash")
}

#[test]
fn every_readme_command_is_run_or_skipped_with_a_reason() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let commands = readme_commands(&readme);
    assert!(
        commands.len() > 10,
        "README commands not found: {commands:?}"
    );
    let unlisted: Vec<&String> = commands
        .iter()
        .filter(|c| !RUN.iter().any(|(r, _)| r == c) && !SKIPPED.iter().any(|(s, _)| s == c))
        .collect();
    assert!(
        unlisted.is_empty(),
        "README commands neither run nor skipped in tests/tests/readme.rs: {unlisted:?}"
    );
    let stale: Vec<&str> = RUN
        .iter()
        .map(|(c, _)| *c)
        .chain(SKIPPED.iter().map(|(c, _)| *c))
        .filter(|c| !commands.iter().any(|r| r == c))
        .collect();
    assert!(
        stale.is_empty(),
        "listed commands gone from README.md: {stale:?}"
    );
}

#[test]
fn readme_commands_that_fit_a_cpu_run_as_written() {
    let root = scratch_root();
    for (command, args) in RUN {
        eprintln!("+ {command} {args}");
        assert_success(&shell(root.path(), command, args));
    }
    assert!(root.path().join("runs/tiny/checkpoints/latest").exists());
    assert!(root.path().join("data/shards/mine").is_dir());
    let bpe = root.path().join("data/shards/mine-bpe");
    let tok = std::fs::read(root.path().join("data/tok/tokenizer.json")).unwrap();
    assert_eq!(std::fs::read(bpe.join("tokenizer.json")).unwrap(), tok);
}
