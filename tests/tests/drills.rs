//! Fault drills: what the machine does to a running 2-rank CPU job (`mpirun`, the tiny model)
//! must end it in bounded time with a message naming the rank, file or path at fault, and
//! leave a run that `latest` and `--resume` continue. Each drill asserts the message, the exit
//! status and the state afterwards.
//!
//! A rank killed by a signal needs no watchdog of ours: Open MPI's `mpirun` notices the dead
//! rank, kills the others (blocked in a collective with it) and names the rank and the
//! signal; a rank that fails on its own aborts the job through `fail_fast`, naming itself.
use sparse_train_tests::ranks::{rank_pid, signal_pid};
use sparse_train_tests::tmpfs::Tmpfs;
use sparse_train_tests::{
    assert_bit_identical, assert_success, completed_steps, losses, mpirun_command, Trainer,
};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

/// The 2-rank job of every drill: tiny.yaml, one micro-batch of 2 sequences per rank, no
/// validation (the drills look at training and checkpoints).
const COMMON: [&str; 10] = [
    "--config",
    "configs/tiny.yaml",
    "--quiet",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.micro_batch_size=2",
    "--set=train.log_every=2",
    "--set",
    "train.eval_every=0",
];

/// Generous bounds: the harness runs tests side by side on a couple of busy cores.
const START_LIMIT: Duration = Duration::from_secs(180);
/// How long a job may take to end once the fault happened.
const END_LIMIT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// [`COMMON`], `--out-dir run`, then `extra`.
fn job_args<'a>(run: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = COMMON.to_vec();
    args.extend(["--out-dir", s(run)]);
    args.extend(extra);
    args
}

fn mpirun_output(ranks: usize, args: &[&str]) -> Output {
    mpirun_command(ranks, args)
        .output()
        .expect("mpirun not found: run scripts/setup.sh")
}

fn checkpoints(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

fn latest(run: &Path) -> String {
    std::fs::read_to_string(checkpoints(run).join("latest"))
        .unwrap()
        .trim()
        .to_string()
}

/// The step of the checkpoint `latest` names, after loading and verifying it.
fn latest_loads(run: &Path) -> u64 {
    let ckpt = sparse_checkpoints::load(run)
        .unwrap_or_else(|e| panic!("latest of {} does not load: {e}", run.display()));
    let step = ckpt.trainer_state["step"].as_u64().unwrap();
    assert_eq!(latest(run), format!("step_{step:08}"));
    step
}

/// Names in `RUN/checkpoints` of the step directories and of the in-progress ones.
fn checkpoint_entries(run: &Path) -> (Vec<String>, Vec<String>) {
    let mut names: Vec<String> = std::fs::read_dir(checkpoints(run))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let steps = names.iter().filter(|n| n.starts_with("step_")).cloned();
    let partial = names.iter().filter(|n| n.starts_with(".tmp-")).cloned();
    (steps.collect(), partial.collect())
}

/// Waits for the job to end after a fault: within [`END_LIMIT`], unsuccessfully. Returns
/// stdout and stderr together (mpirun's own report goes to either).
fn ends_failing(t: &mut Trainer, what: &str) -> String {
    let status = t
        .wait_timeout(END_LIMIT)
        .unwrap_or_else(|| panic!("{what}: the job still runs {END_LIMIT:?} later"));
    let (out, err) = t.output();
    let text = format!("{out}\n{err}");
    assert!(!status.success(), "{what}: the job succeeded\n{text}");
    text
}

/// SIGKILL of rank 1 while it is inside a step (a few steps in, away from a checkpoint): the
/// job ends in bounded time naming rank 1; `latest` loads, and a `--resume` from it
/// continues to the end with the losses of an uninterrupted run, bit for bit.
#[test]
fn drill_sigkill_one_rank_mid_step() {
    let (reference, run, resumed) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let extra = ["--max-steps", "10", "--set", "checkpoint.every=4"];
    assert_success(&mpirun_output(2, &job_args(reference.path(), &extra)));
    let uninterrupted = losses(reference.path());
    assert_eq!(uninterrupted.len(), 10);

    let mut t = Trainer::spawn_mpirun(2, &job_args(run.path(), &extra));
    // Step 6 logged: the ranks are in step 7, between the checkpoints of steps 4 and 8.
    t.wait_for_steps(run.path(), 6, START_LIMIT);
    let rank1 = rank_pid(t.pid(), 1, Duration::from_secs(10));
    signal_pid(rank1, libc::SIGKILL);
    let text = ends_failing(&mut t, "rank 1 killed mid-step");
    assert!(
        text.contains("rank 1") && text.contains("signal 9"),
        "the report does not name rank 1 and its signal:\n{text}"
    );

    let from = latest_loads(run.path()) as usize;
    assert!(from == 4 || from == 8, "latest is step {from}");
    let mut again = job_args(resumed.path(), &extra);
    again.extend(["--resume", s(run.path())]);
    assert_success(&mpirun_output(2, &again));
    assert_bit_identical(
        &uninterrupted[from..],
        &losses(resumed.path()),
        "resumed after the kill vs uninterrupted",
    );
}

/// SIGKILL of rank 0, the writer, while it writes a checkpoint: stopped (SIGSTOP) the moment
/// the save's temporary directory appears, checked to be mid-write (no step directory yet,
/// `latest` unchanged), then killed. The job ends naming rank 0; `latest` still names the
/// previous complete checkpoint and loads; nothing partial is a step directory; `--resume`
/// from it repeats the killed run's logged losses bit for bit.
#[test]
fn drill_sigkill_one_rank_mid_checkpoint() {
    let (run, resumed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = ["--max-steps", "100000", "--set", "checkpoint.every=3"];
    let mut t = Trainer::spawn_mpirun(2, &job_args(run.path(), &extra));
    let rank0 = rank_pid(t.pid(), 0, START_LIMIT);
    let started = Instant::now();
    let root = checkpoints(run.path());
    // The checkpoint of step 3 complete, then the save of step 6 under way.
    while !root.join("latest").exists() {
        assert!(t.try_wait().is_none(), "the job ended before a checkpoint");
        assert!(started.elapsed() < START_LIMIT, "no checkpoint written");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(latest(run.path()), "step_00000003");
    loop {
        let (_, partial) = checkpoint_entries(run.path());
        if partial.iter().any(|n| n.starts_with(".tmp-step_00000006")) {
            signal_pid(rank0, libc::SIGSTOP);
            break;
        }
        assert!(t.try_wait().is_none(), "the job ended before a second save");
        assert!(started.elapsed() < START_LIMIT, "no second save");
        std::thread::sleep(Duration::from_millis(1));
    }
    let (steps, partial) = checkpoint_entries(run.path());
    assert_eq!(
        steps,
        ["step_00000003"],
        "rank 0 stopped after its save finished (partial: {partial:?}): the kill is not mid-write"
    );
    assert_eq!(latest(run.path()), "step_00000003");
    signal_pid(rank0, libc::SIGKILL);
    let text = ends_failing(&mut t, "rank 0 killed mid-checkpoint");
    assert!(
        text.contains("rank 0") && text.contains("signal 9"),
        "the report does not name rank 0 and its signal:\n{text}"
    );

    assert_eq!(latest_loads(run.path()), 3);
    assert_eq!(checkpoint_entries(run.path()).0, ["step_00000003"]);
    let logged = losses(run.path());
    assert!(logged.len() >= 6, "{} steps logged", logged.len());
    let mut again = job_args(resumed.path(), &["--max-steps", "6"]);
    again.extend(["--resume", s(run.path())]);
    assert_success(&mpirun_output(2, &again));
    assert_bit_identical(
        &logged[3..6],
        &losses(resumed.path()),
        "resumed after the kill vs the killed run",
    );
}

/// A disk that fills up during a checkpoint: the run directory on a tmpfs that holds the
/// first checkpoint and half of the next. The save of step 4 fails: the job exits non-zero
/// naming rank 0, the full disk, the file and what to do; `latest` still names step 2 and
/// loads; no step 4 directory and no partial directory remain.
///
/// Needs root to mount the tmpfs: otherwise it prints why and returns.
#[test]
fn drill_full_disk_during_checkpoint() {
    let disk = match Tmpfs::mount(1 << 30) {
        Ok(d) => d,
        Err(why) => {
            eprintln!("drill_full_disk_during_checkpoint skipped: {why}");
            return;
        }
    };
    let run = disk.path().join("run");
    let first = ["--max-steps", "2", "--set", "checkpoint.every=2"];
    assert_success(&mpirun_output(2, &job_args(&run, &first)));
    assert_eq!(latest_loads(&run), 2);
    let checkpoint_bytes: u64 = std::fs::read_dir(checkpoints(&run).join("step_00000002"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    disk.resize(disk.used_bytes() + checkpoint_bytes / 2);

    let mut more = job_args(&run, &["--max-steps", "4", "--set", "checkpoint.every=2"]);
    more.push("--resume");
    let out = mpirun_output(2, &more);
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the job succeeded\n{text}");
    for want in [
        "rank 0: checkpoint of step 4 not written: the disk is full",
        &format!("{}/checkpoints/.tmp-step_00000004", run.display()),
        "no space left on device",
        "`latest` still names step_00000002",
        "checkpoint.keep_last",
        "train.out_dir",
    ] {
        assert!(
            text.contains(want),
            "the error does not say `{want}`:\n{text}"
        );
    }
    assert_eq!(latest_loads(&run), 2);
    let (steps, partial) = checkpoint_entries(&run);
    assert_eq!(steps, ["step_00000002"]);
    assert!(partial.is_empty(), "partial writes left: {partial:?}");
}

/// One training shard rewritten in place (the same file and size, other valid tokens with a
/// matching checksum) while the job trains on it: the next batch read from it stops the job,
/// naming the rank and the file and what to do; every checkpoint written loads.
#[test]
fn drill_shard_replaced_under_running_job() {
    let (data, run) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let train = data.path().join("train");
    sparse_train_tests::copy_tree(
        &sparse_train_tests::repo().join("data/shards/tiny/train"),
        &train,
    );
    let shard = train.join("shard_00000.bin");
    let data_arg = format!("data.train={}", train.display());
    let extra = [
        "--max-steps",
        "100000",
        "--set",
        "checkpoint.every=2",
        "--set",
        &data_arg,
    ];
    let mut t = Trainer::spawn_mpirun(2, &job_args(run.path(), &extra));
    t.wait_for_steps(run.path(), 3, START_LIMIT);
    let before = completed_steps(run.path());

    let original = std::fs::read(&shard).unwrap();
    let mut other = original.clone();
    // Other tokens (the payload rotated by one token), with their checksum.
    other[64..].rotate_left(2);
    let crc = crc32fast::hash(&other[64..]);
    other[28..32].copy_from_slice(&crc.to_le_bytes());
    assert_ne!(other, original);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    std::io::Write::write_all(&mut f, &other).unwrap();
    drop(f);

    let text = ends_failing(&mut t, "shard replaced");
    for want in [
        &format!("shard {}: changed while the run reads it", shard.display()),
        "modified in place",
        "put the original shard back",
    ] {
        assert!(
            text.contains(want),
            "the error does not say `{want}`:\n{text}"
        );
    }
    assert!(
        text.contains("rank 0: shard") || text.contains("rank 1: shard"),
        "no rank named:\n{text}"
    );
    // A few steps at most after the replacement: the next batch read it.
    let after = completed_steps(run.path());
    assert!(
        after <= before + 2,
        "{} steps trained after the replacement",
        after - before
    );
    if checkpoints(run.path()).join("latest").exists() {
        latest_loads(run.path());
    }
}

/// An out-of-memory failure inside a step (the test hook raises libtorch's CUDA text in
/// step 4, after the optimizer update): the job ends naming the failure, the rank and the two
/// settings that help; no checkpoint of the half-updated state (step 5) exists, and
/// `latest` names a complete one of at most step 4, which loads.
#[test]
fn drill_out_of_memory_mid_step_writes_no_checkpoint() {
    let run = tempfile::tempdir().unwrap();
    let extra = ["--max-steps", "10", "--set", "checkpoint.every=1"];
    let mut t = Trainer::spawn_mpirun_with_env(
        2,
        &[("SPARSE_TRAIN_TEST_OOM_AT_STEP", "4")],
        &job_args(run.path(), &extra),
    );
    let text = ends_failing(&mut t, "out of memory");
    for want in [
        ": out of memory in step 4 (0-based) with train.micro_batch_size = 2",
        "lower train.micro_batch_size",
        "train.recompute",
        "CUDA out of memory. Tried to allocate",
    ] {
        assert!(
            text.contains(want),
            "the error does not say `{want}`:\n{text}"
        );
    }
    assert!(
        text.contains("rank 0: out of memory") || text.contains("rank 1: out of memory"),
        "no rank named:\n{text}"
    );
    assert!(!text.contains("panicked"), "reported as a panic:\n{text}");
    assert_eq!(completed_steps(run.path()), 4);
    let (steps, _) = checkpoint_entries(run.path());
    assert!(
        !steps.iter().any(|n| n.as_str() > "step_00000004"),
        "a checkpoint after the failed step: {steps:?}"
    );
    assert!(latest_loads(run.path()) <= 4);
}
