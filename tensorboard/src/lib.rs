//! TensorBoard event-file writer (scalars only), with no TensorFlow or protobuf dependency.
//!
//! ```no_run
//! # fn main() -> Result<(), sparse_tensorboard::TensorboardError> {
//! let mut writer = sparse_tensorboard::EventWriter::create("runs/tiny/tb".as_ref())?;
//! writer.add_scalar("loss", 2.5, 100)?;
//! writer.flush()?;
//! # Ok(())
//! # }
//! ```
//!
//! On resume, call [`EventWriter::mark_restart`] with the first step the resumed run will log,
//! so TensorBoard drops the points the crashed run logged past its last checkpoint and the old
//! and new curves do not overlap.

mod record;

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use record::{encode_event, frame, Payload};

/// Errors of the event writer; each names the file or directory at fault.
#[derive(Debug, thiserror::Error)]
pub enum TensorboardError {
    /// An I/O call on `path` failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The event file or log directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

/// Shorthand for this crate's results.
pub type Result<T, E = TensorboardError> = std::result::Result<T, E>;

/// Distinguishes event files one process opens within the same second.
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Appends events to one new file `events.out.tfevents.<secs>.<hostname>.<pid>.<counter>` in a
/// log directory. Events are buffered; call [`EventWriter::flush`] once per log interval so
/// TensorBoard sees them (dropping the writer also flushes, ignoring errors).
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, whose first record is
    /// `file_version: "brain.Event:2"`. Never reuses an existing file name.
    pub fn create(dir: &Path) -> Result<Self> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TensorboardError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let host = hostname();
        let pid = std::process::id();
        let (path, file) = loop {
            let counter = FILE_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(
                "events.out.tfevents.{secs:010}.{host}.{pid}.{counter}"
            ));
            match File::options().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(TensorboardError::Io { path, source }),
            }
        };
        let mut writer = EventWriter {
            path,
            file: BufWriter::new(file),
        };
        writer.write_event(0, &Payload::FileVersion("brain.Event:2"))?;
        writer.flush()?;
        Ok(writer)
    }

    /// The event file this writer appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs one scalar `value` under `tag` (e.g. `train/loss`) at `step`.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<()> {
        self.add_scalars(step, &[(tag, value)])
    }

    /// Logs several `(tag, value)` scalars at `step` in one event (e.g. per-layer statistics).
    pub fn add_scalars(&mut self, step: i64, scalars: &[(&str, f32)]) -> Result<()> {
        self.write_event(step, &Payload::Scalars(scalars))
    }

    /// Marks a restart: TensorBoard discards every event logged before this marker (in this
    /// log directory) whose step is `>= step`. Call once after resuming, with the first step
    /// the resumed run will log.
    pub fn mark_restart(&mut self, step: i64) -> Result<()> {
        self.write_event(step, &Payload::SessionStart)
    }

    /// Hands buffered events to the operating system, where TensorBoard can read them.
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|source| TensorboardError::Io {
            path: self.path.clone(),
            source,
        })
    }

    fn write_event(&mut self, step: i64, payload: &Payload<'_>) -> Result<()> {
        let wall_time_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let record = frame(&encode_event(wall_time_s, step, payload));
        self.file
            .write_all(&record)
            .map_err(|source| TensorboardError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        // Errors cannot be returned from drop; callers who care call `flush` first.
        let _ = self.file.flush();
    }
}

/// This machine's host name, for the event file name (`localhost` if it cannot be found).
fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().replace(['/', '\\'], "_"))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_opened_together_get_distinct_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = EventWriter::create(dir.path()).unwrap();
        let b = EventWriter::create(dir.path()).unwrap();
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
    }

    #[test]
    fn file_starts_with_the_file_version_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(&dir.path().join("nested/tb")).unwrap();
        writer.add_scalar("loss", 1.5, 3).unwrap();
        writer.flush().unwrap();
        let bytes = fs::read(writer.path()).unwrap();
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let first = &bytes[12..12 + len];
        assert!(first.ends_with(b"\x1a\x0dbrain.Event:2"));
        let second = &bytes[12 + len + 4..];
        let second_len = u64::from_le_bytes(second[..8].try_into().unwrap()) as usize;
        assert_eq!(second.len(), 16 + second_len, "exactly one more record");
    }

    #[test]
    fn create_reports_an_unusable_directory() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"").unwrap();
        let err = EventWriter::create(&blocker.join("tb")).err().unwrap();
        assert!(err.to_string().contains("file"), "{err}");
    }
}
