//! The error type of this crate: every variant names the file or tensor at fault.

use std::path::PathBuf;

use crate::Dtype;

/// Everything that can go wrong while saving, loading or checking a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// An I/O call on `path` failed (permissions, disk full, ...).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory the call was about.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A file that must be present is not.
    #[error("{}: missing file", path.display())]
    MissingFile {
        /// The absent file.
        path: PathBuf,
    },
    /// A file's size differs from the one recorded in `MANIFEST.json` (truncated write).
    #[error(
        "{}: truncated or overwritten: MANIFEST.json records {expected_bytes} bytes, found {found_bytes}",
        path.display()
    )]
    SizeMismatch {
        /// The file whose size is wrong.
        path: PathBuf,
        /// Size recorded at save time.
        expected_bytes: u64,
        /// Size on disk now.
        found_bytes: u64,
    },
    /// A file's CRC-32 differs from the one recorded in `MANIFEST.json` (corruption).
    #[error(
        "{}: corrupted: crc32 is {found:#010x}, MANIFEST.json records {expected:#010x}",
        path.display()
    )]
    ChecksumMismatch {
        /// The corrupted file.
        path: PathBuf,
        /// Checksum recorded at save time.
        expected: u32,
        /// Checksum of the bytes on disk now.
        found: u32,
    },
    /// A JSON file carries a `format_version` this build does not read.
    #[error(
        "{}: format_version {found} is not supported (this build reads version {supported})",
        path.display()
    )]
    UnsupportedFormatVersion {
        /// The file carrying the version.
        path: PathBuf,
        /// The version found in the file.
        found: u64,
        /// The only version this build reads.
        supported: u64,
    },
    /// A JSON file does not parse, or lacks a required field.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file that failed to parse.
        path: PathBuf,
        /// The parser's error (with line and column).
        #[source]
        source: serde_json::Error,
    },
    /// `MANIFEST.json` has no entry for a file every checkpoint must have.
    #[error("{}: MANIFEST.json has no entry for {file}", path.display())]
    NotInManifest {
        /// The manifest.
        path: PathBuf,
        /// The file name the manifest should list.
        file: &'static str,
    },
    /// A `.safetensors` file does not parse.
    #[error("{}: invalid safetensors file: {source}", path.display())]
    Safetensors {
        /// The file that failed to parse.
        path: PathBuf,
        /// The safetensors parser's error.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A `.safetensors` file holds a tensor whose dtype [`Dtype`] does not cover.
    #[error("{}: tensor {name:?} has dtype {dtype}, which sparse-checkpoints does not handle", path.display())]
    UnsupportedDtype {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The dtype as the file spells it.
        dtype: String,
    },
    /// The `latest` file names a checkpoint directory that does not exist.
    #[error("{}: names {}, which does not exist", latest.display(), target.display())]
    DanglingLatest {
        /// The `latest` file.
        latest: PathBuf,
        /// The directory it names.
        target: PathBuf,
    },
    /// The `latest` file does not hold a checkpoint directory name.
    #[error("{}: expected a checkpoint directory name like step_00001234, found {content:?}", path.display())]
    InvalidLatest {
        /// The `latest` file.
        path: PathBuf,
        /// What it holds.
        content: String,
    },
    /// [`crate::load`] was given a path that is neither a checkpoint nor a run directory.
    #[error(
        "{}: neither a checkpoint directory (no MANIFEST.json) nor a run directory with checkpoints/latest",
        path.display()
    )]
    NotACheckpoint {
        /// The path given to `load`.
        path: PathBuf,
    },
    /// A tensor handed to [`crate::save`] has a byte length that does not match its shape and dtype.
    #[error(
        "{file}: tensor {name:?}: shape {shape:?} of {dtype:?} needs {expected_bytes} bytes, data has {found_bytes}"
    )]
    InvalidTensorData {
        /// `model.safetensors` or `optimizer.safetensors`.
        file: &'static str,
        /// The tensor's name.
        name: String,
        /// The tensor's dtype.
        dtype: Dtype,
        /// The tensor's shape.
        shape: Vec<usize>,
        /// `shape.product() * dtype.size_bytes()`.
        expected_bytes: usize,
        /// `data.len()`.
        found_bytes: usize,
    },
    /// [`crate::check_tensors`]: an expected tensor is in neither file.
    #[error("tensor {name:?}: missing from both model.safetensors and optimizer.safetensors")]
    MissingTensor {
        /// The expected tensor's name.
        name: String,
    },
    /// [`crate::check_tensors`]: a tensor has the wrong dtype or shape.
    #[error(
        "{file}: tensor {name:?}: expected {expected_dtype:?} {expected_shape:?}, found {found_dtype:?} {found_shape:?}"
    )]
    TensorMismatch {
        /// `model.safetensors` or `optimizer.safetensors`.
        file: &'static str,
        /// The tensor's name.
        name: String,
        /// The dtype the caller expects.
        expected_dtype: Dtype,
        /// The shape the caller expects.
        expected_shape: Vec<usize>,
        /// The dtype in the checkpoint.
        found_dtype: Dtype,
        /// The shape in the checkpoint.
        found_shape: Vec<usize>,
    },
    /// An extra file handed to [`crate::save`] is not a plain file name, or takes the name of
    /// a file the checkpoint writes itself.
    #[error("extra checkpoint file {name:?}: expected a plain file name other than the checkpoint's own files")]
    InvalidFileName {
        /// The name given.
        name: String,
    },
}

/// Shorthand for this crate's results.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// Attaches a path to an I/O error.
pub(crate) fn io_err(
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}
