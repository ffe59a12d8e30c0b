//! Writing checkpoints: temp directory, fsync, rename into place, point `latest`, prune.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::error::CheckpointError;
use crate::error::{io_err, Result};
use crate::format::{
    validate_tensors, write_file, write_json, write_safetensors, Manifest, TrainerStateFile,
};
use crate::{
    checkpoint_dir_name, parse_checkpoint_dir_name, Checkpoint, CHECKPOINTS_DIR, FORMAT_VERSION,
    HF_CONFIG_FILE, LATEST_FILE, MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE, TMP_PREFIX,
    TRAINER_STATE_FILE,
};

/// Saves `checkpoint` as `RUN/checkpoints/step_<step>` and points `RUN/checkpoints/latest` at
/// it; returns the checkpoint directory.
///
/// Crash-safe: the files go into a temporary directory next to the final one, each file and the
/// directory are fsynced, the directory is renamed into place (atomically replacing an existing
/// checkpoint of the same step), and only then is `latest` replaced through an fsynced
/// `latest.tmp`. Afterwards the oldest checkpoints beyond `keep_last` are deleted (`0` keeps
/// all), never the one `latest` names. Temporary directories left by an interrupted save are
/// removed first. One process at a time may save into a run directory; the call blocks for the
/// whole write, so run it on a background thread to overlap it with training.
pub fn save(
    run_dir: &Path,
    step: u64,
    checkpoint: &Checkpoint,
    keep_last: usize,
) -> Result<PathBuf> {
    validate_tensors(MODEL_FILE, &checkpoint.weights)?;
    validate_tensors(OPTIMIZER_FILE, &checkpoint.optimizer)?;

    let root = run_dir.join(CHECKPOINTS_DIR);
    create_dir_durably(&root)?;
    remove_leftovers(&root)?;

    let name = checkpoint_dir_name(step);
    let tmp = root.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let mut files = BTreeMap::new();
    files.insert(
        MODEL_FILE.to_string(),
        write_safetensors(&tmp.join(MODEL_FILE), &checkpoint.weights)?,
    );
    files.insert(
        OPTIMIZER_FILE.to_string(),
        write_safetensors(&tmp.join(OPTIMIZER_FILE), &checkpoint.optimizer)?,
    );
    let state = TrainerStateFile {
        format_version: FORMAT_VERSION,
        step,
        trainer_state: checkpoint.trainer_state.clone(),
    };
    files.insert(
        TRAINER_STATE_FILE.to_string(),
        write_json(&tmp.join(TRAINER_STATE_FILE), &state)?,
    );
    if let Some(config) = &checkpoint.hf_config {
        files.insert(
            HF_CONFIG_FILE.to_string(),
            write_json(&tmp.join(HF_CONFIG_FILE), config)?,
        );
    }
    for (name, bytes) in &checkpoint.files {
        check_extra_file_name(name)?;
        files.insert(
            name.clone(),
            write_file(&tmp.join(name), |w| w.write_all(bytes))?,
        );
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        step,
        files,
    };
    write_json(&tmp.join(MANIFEST_FILE), &manifest)?;
    sync_dir(&tmp)?;

    let target = root.join(&name);
    let replaced = install(&tmp, &target)?;
    sync_dir(&root)?;
    if let Some(old) = replaced {
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    write_latest(&root, &name)?;
    remove_old(&root, keep_last, &name)?;
    Ok(target)
}

/// An extra file's name must be a plain file name that no other checkpoint file uses.
fn check_extra_file_name(name: &str) -> Result<()> {
    let reserved = [
        MODEL_FILE,
        OPTIMIZER_FILE,
        TRAINER_STATE_FILE,
        HF_CONFIG_FILE,
        MANIFEST_FILE,
    ];
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.starts_with(TMP_PREFIX)
        && !name.contains(['/', '\\', '\0']);
    if !plain || reserved.contains(&name) {
        return Err(CheckpointError::InvalidFileName {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Creates `dir` and any missing ancestors, fsyncing each new directory's parent so the new
/// entries survive a power loss.
fn create_dir_durably(dir: &Path) -> Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    for created in missing.iter().rev() {
        if let Some(parent) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Removes what interrupted saves left in `root`: entries whose name starts with `.tmp-`.
fn remove_leftovers(root: &Path) -> Result<()> {
    for entry in fs::read_dir(root).map_err(io_err(root))? {
        let entry = entry.map_err(io_err(root))?;
        if !entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type().map_err(io_err(&path))?.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(io_err(&path))?;
    }
    Ok(())
}

/// Moves the finished directory `tmp` to `target`. If `target` already exists (the same step
/// saved again), the two are swapped atomically where the platform allows and the old one is
/// returned for deletion once the swap is durable.
fn install(tmp: &Path, target: &Path) -> Result<Option<PathBuf>> {
    if !target.exists() {
        fs::rename(tmp, target).map_err(io_err(target))?;
        return Ok(None);
    }
    #[cfg(target_os = "linux")]
    {
        if exchange(tmp, target).is_ok() {
            return Ok(Some(tmp.to_path_buf()));
        }
    }
    // No atomic exchange: move the old directory aside first. A crash between the two renames
    // leaves no directory under the step's name until the next save.
    let mut aside = tmp.as_os_str().to_owned();
    aside.push("-replaced");
    let aside = PathBuf::from(aside);
    fs::rename(target, &aside).map_err(io_err(target))?;
    fs::rename(tmp, target).map_err(io_err(target))?;
    Ok(Some(aside))
}

/// Atomically swaps two directory entries (`renameat2` with `RENAME_EXCHANGE`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Replaces `root/latest` with one naming `name`: write `latest.tmp`, fsync, rename, fsync `root`.
fn write_latest(root: &Path, name: &str) -> Result<()> {
    let tmp = root.join(format!("{LATEST_FILE}.tmp"));
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(format!("{name}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp))?;
    let latest = root.join(LATEST_FILE);
    fs::rename(&tmp, &latest).map_err(io_err(&latest))?;
    sync_dir(root)
}

/// Deletes the oldest checkpoints (by step) beyond `keep_last`, except `keep_name`. Each is
/// first renamed to a `.tmp-` name, so a crash mid-deletion never leaves a partial
/// `step_` directory behind.
fn remove_old(root: &Path, keep_last: usize, keep_name: &str) -> Result<()> {
    if keep_last == 0 {
        return Ok(());
    }
    let mut steps = Vec::new();
    for entry in fs::read_dir(root).map_err(io_err(root))? {
        let name = entry.map_err(io_err(root))?.file_name();
        let name = name.to_string_lossy();
        if let Some(step) = parse_checkpoint_dir_name(&name) {
            steps.push((step, name.into_owned()));
        }
    }
    steps.sort();
    let excess = steps.len().saturating_sub(keep_last);
    for (_, name) in steps.into_iter().take(excess) {
        if name == keep_name {
            continue;
        }
        let doomed = root.join(format!("{TMP_PREFIX}delete-{name}"));
        fs::rename(root.join(&name), &doomed).map_err(io_err(&doomed))?;
        fs::remove_dir_all(&doomed).map_err(io_err(&doomed))?;
    }
    Ok(())
}

/// Fsyncs a directory, making renames and new entries in it durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}
