//! Reading checkpoints back: follow `latest`, verify every file against the manifest, parse.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{io_err, CheckpointError, Result};
use crate::format::{
    parse_safetensors, parse_versioned, read_verified, Manifest, TrainerStateFile,
};
use crate::{
    parse_checkpoint_dir_name, Checkpoint, CHECKPOINTS_DIR, HF_CONFIG_FILE, LATEST_FILE,
    MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE,
};

/// The checkpoint directory `RUN/checkpoints/latest` names, or `None` if the run has no
/// checkpoint yet. Fails if `latest` is unreadable, malformed, or names a missing directory.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<PathBuf>> {
    let checkpoints = run_dir.join(CHECKPOINTS_DIR);
    let latest = checkpoints.join(LATEST_FILE);
    let content = match fs::read_to_string(&latest) {
        Ok(content) => content,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CheckpointError::Io {
                path: latest,
                source,
            })
        }
    };
    let name = content.trim();
    if parse_checkpoint_dir_name(name).is_none() {
        return Err(CheckpointError::InvalidLatest {
            path: latest,
            content,
        });
    }
    let target = checkpoints.join(name);
    if !target.is_dir() {
        return Err(CheckpointError::DanglingLatest { latest, target });
    }
    Ok(Some(target))
}

/// Loads a checkpoint. `path` is either a checkpoint directory (`RUN/checkpoints/step_00001234`)
/// or a run directory, whose `checkpoints/latest` is followed. Every file is checked against
/// `MANIFEST.json` (size, then CRC-32) before it is parsed; nothing is written.
pub fn load(path: &Path) -> Result<Checkpoint> {
    if path.join(MANIFEST_FILE).exists() {
        return load_dir(path);
    }
    if !path.exists() {
        return Err(CheckpointError::MissingFile {
            path: path.to_path_buf(),
        });
    }
    match latest_checkpoint(path)? {
        Some(dir) => load_dir(&dir),
        None => Err(CheckpointError::NotACheckpoint {
            path: path.to_path_buf(),
        }),
    }
}

/// Loads the checkpoint directory `dir`.
fn load_dir(dir: &Path) -> Result<Checkpoint> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest_bytes = fs::read(&manifest_path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CheckpointError::MissingFile {
            path: manifest_path.clone(),
        },
        _ => io_err(&manifest_path)(source),
    })?;
    let manifest: Manifest = parse_versioned(&manifest_path, &manifest_bytes)?;
    // Verify every file before parsing any, so a damaged file is reported as damaged rather
    // than as a parse error. Entries for files this version does not know are ignored.
    let mut verified = BTreeMap::new();
    let own = [
        MODEL_FILE,
        OPTIMIZER_FILE,
        TRAINER_STATE_FILE,
        HF_CONFIG_FILE,
    ];
    for name in own {
        if let Some(entry) = manifest.files.get(name) {
            let path = dir.join(name);
            let map = read_verified(&path, *entry)?;
            verified.insert(name, (path, map));
        }
    }
    // Every other listed file is carried verbatim (the tokenizer), verified the same way.
    let mut files = BTreeMap::new();
    for (name, entry) in &manifest.files {
        if own.contains(&name.as_str()) || name.contains(['/', '\\']) {
            continue;
        }
        let map = read_verified(&dir.join(name), *entry)?;
        files.insert(name.clone(), map[..].to_vec());
    }
    let required = |file: &'static str| {
        verified
            .get(file)
            .map(|(path, map)| (path.as_path(), &map[..]))
            .ok_or_else(|| CheckpointError::NotInManifest {
                path: manifest_path.clone(),
                file,
            })
    };

    let (path, bytes) = required(TRAINER_STATE_FILE)?;
    let state: TrainerStateFile = parse_versioned(path, bytes)?;
    let hf_config =
        match verified.get(HF_CONFIG_FILE) {
            Some((path, bytes)) => Some(serde_json::from_slice(&bytes[..]).map_err(|source| {
                CheckpointError::Json {
                    path: path.clone(),
                    source,
                }
            })?),
            None => None,
        };
    let (path, bytes) = required(MODEL_FILE)?;
    let weights = parse_safetensors(path, bytes)?;
    let (path, bytes) = required(OPTIMIZER_FILE)?;
    let optimizer = parse_safetensors(path, bytes)?;
    Ok(Checkpoint {
        weights,
        optimizer,
        trainer_state: state.trainer_state,
        hf_config,
        files,
    })
}
