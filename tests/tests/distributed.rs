//! Multi-rank runs on CPU over MPI (`mpirun`, installed by scripts/setup.sh).
use sparse_train_tests::{assert_success, binary, losses, repo};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A small global batch that splits over 1, 2 or 4 ranks.
const COMMON: [&str; 8] = [
    "--config",
    "configs/tiny.yaml",
    "--quiet",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.micro_batch_size=2",
    "--set=train.log_every=4",
];

fn mpirun(ranks: usize, args: &[&str]) -> Output {
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        &ranks.to_string(),
    ])
    .args(["-x", "OMP_NUM_THREADS=1"])
    .arg(binary())
    .args(args)
    .current_dir(repo());
    cmd.output()
        .expect("mpirun not found: run scripts/setup.sh")
}

fn train(ranks: usize, out: &std::path::Path, extra: &[&str]) -> Vec<f64> {
    let mut args: Vec<&str> = COMMON.to_vec();
    args.extend(["--out-dir", out.to_str().unwrap()]);
    args.extend(extra);
    let o = mpirun(ranks, &args);
    assert_success(&o);
    losses(out)
}

/// fp32 sums in another order: per-step losses agree to well under 1e-5.
fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "{what}: step {i}: {x} vs {y}"
        );
    }
}

#[test]
fn two_ranks_equal_one_rank_on_the_same_global_batch() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let one = train(1, a.path(), &["--max-steps", "20"]);
    let two = train(2, b.path(), &["--max-steps", "20"]);
    assert_eq!(one.len(), 20);
    assert_close(&one, &two, "2 ranks vs 1");
}

#[test]
fn zero1_equals_plain_data_parallel() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let plain = train(2, a.path(), &["--max-steps", "12"]);
    let zero1 = train(
        2,
        b.path(),
        &["--max-steps", "12", "--set", "parallel.zero1=true"],
    );
    assert_close(&plain, &zero1, "ZeRO-1 vs plain");
}

#[test]
fn checkpoints_resume_on_a_different_number_of_ranks() {
    let full = tempfile::tempdir().unwrap();
    let reference = train(
        1,
        full.path(),
        &["--max-steps", "12", "--set", "checkpoint.every=6"],
    );
    // A 2-rank ZeRO-1 checkpoint resumed on 1 rank, and a 1-rank one on 2 ranks.
    let two = tempfile::tempdir().unwrap();
    train(
        2,
        two.path(),
        &[
            "--max-steps",
            "12",
            "--set",
            "checkpoint.every=6",
            "--set",
            "parallel.zero1=true",
        ],
    );
    for (ranks, src) in [(1, two.path()), (2, full.path())] {
        let out = tempfile::tempdir().unwrap();
        let ckpt = src.join("checkpoints/step_00000006");
        let resumed = train(
            ranks,
            out.path(),
            &["--max-steps", "12", "--resume", ckpt.to_str().unwrap()],
        );
        assert_close(
            &reference[6..],
            &resumed,
            &format!("resume on {ranks} rank(s)"),
        );
    }
}

#[test]
fn a_rank_with_a_different_config_stops_the_whole_job_naming_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let start = Instant::now();
    let o = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-x",
            "OMP_NUM_THREADS=1",
            "-n",
            "1",
        ])
        .arg(binary())
        .args([
            "--config",
            "configs/tiny.yaml",
            "--quiet",
            "--out-dir",
            out.to_str().unwrap(),
        ])
        .arg(":")
        .args(["-n", "1"])
        .arg(binary())
        .args([
            "--config",
            "configs/tiny.yaml",
            "--quiet",
            "--set",
            "train.lr=0.002",
        ])
        .args(["--out-dir", out.to_str().unwrap()])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(!o.status.success(), "the job should fail");
    assert!(start.elapsed() < Duration::from_secs(60), "no hang");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("rank") && err.contains("config"), "{err}");
}
