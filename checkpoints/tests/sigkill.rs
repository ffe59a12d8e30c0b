//! Crash safety: a child process saves checkpoints in a loop and is killed with SIGKILL at
//! random moments; after every kill the run's latest checkpoint must load and hold exactly what
//! was written for its step.
//!
//! The child is this test executable itself, re-run with only `checkpoint_writer_child` selected
//! and the run directory in an environment variable.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use sparse_checkpoints::{
    latest_checkpoint, load, save, Checkpoint, Dtype, RawTensor, CHECKPOINTS_DIR,
};

/// Names the run directory the child writes into; unset, the child test does nothing.
const WRITER_DIR_ENV: &str = "SPARSE_CHECKPOINTS_WRITER_DIR";
const KEEP_LAST: usize = 2;
const KILLS: usize = 24;

/// SplitMix64: a tiny deterministic generator for payloads and kill times.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn payload(step: u64, index: u64, dtype: Dtype, shape: &[usize]) -> RawTensor {
    let bytes = shape.iter().product::<usize>() * dtype.size_bytes();
    let mut rng = SplitMix(step << 8 | index);
    let mut data = Vec::with_capacity(bytes);
    while data.len() < bytes {
        data.extend_from_slice(&rng.next().to_le_bytes());
    }
    data.truncate(bytes);
    RawTensor {
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

/// What the writer saves at `step`: about 4 MiB, every byte a function of the step.
fn checkpoint_for(step: u64) -> Checkpoint {
    Checkpoint {
        weights: BTreeMap::from([
            (
                "model.embed_tokens.weight".into(),
                payload(step, 0, Dtype::BF16, &[512, 1024]),
            ),
            (
                "model.layers.0.mlp.down_proj.weight".into(),
                payload(step, 1, Dtype::F32, &[256, 1024]),
            ),
        ]),
        optimizer: BTreeMap::from([(
            "model.layers.0.mlp.down_proj.weight.exp_avg".into(),
            payload(step, 2, Dtype::F32, &[256, 1024]),
        )]),
        trainer_state: json!({ "step": step }),
        hf_config: Some(json!({ "model_type": "llama" })),
        files: BTreeMap::new(),
    }
}

#[test]
#[ignore = "child process of load_survives_sigkill_during_save"]
fn checkpoint_writer_child() {
    let Some(run_dir) = std::env::var_os(WRITER_DIR_ENV).map(PathBuf::from) else {
        return;
    };
    let mut step = match latest_checkpoint(&run_dir).unwrap() {
        Some(_) => {
            load(&run_dir).unwrap().trainer_state["step"]
                .as_u64()
                .unwrap()
                + 1
        }
        None => 1,
    };
    loop {
        save(&run_dir, step, &checkpoint_for(step), KEEP_LAST).unwrap();
        println!("saved {step}");
        step += 1;
    }
}

/// Starts the writer, kills it after `after`, and returns the highest step it reported saved.
fn run_writer_and_kill(run_dir: &Path, after: Duration) -> u64 {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "checkpoint_writer_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(WRITER_DIR_ENV, run_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| line.strip_prefix("saved ")?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    });
    std::thread::sleep(after);
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap()
}

#[test]
fn load_survives_sigkill_during_save() {
    let run = tempfile::tempdir().unwrap();
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill-time seed {seed}");
    let mut rng = SplitMix(seed);
    let started = Instant::now();
    let mut loaded_step = 0;
    let mut kills_mid_save = 0;
    for kill in 0..KILLS {
        let after = Duration::from_millis(40 + rng.next() % 400);
        let reported = run_writer_and_kill(run.path(), after);

        let root = run.path().join(CHECKPOINTS_DIR);
        let names: Vec<String> = std::fs::read_dir(&root)
            .map(|dir| {
                dir.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        kills_mid_save += names.iter().any(|n| n.starts_with(".tmp-")) as usize;
        let step_dirs = names.iter().filter(|n| n.starts_with("step_")).count();
        assert!(
            step_dirs <= KEEP_LAST + 1,
            "kill {kill}: retention left {names:?}"
        );

        if latest_checkpoint(run.path()).unwrap().is_none() {
            assert_eq!(
                (reported, loaded_step),
                (0, 0),
                "kill {kill}: checkpoint lost"
            );
            continue;
        }
        let ckpt = load(run.path()).unwrap_or_else(|e| panic!("kill {kill} (seed {seed}): {e}"));
        let step = ckpt.trainer_state["step"].as_u64().unwrap();
        assert!(
            step >= reported && step >= loaded_step,
            "kill {kill}: loaded step {step}, but step {reported} was reported saved"
        );
        assert!(
            ckpt == checkpoint_for(step),
            "kill {kill}: step {step} holds other data"
        );
        loaded_step = step;
    }
    eprintln!(
        "{KILLS} kills ({kills_mid_save} mid-save), reached step {loaded_step} in {:?}",
        started.elapsed()
    );
    assert!(
        loaded_step >= 2,
        "the writer never got past its first checkpoint"
    );
}
