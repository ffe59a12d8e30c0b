//! The checkpoint writer of a training run: one background thread at a time, so training
//! continues while the files are written and fsynced.
use anyhow::Result;
use sparse_checkpoints::Checkpoint;
use std::path::PathBuf;
use std::thread::JoinHandle;

/// Writes checkpoints on a background thread (one at a time).
#[derive(Default)]
pub struct Saver {
    pending: Option<JoinHandle<sparse_checkpoints::Result<PathBuf>>>,
}

impl Saver {
    /// Waits for the previous write, then starts writing `ckpt` as `run`'s checkpoint of
    /// `step`, keeping the newest `keep` (0: all).
    pub fn save(&mut self, run: PathBuf, step: u64, ckpt: Checkpoint, keep: usize) -> Result<()> {
        self.wait()?;
        self.pending = Some(std::thread::spawn(move || {
            sparse_checkpoints::save(&run, step, &ckpt, keep)
        }));
        Ok(())
    }

    /// Waits for the write in flight, if any, and reports its error.
    pub fn wait(&mut self) -> Result<()> {
        if let Some(h) = self.pending.take() {
            h.join()
                .map_err(|_| anyhow::anyhow!("checkpoint writer thread panicked"))??;
        }
        Ok(())
    }
}
