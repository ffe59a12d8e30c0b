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

/// `mpirun -n ranks sparse-train ARGS` from the repository root: CPU ranks, one thread each,
/// root allowed, more ranks than cores allowed.
pub fn mpirun_command(ranks: usize, args: &[&str]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-n"])
        .arg(ranks.to_string())
        .args(["-x", "OMP_NUM_THREADS=1"])
        .arg(binary())
        .args(args)
        .current_dir(repo());
    cmd
}

/// A `sparse-train` child process (set up as [`run`] sets it up, stdout and stderr piped),
/// for tests that signal it while it trains. Killed on drop if it is still running, so a
/// failing test leaves no trainer behind.
pub struct Trainer {
    child: std::process::Child,
    status: Option<std::process::ExitStatus>,
}

impl Trainer {
    /// Starts the binary with `args` from the repository root.
    pub fn spawn(args: &[&str]) -> Trainer {
        let child = Command::new(binary())
            .args(args)
            .current_dir(repo())
            .env("OMP_NUM_THREADS", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawning sparse-train");
        Trainer {
            child,
            status: None,
        }
    }

    /// Starts `mpirun -n ranks` over the binary with `args` (see [`mpirun_command`]).
    pub fn spawn_mpirun(ranks: usize, args: &[&str]) -> Trainer {
        let child = mpirun_command(ranks, args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("mpirun not found: run scripts/setup.sh");
        Trainer {
            child,
            status: None,
        }
    }

    /// Sends signal `sig` (`libc::SIGTERM`, ...) to the process.
    pub fn signal(&self, sig: i32) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain syscall on our own child's pid, which is not reaped before `wait`.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// The exit status, if the process has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waiting for sparse-train");
        }
        self.status
    }

    /// Waits up to `limit` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Waits until `run_dir/metrics.jsonl` holds at least `n` completed steps. Panics (with
    /// the process's output) if it exits first, or after `limit`.
    pub fn wait_for_steps(&mut self, run_dir: &Path, n: usize, limit: std::time::Duration) {
        let start = std::time::Instant::now();
        while completed_steps(run_dir) < n {
            if let Some(s) = self.try_wait() {
                let (out, err) = self.output();
                panic!("sparse-train exited ({s}) before step {n}\nstdout:\n{out}\nstderr:\n{err}");
            }
            assert!(
                start.elapsed() < limit,
                "no {n} steps in {}: {:?}",
                run_dir.display(),
                limit
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Stdout and stderr of an exited process.
    pub fn output(&mut self) -> (String, String) {
        use std::io::Read;
        assert!(self.try_wait().is_some(), "output() of a running process");
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut s) = self.child.stdout.take() {
            s.read_to_string(&mut out).unwrap();
        }
        if let Some(mut s) = self.child.stderr.take() {
            s.read_to_string(&mut err).unwrap();
        }
        (out, err)
    }
}

impl Drop for Trainer {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Completed (logged, not skipped) steps in `run_dir/metrics.jsonl` while a run may still be
/// writing it: only whole lines count; 0 if the file does not exist yet.
pub fn completed_steps(run_dir: &Path) -> usize {
    let Ok(text) = std::fs::read_to_string(run_dir.join("metrics.jsonl")) else {
        return 0;
    };
    let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    whole
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("step").is_some() && v.get("skipped").is_none())
        .count()
}

/// Every file under `dir` (relative path) with its length and a hash of its bytes: equal
/// digests before and after a command mean it created, removed and changed nothing there.
pub fn tree_digest(dir: &Path) -> std::collections::BTreeMap<PathBuf, (u64, u64)> {
    use std::hash::Hasher;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.insert(path.strip_prefix(dir).unwrap().to_path_buf(), (0, 0));
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                let mut h = std::collections::hash_map::DefaultHasher::new();
                h.write(&bytes);
                out.insert(
                    path.strip_prefix(dir).unwrap().to_path_buf(),
                    (bytes.len() as u64, h.finish()),
                );
            }
        }
    }
    out
}

/// Copies the directory tree `src` to `dst` (which must not exist).
pub fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let to = dst.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_tree(&path, &to);
        } else {
            std::fs::copy(&path, &to).unwrap();
        }
    }
}
