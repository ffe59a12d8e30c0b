//! The checkpoint writer of a training run: one background thread at a time, so training
//! continues while the files are written and fsynced.
//!
//! A write that fails leaves `latest` naming the previous complete checkpoint (the format's
//! temp directory + rename); the saver then removes the partial temp directory, whose bytes
//! would otherwise keep a full disk full until the next save, and names the failure: a full
//! disk as such, with the path and what to do.
use anyhow::{anyhow, Result};
use sparse_checkpoints::{Checkpoint, CheckpointError, CHECKPOINTS_DIR, LATEST_FILE};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// Prefix of the format's in-progress directories (see `sparse_checkpoints`' layout):
/// anything under it in `RUN/checkpoints` is a save that did not finish.
const PARTIAL_PREFIX: &str = ".tmp-";

/// Writes checkpoints on a background thread (one at a time).
#[derive(Default)]
pub struct Saver {
    pending: Option<JoinHandle<Result<PathBuf>>>,
}

impl Saver {
    /// Waits for the previous write, then starts writing `ckpt` as `run`'s checkpoint of
    /// `step`, keeping the newest `keep` (0: all).
    pub fn save(&mut self, run: PathBuf, step: u64, ckpt: Checkpoint, keep: usize) -> Result<()> {
        self.wait()?;
        self.pending = Some(std::thread::spawn(move || write(&run, step, &ckpt, keep)));
        Ok(())
    }

    /// Waits for the write in flight, if any, and reports its error.
    pub fn wait(&mut self) -> Result<()> {
        if let Some(h) = self.pending.take() {
            h.join()
                .map_err(|_| anyhow!("checkpoint writer thread panicked"))??;
        }
        Ok(())
    }

    /// Reports the error of a write that has finished, without waiting for one in flight.
    pub fn check(&mut self) -> Result<()> {
        if self.pending.as_ref().is_some_and(JoinHandle::is_finished) {
            self.wait()?;
        }
        Ok(())
    }
}

/// One checkpoint write, its failure named (see the module docs).
fn write(run: &Path, step: u64, ckpt: &Checkpoint, keep: usize) -> Result<PathBuf> {
    sparse_checkpoints::save(run, step, ckpt, keep).map_err(|e| {
        let root = run.join(CHECKPOINTS_DIR);
        let cleanup = remove_partial(&root);
        let latest = match std::fs::read_to_string(root.join(LATEST_FILE)) {
            Ok(name) => format!("`latest` still names {}", name.trim()),
            Err(_) => "there is no earlier checkpoint".to_string(),
        };
        let cleanup = match cleanup {
            Ok(()) => String::new(),
            Err(c) => format!(" (and removing the partial write failed: {c})"),
        };
        match disk_full_path(&e) {
            Some(path) => anyhow!(
                "checkpoint of step {step} not written: the disk is full ({}: no space left on \
                 device); {latest}{cleanup}. Free space on the file system of {}, lower \
                 checkpoint.keep_last, or set train.out_dir to a disk with room, then `--resume`",
                path.display(),
                root.display()
            ),
            None => anyhow!("checkpoint of step {step} not written: {e}; {latest}{cleanup}"),
        }
    })
}

/// The file a write failed on for lack of space (ENOSPC, or EDQUOT: over a quota).
fn disk_full_path(e: &CheckpointError) -> Option<&Path> {
    let CheckpointError::Io { path, source } = e else {
        return None;
    };
    use std::io::ErrorKind::{QuotaExceeded, StorageFull};
    matches!(source.kind(), StorageFull | QuotaExceeded).then_some(path.as_path())
}

/// Removes the in-progress directories (and files) in `root`: only one process saves into a
/// run directory, so after a failed save they are that save's partial output.
fn remove_partial(root: &Path) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(PARTIAL_PREFIX)
        {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparse_checkpoints::{Dtype, RawTensor};
    use std::collections::BTreeMap;

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            weights: BTreeMap::from([(
                "w".to_string(),
                RawTensor {
                    dtype: Dtype::F32,
                    shape: vec![2],
                    data: vec![0; 8],
                },
            )]),
            optimizer: BTreeMap::new(),
            trainer_state: serde_json::json!({}),
            hf_config: None,
            files: BTreeMap::new(),
        }
    }

    /// Only an I/O error for lack of space is a full disk, and it names the file.
    #[test]
    fn a_full_disk_is_recognised_by_its_os_error() {
        // Linux's ENOSPC, EDQUOT and EACCES.
        let io = |code| CheckpointError::Io {
            path: PathBuf::from("/run/checkpoints/.tmp-x/model.safetensors"),
            source: std::io::Error::from_raw_os_error(code),
        };
        assert_eq!(
            disk_full_path(&io(28)),
            Some(Path::new("/run/checkpoints/.tmp-x/model.safetensors"))
        );
        assert!(disk_full_path(&io(122)).is_some());
        assert!(disk_full_path(&io(13)).is_none());
    }

    /// A failed write leaves no partial directory and says what `latest` still names.
    #[test]
    fn a_failed_write_removes_its_partial_directory() {
        let run = tempfile::tempdir().unwrap();
        let mut saver = Saver::default();
        saver
            .save(run.path().to_path_buf(), 1, checkpoint(), 0)
            .unwrap();
        saver.wait().unwrap();
        let root = run.path().join(CHECKPOINTS_DIR);
        // An extra file name the format refuses: the save fails after writing the tensors
        // into its temp directory.
        let mut bad = checkpoint();
        bad.files.insert("a/b".to_string(), b"x".to_vec());
        let err = write(run.path(), 2, &bad, 0).unwrap_err().to_string();
        assert!(err.contains("checkpoint of step 2 not written"), "{err}");
        assert!(err.contains("`latest` still names step_00000001"), "{err}");
        let left: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(PARTIAL_PREFIX))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// `check` passes while a write runs or after one succeeded, and reports a failed one
    /// once it has finished, without a new save.
    #[test]
    fn check_reports_a_finished_failed_write() {
        let run = tempfile::tempdir().unwrap();
        let mut saver = Saver::default();
        saver.check().unwrap();
        saver
            .save(run.path().to_path_buf(), 1, checkpoint(), 0)
            .unwrap();
        let mut bad = checkpoint();
        bad.files.insert("a/b".to_string(), b"x".to_vec());
        saver.save(run.path().to_path_buf(), 2, bad, 0).unwrap();
        let started = std::time::Instant::now();
        let err = loop {
            if let Err(e) = saver.check() {
                break e.to_string();
            }
            assert!(
                started.elapsed().as_secs() < 30,
                "the failed write never reported"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(err.contains("checkpoint of step 2 not written"), "{err}");
        saver.check().unwrap();
    }
}
