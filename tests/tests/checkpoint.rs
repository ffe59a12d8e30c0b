//! Checkpoints end to end on the shipped tiny corpus (CPU): bit-exact resume, graceful stop on
//! signals, resumes that must fail without touching the run, and the non-finite step guard.
use sparse_train_tests::{
    assert_fails_naming, assert_success, copy_tree, losses, run, step_records, train_then_resume,
    tree_digest, Trainer,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CONFIG: [&str; 2] = ["--config", "configs/tiny.yaml"];

/// Generous bounds: the harness runs these tests side by side on a couple of busy cores.
const START_LIMIT: Duration = Duration::from_secs(120);
const STOP_LIMIT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `CONFIG` + `extra`.
fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    CONFIG
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect()
}

/// `CONFIG` + the whitespace-separated arguments of `line`.
fn args_line(line: &str) -> Vec<&str> {
    args(&line.split_whitespace().collect::<Vec<_>>())
}

fn output_text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Steps of a run's per-step records, in file order.
fn steps(run_dir: &Path) -> Vec<u64> {
    step_records(run_dir)
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect()
}

/// (step, loss bits, grad-norm bits) of each per-step record: compared for bit equality.
fn trajectory(run_dir: &Path) -> Vec<(u64, u64, u64)> {
    step_records(run_dir)
        .iter()
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                r["loss"].as_f64().unwrap().to_bits(),
                r["grad_norm"].as_f64().unwrap().to_bits(),
            )
        })
        .collect()
}

fn latest(run_dir: &Path) -> String {
    std::fs::read_to_string(run_dir.join("checkpoints/latest"))
        .unwrap()
        .trim()
        .to_string()
}

fn checkpoint(run_dir: &Path, step: usize) -> PathBuf {
    run_dir.join(format!("checkpoints/step_{step:08}"))
}

fn trainer_state(ckpt: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(ckpt.join("trainer_state.json")).unwrap()).unwrap()
}

/// Stops a trainer with `sig` after a few steps: it must exit 0 within `STOP_LIMIT`, with
/// `latest` naming a checkpoint of the last completed step. Returns that step.
fn stop_with(t: &mut Trainer, run_dir: &Path, sig: i32) -> usize {
    t.wait_for_steps(run_dir, 3, START_LIMIT);
    t.signal(sig);
    let status = t
        .wait_timeout(STOP_LIMIT)
        .unwrap_or_else(|| panic!("still running {STOP_LIMIT:?} after signal {sig}"));
    let (out, err) = t.output();
    assert!(
        status.success(),
        "signal {sig}: {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    let done = step_records(run_dir).len();
    assert!(done >= 3, "{done} steps");
    assert_eq!(steps(run_dir), (0..done as u64).collect::<Vec<_>>());
    assert!(
        out.contains(&format!(
            "stop requested: checkpoint written at step {done}"
        )),
        "{out}"
    );
    assert_eq!(latest(run_dir), format!("step_{done:08}"));
    let state = trainer_state(&checkpoint(run_dir, done));
    assert_eq!(state["step"], done);
    assert_eq!(state["trainer_state"]["step"], done);
    done
}

#[test]
fn resume_matches_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let ckpt = [
        "--set",
        "checkpoint.every=5",
        "--set",
        "checkpoint.keep_last=10",
        "--max-steps",
        "26",
    ];
    let mut base = args(&ckpt);

    // A: uninterrupted.
    assert_success(&run(&[&base[..], &["--out-dir", s(&a)]].concat()));
    let full = trajectory(&a);
    assert_eq!(full.len(), 26);
    for step in [5, 10, 15, 20, 25, 26] {
        assert!(
            checkpoint(&a, step).is_dir(),
            "no checkpoint at step {step}"
        );
    }

    // B: a fresh run directory resumed from A's step 5.
    let from = checkpoint(&a, 5);
    let out = run(&[&base[..], &["--out-dir", s(&b), "--resume", s(&from)]].concat());
    assert_success(&out);
    assert!(output_text(&out).0.contains("resumed at step 5"));
    let resumed = trajectory(&b);
    assert_eq!(resumed.len(), 21, "steps 5..25 after resuming at 5");
    assert_eq!(
        resumed,
        full[5..],
        "resumed run differs from the uninterrupted one"
    );
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            std::fs::read(checkpoint(&a, 26).join(file)).unwrap()
                == std::fs::read(checkpoint(&b, 26).join(file)).unwrap(),
            "final {file} differs"
        );
    }

    // C: stopped by SIGUSR1, then bare `--resume` of its own run directory.
    base.extend(["--out-dir", s(&c)]);
    let mut t = Trainer::spawn(&base);
    let stopped = stop_with(&mut t, &c, libc::SIGUSR1);
    drop(t);
    assert!(
        stopped < 26,
        "stopped at {stopped}: the signal came too late"
    );
    let out = run(&[&base[..], &["--resume"]].concat());
    assert_success(&out);
    assert!(output_text(&out)
        .0
        .contains(&format!("resumed at step {stopped}")));
    assert_eq!(
        trajectory(&c),
        full,
        "stopped at {stopped} and resumed: differs from the uninterrupted run"
    );
    assert!(
        std::fs::read(checkpoint(&a, 26).join("model.safetensors")).unwrap()
            == std::fs::read(checkpoint(&c, 26).join("model.safetensors")).unwrap(),
        "final weights differ"
    );
}

#[test]
fn sigterm_and_sigusr1_stop_with_a_checkpoint() {
    for sig in [libc::SIGTERM, libc::SIGUSR1] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let mut t = Trainer::spawn(&args(&["--max-steps", "100000", "--out-dir", s(&dir)]));
        let done = stop_with(&mut t, &dir, sig);
        drop(t);
        // The checkpoint loads: `--resume` continues from it.
        let more = (done + 2).to_string();
        let out = run(&args(&[
            "--max-steps",
            &more,
            "--out-dir",
            s(&dir),
            "--resume",
        ]));
        assert_success(&out);
        assert!(
            output_text(&out)
                .0
                .contains(&format!("resumed at step {done}")),
            "signal {sig}"
        );
        assert_eq!(steps(&dir), (0..done as u64 + 2).collect::<Vec<_>>());
        assert_eq!(latest(&dir), format!("step_{:08}", done + 2));
    }
}

#[test]
fn second_sigint_aborts_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let mut t = Trainer::spawn(&args(&["--max-steps", "100000", "--out-dir", s(&dir)]));
    t.wait_for_steps(&dir, 2, START_LIMIT);
    // Two SIGINTs sent back to back can merge into one pending signal: keep sending until
    // the process is gone; every one after the first that it sees must end it at once.
    let start = Instant::now();
    let status = loop {
        t.signal(libc::SIGINT);
        if let Some(status) = t.wait_timeout(Duration::from_millis(200)) {
            break status;
        }
        assert!(start.elapsed() < STOP_LIMIT, "SIGINTs did not stop it");
    };
    let (out, err) = t.output();
    use std::os::unix::process::ExitStatusExt;
    assert!(
        status.code() == Some(130) || status.signal() == Some(libc::SIGINT),
        "{status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(
        !out.contains("stop requested"),
        "took the graceful path: {out}"
    );
}

#[test]
fn incompatible_resume_names_the_problem_and_overwrites_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    assert_success(&run(&args(&[
        "--max-steps",
        "2",
        "--set",
        "checkpoint.every=1",
        "--set",
        "checkpoint.keep_last=1",
        "--out-dir",
        s(&run_dir),
    ])));
    assert_eq!(latest(&run_dir), "step_00000002");

    // Resumes `dir` (bare `--resume`, so a failing run would write into `dir`) with `extra`;
    // it must fail with every fragment of `expect` in stderr and leave `dir` as it was.
    let must_fail = |dir: &Path, extra: &[&str], expect: &[&str]| {
        let before = tree_digest(dir);
        let out = run(&[
            &args(&["--max-steps", "4", "--out-dir", s(dir)])[..],
            extra,
            &["--resume"],
        ]
        .concat());
        assert_fails_naming(&out, expect);
        let after = tree_digest(dir);
        let changed: std::collections::BTreeSet<_> = before
            .keys()
            .chain(after.keys())
            .filter(|p| before.get(*p) != after.get(*p))
            .collect();
        assert!(
            changed.is_empty(),
            "failed resume ({expect:?}) created, removed or changed {changed:?} in {}",
            dir.display()
        );
    };
    let step2 = checkpoint(&run_dir, 2);

    // (a) A different model shape.
    must_fail(
        &run_dir,
        &[
            "--set",
            "model.hidden_size=64",
            "--set",
            "model.num_heads=4",
        ],
        &["model.hidden_size"],
    );
    must_fail(
        &run_dir,
        &["--set", "model.intermediate_size=256"],
        &["model.intermediate_size"],
    );
    // ... and from an explicit checkpoint into a new directory: nothing is created.
    let fresh = tmp.path().join("fresh");
    let out = run(&args(&[
        "--max-steps",
        "4",
        "--set",
        "model.intermediate_size=256",
        "--out-dir",
        s(&fresh),
        "--resume",
        s(&step2),
    ]));
    assert_fails_naming(&out, &["model.intermediate_size"]);
    assert!(
        !fresh.exists(),
        "a failed resume created {}",
        fresh.display()
    );

    // (b) Truncated weights.
    let b = tmp.path().join("b");
    copy_tree(&run_dir, &b);
    let model = checkpoint(&b, 2).join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    must_fail(&b, &[], &["step_00000002/model.safetensors", "truncated"]);

    // (c) One flipped byte in the weights.
    let c = tmp.path().join("c");
    copy_tree(&run_dir, &c);
    let model = checkpoint(&c, 2).join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&model, &bytes).unwrap();
    must_fail(&c, &[], &["step_00000002/model.safetensors", "crc32"]);

    // (d) trainer_state.json of another format version, with a manifest that matches it (so
    // the version check, not the checksum, has to catch it).
    let d = tmp.path().join("d");
    copy_tree(&run_dir, &d);
    let state_path = checkpoint(&d, 2).join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).unwrap();
    assert!(text.contains("\"format_version\": 1,"), "{text}");
    let text = text.replacen("\"format_version\": 1,", "\"format_version\": 7,", 1);
    std::fs::write(&state_path, &text).unwrap();
    let manifest_path = checkpoint(&d, 2).join("MANIFEST.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["files"]["trainer_state.json"]["crc32"] = crc32fast::hash(text.as_bytes()).into();
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    must_fail(
        &d,
        &[],
        &["step_00000002/trainer_state.json", "format_version 7"],
    );

    // The untouched original still resumes.
    assert_success(&run(&args(&[
        "--max-steps",
        "3",
        "--set",
        "checkpoint.keep_last=1",
        "--out-dir",
        s(&run_dir),
        "--resume",
    ])));
    assert_eq!(steps(&run_dir), [0, 1, 2]);
}

#[test]
fn non_finite_steps_are_skipped_and_stop_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    // One step at lr 1e30 leaves weights near 1e30: finite, but every later forward pass
    // overflows.
    let mut diverging = args_line(
        "--max-steps 20 --set train.lr=1e30 --set train.warmup_steps=0 --set train.grad_clip=0 \
         --set train.max_skipped_steps=3 --set checkpoint.every=1 --set checkpoint.keep_last=20",
    );
    diverging.extend(["--out-dir", s(&dir)]);
    let out = run(&diverging);
    let (stdout, stderr) = output_text(&out);
    assert!(!out.status.success(), "diverged run succeeded\n{stdout}");
    assert!(
        stderr.contains("3 consecutive non-finite steps"),
        "stderr:\n{stderr}"
    );

    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("step").is_some())
        .collect();
    let good = steps(&dir);
    assert!(!good.is_empty(), "no step succeeded before diverging");
    let skipped: Vec<u64> = records
        .iter()
        .filter(|r| r["skipped"] == true)
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    let n = good.len() as u64;
    assert_eq!(good, (0..n).collect::<Vec<_>>());
    assert_eq!(skipped, [n, n + 1, n + 2], "skipped steps");
    for r in records.iter().filter(|r| r["skipped"] == true) {
        let loss: f64 = r["loss"].as_str().unwrap().parse().unwrap();
        let norm: f64 = r["grad_norm"].as_str().unwrap().parse().unwrap();
        assert!(!loss.is_finite() || !norm.is_finite(), "{r}");
    }

    // The latest checkpoint is the last good step, with finite weights only.
    assert_eq!(latest(&dir), format!("step_{n:08}"));
    let ckpt = checkpoint(&dir, n as usize);
    assert_eq!(trainer_state(&ckpt)["trainer_state"]["step"], n);
    let bytes = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut values = 0usize;
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        for (i, v) in view.data().chunks_exact(4).enumerate() {
            let v = f32::from_le_bytes(v.try_into().unwrap());
            assert!(v.is_finite(), "{name}[{i}] = {v}");
        }
        values += view.data().len() / 4;
    }
    assert!(values > 1_000_000, "{values} weights");
}

/// The auto path scheduler decides from the statistics of a whole log interval; a resume in
/// the middle of one restores its running sums, so the decisions and losses stay identical.
#[test]
fn resume_mid_interval_keeps_the_path_decisions() {
    let (a, b, _) = train_then_resume(
        &args_line(
            "--max-steps 12 --quiet --set train.log_every=10 --set checkpoint.every=5 \
             --set sparsity.switch_period=10 --set sparsity.l0_cutoff=254.8",
        ),
        5,
    );
    let paths = |d: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| v.get("log_step").map(|_| v["ffn_path"].clone()))
            .collect()
    };
    assert_eq!(paths(a.path()).last(), paths(b.path()).last());
    assert_eq!(losses(a.path())[5..], losses(b.path())[..]);
}

/// SIGKILL of the trainer at random moments while it writes a checkpoint every step: after
/// every kill the run's `latest` loads and verifies, and the next resume continues from it.
#[test]
fn sigkill_during_checkpoint_writes_never_corrupts_latest() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let args = [
        "--config",
        "configs/tiny.yaml",
        "--quiet",
        "--out-dir",
        out,
        "--set",
        "checkpoint.every=1",
        "--set",
        "checkpoint.keep_last=2",
        "--set",
        "train.max_steps=100000",
        "--set",
        "train.eval_every=0",
    ];
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    // A first checkpoint to fall back on, then 20 killed resumes.
    let mut first: Vec<&str> = args.to_vec();
    first.extend(["--max-steps", "1"]);
    assert_success(&run(&first));
    let mut last_step = 1;
    for trial in 0..20 {
        let mut a: Vec<&str> = args.to_vec();
        a.push("--resume");
        // Each trial trains at least one step of its own before the kill.
        let before = sparse_train_tests::completed_steps(dir.path());
        let mut t = Trainer::spawn(&a);
        t.wait_for_steps(dir.path(), before + 1, Duration::from_secs(120));
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(50 + (seed >> 33) % 900));
        t.signal(libc::SIGKILL);
        assert!(t.wait_timeout(Duration::from_secs(30)).is_some());
        let ckpt = sparse_checkpoints::load(dir.path())
            .unwrap_or_else(|e| panic!("trial {trial}: latest does not load: {e}"));
        let step = ckpt.trainer_state["step"].as_u64().unwrap();
        assert!(
            step >= last_step,
            "trial {trial}: latest went back from {last_step} to {step}"
        );
        last_step = step;
    }
    assert!(last_step > 0);
}

/// A run that physically removed dead FFN units resumes with the same shapes and losses,
/// and its checkpoint still holds full-size HF weights (removed units as zero rows).
#[test]
fn resume_after_a_repack_continues_identically() {
    let (a, b, out) = train_then_resume(
        &args_line(
            "--max-steps 30 --quiet --set sparsity.repack_every=10 \
             --set sparsity.tokens_until_dead=1280 --set checkpoint.every=5 \
             --set checkpoint.keep_last=10",
        ),
        25,
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("repacked the FFN"),
        "no repack happened"
    );
    let ckpt = a.path().join("checkpoints/step_00000025");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
            .unwrap();
    let layout = state["trainer_state"]["ffn_layout"].as_array().unwrap();
    assert!(
        layout.iter().any(|l| l.as_array().unwrap().len() < 512),
        "no layer shrank"
    );
    assert_eq!(losses(a.path())[25..], losses(b.path())[..]);
    let bytes = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("model.layers.1.mlp.down_proj.weight")
            .unwrap()
            .shape(),
        [128, 512]
    );
}

/// `--resume` in a run directory without a checkpoint says so, names the directory, and
/// writes nothing there.
#[test]
fn resume_without_a_checkpoint_names_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("empty");
    std::fs::create_dir_all(&run_dir).unwrap();
    let out = run(&args(&[
        "--max-steps",
        "2",
        "--out-dir",
        s(&run_dir),
        "--resume",
    ]));
    let (stdout, stderr) = output_text(&out);
    assert!(!out.status.success(), "resume succeeded\n{stdout}");
    let want = format!("no checkpoint to resume in {}", run_dir.display());
    assert!(stderr.contains(&want), "stderr lacks {want:?}:\n{stderr}");
    assert!(stderr.contains("without --resume"), "{stderr}");
    assert_eq!(std::fs::read_dir(&run_dir).unwrap().count(), 0);
    // The explicit `train` subcommand takes the same flags.
    let out = run(&[
        &["train"][..],
        &args(&["--max-steps", "2", "--out-dir", s(&run_dir), "--resume"]),
    ]
    .concat());
    assert!(!out.status.success());
    assert!(output_text(&out).1.contains(&want));
}
