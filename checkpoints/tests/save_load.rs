//! Round trips, retention, and the error each kind of damage produces.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;
use sparse_checkpoints::{
    check_tensors, latest_checkpoint, load, save, Checkpoint, CheckpointError, Dtype, RawTensor,
    CHECKPOINTS_DIR, LATEST_FILE, MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE,
};

fn tensor(dtype: Dtype, shape: &[usize], seed: u8) -> RawTensor {
    let n = shape.iter().product::<usize>() * dtype.size_bytes();
    RawTensor {
        dtype,
        shape: shape.to_vec(),
        data: (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect(),
    }
}

fn sample(step: u64) -> Checkpoint {
    let seed = step as u8;
    let weights = BTreeMap::from([
        (
            "model.embed_tokens.weight".to_string(),
            tensor(Dtype::BF16, &[16, 8], seed),
        ),
        (
            "model.layers.0.mlp.gate_proj.weight".to_string(),
            tensor(Dtype::F32, &[32, 8], seed),
        ),
        (
            "model.norm.weight".to_string(),
            tensor(Dtype::F16, &[8], seed),
        ),
        (
            "lm_head.weight".to_string(),
            tensor(Dtype::BF16, &[16, 8], seed),
        ),
    ]);
    let optimizer = BTreeMap::from([
        (
            "model.norm.weight.exp_avg".to_string(),
            tensor(Dtype::F32, &[8], seed),
        ),
        (
            "model.norm.weight.exp_avg_sq".to_string(),
            tensor(Dtype::F32, &[8], seed),
        ),
        ("step".to_string(), tensor(Dtype::I64, &[], seed)),
        ("ffn_layout".to_string(), tensor(Dtype::U8, &[3], seed)),
    ]);
    Checkpoint {
        weights,
        optimizer,
        trainer_state: json!({ "step": step, "tokens": step * 4096, "rng": [1, 2, 3] }),
        hf_config: Some(json!({ "model_type": "llama", "hidden_size": 8 })),
        files: BTreeMap::from([(
            "tokenizer.json".to_string(),
            format!("{{\"step\": {step}}}").into_bytes(),
        )]),
    }
}

fn ckpt_dir(run: &Path, step: u64) -> PathBuf {
    run.join(CHECKPOINTS_DIR).join(format!("step_{step:08}"))
}

/// Rewrites a file of a saved checkpoint and updates its manifest entry, so the damage is past
/// the size and checksum checks.
fn rewrite_with_valid_manifest(dir: &Path, file: &str, contents: &[u8]) {
    fs::write(dir.join(file), contents).unwrap();
    let manifest_path = dir.join(MANIFEST_FILE);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    manifest["files"][file] =
        json!({ "bytes": contents.len(), "crc32": crc32fast::hash(contents) });
    fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
}

fn saved_run() -> (tempfile::TempDir, PathBuf) {
    let run = tempfile::tempdir().unwrap();
    let dir = save(run.path(), 7, &sample(7), 3).unwrap();
    (run, dir)
}

#[test]
fn round_trip_preserves_everything() {
    let (run, dir) = saved_run();
    assert_eq!(dir, ckpt_dir(run.path(), 7));
    assert_eq!(load(&dir).unwrap(), sample(7));
    assert_eq!(load(run.path()).unwrap(), sample(7));
    assert_eq!(latest_checkpoint(run.path()).unwrap(), Some(dir.clone()));
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join(TRAINER_STATE_FILE)).unwrap()).unwrap();
    assert_eq!(state["format_version"], 1);
    assert_eq!(state["step"], 7);
    let names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 6, "{names:?}");
    assert_eq!(
        fs::read(dir.join("tokenizer.json")).unwrap(),
        b"{\"step\": 7}"
    );
}

#[test]
fn round_trip_without_hf_config_and_with_empty_maps() {
    let run = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint {
        weights: BTreeMap::new(),
        optimizer: BTreeMap::new(),
        trainer_state: json!(null),
        hf_config: None,
        files: BTreeMap::new(),
    };
    let dir = save(run.path(), 0, &ckpt, 1).unwrap();
    assert!(!dir.join("config.json").exists());
    assert_eq!(load(run.path()).unwrap(), ckpt);
}

#[test]
fn weights_are_readable_by_the_safetensors_crate() {
    let (_run, dir) = saved_run();
    let bytes = fs::read(dir.join(MODEL_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor("model.layers.0.mlp.gate_proj.weight").unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    assert_eq!(view.shape(), &[32, 8]);
    assert_eq!(
        view.data(),
        &sample(7).weights["model.layers.0.mlp.gate_proj.weight"].data[..]
    );
    assert_eq!(
        view.data().as_ptr() as usize % 4,
        0,
        "f32 data is 4-byte aligned"
    );
}

/// The error `load` reports for a saved checkpoint after `damage` was done to its folder.
fn load_error_after(damage: impl FnOnce(&Path)) -> (PathBuf, CheckpointError) {
    let (run, dir) = saved_run();
    damage(&dir);
    let err = load(&dir).expect_err("a damaged checkpoint loads");
    drop(run);
    (dir, err)
}

#[test]
fn missing_file_is_named() {
    let (dir, err) = load_error_after(|dir| fs::remove_file(dir.join(OPTIMIZER_FILE)).unwrap());
    assert!(
        matches!(&err, CheckpointError::MissingFile { path } if *path == dir.join(OPTIMIZER_FILE)),
        "{err:?}"
    );
}

#[test]
fn damaged_extra_file_is_a_checksum_mismatch() {
    let (dir, err) =
        load_error_after(|dir| fs::write(dir.join("tokenizer.json"), b"{\"step\": 8}").unwrap());
    match err {
        CheckpointError::ChecksumMismatch { path, .. } => {
            assert_eq!(path, dir.join("tokenizer.json"))
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
}

#[test]
fn extra_files_with_reserved_or_nested_names_are_refused() {
    for name in [MODEL_FILE, MANIFEST_FILE, "sub/tokenizer.json", "..", ""] {
        let run = tempfile::tempdir().unwrap();
        let mut ckpt = sample(1);
        ckpt.files.insert(name.to_string(), b"x".to_vec());
        let err = save(run.path(), 1, &ckpt, 1).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::InvalidFileName { name: n } if n == name),
            "{name:?}: {err:?}"
        );
    }
}

#[test]
fn truncated_file_is_a_size_mismatch() {
    let (_, err) = load_error_after(|dir| {
        let bytes = fs::read(dir.join(MODEL_FILE)).unwrap();
        fs::write(dir.join(MODEL_FILE), &bytes[..bytes.len() - 10]).unwrap();
    });
    assert!(
        matches!(err, CheckpointError::SizeMismatch { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn flipped_byte_is_a_checksum_mismatch() {
    let (dir, err) = load_error_after(|dir| {
        let mut bytes = fs::read(dir.join(OPTIMIZER_FILE)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        fs::write(dir.join(OPTIMIZER_FILE), &bytes).unwrap();
    });
    assert!(
        matches!(&err, CheckpointError::ChecksumMismatch { path, .. } if *path == dir.join(OPTIMIZER_FILE)),
        "{err:?}"
    );
}

#[test]
fn unknown_format_version_is_reported() {
    let (dir, err) = load_error_after(|dir| {
        let text = fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
        let newer = text.replace("\"format_version\": 1", "\"format_version\": 99");
        fs::write(dir.join(MANIFEST_FILE), newer).unwrap();
    });
    assert!(
        matches!(
            &err,
            CheckpointError::UnsupportedFormatVersion { path, found: 99, supported: 1 }
                if *path == dir.join(MANIFEST_FILE)
        ),
        "{err:?}"
    );
}

#[test]
fn unknown_trainer_state_version_is_reported() {
    let (dir, err) = load_error_after(|dir| {
        let state = json!({ "format_version": 2, "step": 7, "trainer_state": {} });
        rewrite_with_valid_manifest(dir, TRAINER_STATE_FILE, state.to_string().as_bytes());
    });
    assert!(
        matches!(
            &err,
            CheckpointError::UnsupportedFormatVersion { path, found: 2, .. }
                if *path == dir.join(TRAINER_STATE_FILE)
        ),
        "{err:?}"
    );
}

#[test]
fn bad_json_is_reported_with_the_file() {
    let (dir, err) = load_error_after(|dir| {
        rewrite_with_valid_manifest(dir, TRAINER_STATE_FILE, b"{\"format_version\": 1, ")
    });
    assert!(
        matches!(&err, CheckpointError::Json { path, .. } if *path == dir.join(TRAINER_STATE_FILE)),
        "{err:?}"
    );
}

#[test]
fn garbage_safetensors_is_reported_with_the_file() {
    let (_, err) = load_error_after(|dir| {
        rewrite_with_valid_manifest(dir, MODEL_FILE, b"this is not a safetensors file")
    });
    assert!(
        matches!(err, CheckpointError::Safetensors { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn dangling_latest_is_reported() {
    let (run, dir) = saved_run();
    fs::remove_dir_all(&dir).unwrap();
    let expected_latest = run.path().join(CHECKPOINTS_DIR).join(LATEST_FILE);
    match load(run.path()) {
        Err(CheckpointError::DanglingLatest { latest, target }) => {
            assert_eq!((latest, target), (expected_latest, dir))
        }
        other => panic!("expected DanglingLatest, got {other:?}"),
    }
}

#[test]
fn empty_run_dir_has_no_checkpoint() {
    let run = tempfile::tempdir().unwrap();
    assert_eq!(latest_checkpoint(run.path()).unwrap(), None);
    assert!(matches!(
        load(run.path()),
        Err(CheckpointError::NotACheckpoint { .. })
    ));
    assert!(matches!(
        load(&run.path().join("nope")),
        Err(CheckpointError::MissingFile { .. })
    ));
}

#[test]
fn check_tensors_names_missing_and_mismatched_tensors() {
    let ckpt = sample(1);
    check_tensors(
        &ckpt,
        &[
            ("model.layers.0.mlp.gate_proj.weight", Dtype::F32, &[32, 8]),
            ("model.norm.weight.exp_avg", Dtype::F32, &[8]),
        ],
    )
    .unwrap();
    match check_tensors(
        &ckpt,
        &[("model.layers.1.mlp.up_proj.weight", Dtype::F32, &[32, 8])],
    ) {
        Err(CheckpointError::MissingTensor { name }) => {
            assert_eq!(name, "model.layers.1.mlp.up_proj.weight")
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    match check_tensors(
        &ckpt,
        &[("model.layers.0.mlp.gate_proj.weight", Dtype::F32, &[8, 32])],
    ) {
        Err(err @ CheckpointError::TensorMismatch { .. }) => {
            let msg = err.to_string();
            assert!(msg.contains("[8, 32]") && msg.contains("[32, 8]"), "{msg}");
        }
        other => panic!("expected TensorMismatch, got {other:?}"),
    }
}

#[test]
fn save_rejects_data_that_does_not_match_the_shape() {
    let run = tempfile::tempdir().unwrap();
    let mut ckpt = sample(1);
    ckpt.weights
        .get_mut("model.norm.weight")
        .unwrap()
        .data
        .pop();
    assert!(matches!(
        save(run.path(), 1, &ckpt, 1),
        Err(CheckpointError::InvalidTensorData {
            file: "model.safetensors",
            ..
        })
    ));
    assert_eq!(latest_checkpoint(run.path()).unwrap(), None);
}

#[test]
fn retention_keeps_the_last_n() {
    let run = tempfile::tempdir().unwrap();
    for step in 1..=6 {
        save(run.path(), step * 10, &sample(step), 3).unwrap();
    }
    for step in 1..=3 {
        assert!(
            !ckpt_dir(run.path(), step * 10).exists(),
            "step {step}0 kept"
        );
    }
    for step in 4..=6 {
        assert!(
            ckpt_dir(run.path(), step * 10).exists(),
            "step {step}0 deleted"
        );
    }
    assert_eq!(load(run.path()).unwrap(), sample(6));
}

#[test]
fn retention_never_deletes_the_latest_target() {
    let run = tempfile::tempdir().unwrap();
    for step in [10, 20, 30] {
        save(run.path(), step, &sample(step), 2).unwrap();
    }
    // Resumed from an older point: the new `latest` is the oldest step on disk.
    save(run.path(), 5, &sample(5), 2).unwrap();
    assert_eq!(
        latest_checkpoint(run.path()).unwrap(),
        Some(ckpt_dir(run.path(), 5))
    );
    assert_eq!(load(run.path()).unwrap(), sample(5));
    assert!(!ckpt_dir(run.path(), 10).exists());
}

#[test]
fn saving_an_existing_step_replaces_it() {
    let run = tempfile::tempdir().unwrap();
    save(run.path(), 10, &sample(1), 0).unwrap();
    save(run.path(), 10, &sample(2), 0).unwrap();
    assert_eq!(load(run.path()).unwrap(), sample(2));
    let entries = fs::read_dir(run.path().join(CHECKPOINTS_DIR))
        .unwrap()
        .count();
    assert_eq!(entries, 2, "step_00000010 and latest only");
}

#[test]
fn leftovers_of_a_crashed_save_are_ignored_then_removed() {
    let (run, _dir) = saved_run();
    let root = run.path().join(CHECKPOINTS_DIR);
    let leftover = root.join(".tmp-step_00000008-12345");
    fs::create_dir(&leftover).unwrap();
    fs::write(leftover.join(MODEL_FILE), b"half").unwrap();
    assert_eq!(load(run.path()).unwrap(), sample(7));
    save(run.path(), 8, &sample(8), 3).unwrap();
    assert!(!leftover.exists());
}

#[test]
fn checkpoint_can_be_saved_from_another_thread() {
    let run = tempfile::tempdir().unwrap();
    let ckpt = sample(3);
    let path = run.path().to_path_buf();
    let handle = std::thread::spawn(move || save(&path, 3, &ckpt, 1));
    handle.join().unwrap().unwrap();
    assert_eq!(load(run.path()).unwrap(), sample(3));
}
