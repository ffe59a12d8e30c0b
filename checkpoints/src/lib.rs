//! Atomic, resumable training checkpoints.
//!
//! A run directory holds its checkpoints under `checkpoints/`:
//!
//! ```text
//! RUN/checkpoints/
//!   latest                    one line: the name of the newest complete checkpoint
//!   step_00001234/
//!     model.safetensors       weights, Hugging Face Llama names
//!     optimizer.safetensors   optimizer state
//!     trainer_state.json      {"format_version", "step", "trainer_state": {...}}
//!     config.json             the Hugging Face config (only if one was given)
//!     tokenizer.json, ...     other files given verbatim (`Checkpoint::files`)
//!     MANIFEST.json           {"format_version", "step", "files": {name: {bytes, crc32}}}
//!   .tmp-...                  a save in progress, or one a crash interrupted
//! ```
//!
//! [`save`] writes a checkpoint into a temporary directory, fsyncs it, renames it into place and
//! only then points `latest` at it, so a crash at any moment (even `kill -9`) leaves `latest`
//! naming a complete checkpoint. [`load`] verifies every file's size and CRC-32 against the
//! manifest before parsing it, and never writes. Tensors are plain bytes ([`RawTensor`]); the
//! trainer converts to and from its tensor library.

mod error;
mod format;
mod load;
mod save;
mod tensor;

pub use error::{CheckpointError, Result};
pub use load::{latest_checkpoint, load};
pub use save::save;
pub use tensor::{check_tensors, Checkpoint, Dtype, ExpectedTensor, RawTensor};

/// Version of the on-disk layout, recorded in `MANIFEST.json` and `trainer_state.json`.
pub const FORMAT_VERSION: u64 = 1;

/// Subdirectory of a run directory that holds its checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// File in [`CHECKPOINTS_DIR`] naming the newest complete checkpoint.
pub const LATEST_FILE: &str = "latest";
/// Model weights file inside a checkpoint.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimizer state file inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Trainer state file inside a checkpoint.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// Hugging Face config file inside a checkpoint (present only if a config was saved).
pub const HF_CONFIG_FILE: &str = "config.json";
/// Manifest file inside a checkpoint: sizes and checksums of the others.
pub const MANIFEST_FILE: &str = "MANIFEST.json";

/// Prefix of the directories a save writes before renaming them into place.
const TMP_PREFIX: &str = ".tmp-";
/// Prefix of a checkpoint directory's name; the step follows, zero-padded to 8 digits.
const STEP_PREFIX: &str = "step_";

/// The directory name of the checkpoint for `step`: `step_00001234`.
pub fn checkpoint_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:08}")
}

/// The step a checkpoint directory name stands for, if it is one (`step_00001234` → 1234).
fn parse_checkpoint_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}
