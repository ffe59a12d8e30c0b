//! Multi-rank tests: build `examples/collectives_check.rs` and run it under
//! `mpirun --allow-run-as-root --oversubscribe -n N` on CPU tensors, checking collective
//! results on 2 and 3 ranks and that a failing rank ends the whole job, non-zero, with a
//! message naming it, within a bounded time. Needs OpenMPI (`scripts/setup.sh` installs it).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A job that has not ended by then is hung: the test kills it and fails.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// What one `mpirun` job left behind.
struct JobOutput {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// `mpirun` on PATH, or a failure telling how to install it.
fn mpirun() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("mpirun"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("mpirun not found on PATH: run scripts/setup.sh (installs openmpi-bin)")
        })
}

/// Builds the example once per test process (same profile as this test) and returns its path.
fn example_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/mpirun-<hash> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>");
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args([
            "build",
            "--quiet",
            "-p",
            "sparse-launch",
            "--example",
            "collectives_check",
        ]);
        cargo
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cargo.arg("--release");
            }
            Some(other) => {
                cargo.args(["--profile", other]);
            }
            None => panic!("unexpected test binary location {}", exe.display()),
        }
        let status = cargo.status().expect("run cargo build for the example");
        assert!(
            status.success(),
            "building examples/collectives_check failed"
        );
        let binary = profile_dir.join("examples").join("collectives_check");
        assert!(binary.is_file(), "{} missing after build", binary.display());
        binary
    })
}

/// Runs `collectives_check --cpu <args>` on `ranks` ranks; kills the job and fails the test
/// if it outlives [`JOB_TIMEOUT`].
fn run_job(ranks: usize, args: &[&str]) -> JobOutput {
    let mut child = Command::new(mpirun())
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
            &ranks.to_string(),
        ])
        .arg(example_binary())
        .arg("--cpu")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mpirun");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            pipe.read_to_string(&mut text).expect("read job output");
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for mpirun") {
            break status;
        }
        if start.elapsed() > JOB_TIMEOUT {
            // SIGTERM lets mpirun kill its ranks; SIGKILL if it does not end soon after.
            // Safety: signals a child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mpirun -n {ranks} {args:?} still running after {JOB_TIMEOUT:?} (hang); \
                 stderr so far:\n{}",
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    JobOutput {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn assert_all_ranks_ok(ranks: usize) {
    let out = run_job(ranks, &[]);
    assert!(
        out.status.success(),
        "mpirun -n {ranks} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    for rank in 0..ranks {
        let line = format!("rank {rank}/{ranks}: all collectives ok on Cpu (MPI (CPU tensors))");
        assert!(
            out.stdout.contains(&line),
            "missing `{line}` in:\n{}",
            out.stdout
        );
    }
}

/// Asserts the job failed and that stderr holds `needle`.
fn assert_job_failed_with(out: &JobOutput, needle: &str) {
    assert!(
        !out.status.success(),
        "job should fail, exited {}:\n{}",
        out.status,
        out.stdout
    );
    assert!(
        out.stderr.contains(needle),
        "stderr lacks `{needle}`:\n{}",
        out.stderr
    );
}

/// Asserts no rank got past the start-up failure to the collective checks.
fn assert_no_rank_went_on(out: &JobOutput) {
    assert!(
        !out.stdout.contains("all collectives ok"),
        "a rank went on past the failure:\n{}",
        out.stdout
    );
}

#[test]
fn collectives_match_hand_computed_values_on_2_ranks() {
    assert_all_ranks_ok(2);
}

#[test]
fn collectives_match_hand_computed_values_on_3_ranks() {
    assert_all_ranks_ok(3);
}

#[test]
fn rank_failing_at_start_up_ends_the_job_non_zero_naming_the_rank() {
    let out = run_job(3, &["--fail-rank", "1"]);
    assert_job_failed_with(
        &out,
        "rank 1: simulated start-up failure (config not found)",
    );
    assert_no_rank_went_on(&out);
}

#[test]
fn panicking_rank_aborts_the_job_naming_the_rank() {
    let out = run_job(2, &["--panic-rank", "1"]);
    assert_job_failed_with(&out, "rank 1: panicked");
    assert_no_rank_went_on(&out);
}

#[test]
fn config_differing_on_one_rank_fails_naming_that_rank() {
    let out = run_job(3, &["--mismatch-rank", "2"]);
    assert_job_failed_with(&out, "ranks [2] disagree with rank 0");
    assert_no_rank_went_on(&out);
}

#[test]
fn rank_leaving_without_finish_aborts_instead_of_hanging() {
    let out = run_job(2, &["--skip-finish-rank", "1"]);
    assert_job_failed_with(&out, "rank 1: World dropped without World::finish");
}
