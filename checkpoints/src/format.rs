//! The files inside one checkpoint directory: how each is written (with its size and CRC-32
//! recorded as it streams out) and read back.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{io_err, CheckpointError, Result};
use crate::tensor::{Dtype, RawTensor};
use crate::FORMAT_VERSION;

/// Size and CRC-32 of one file, as recorded in `MANIFEST.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileEntry {
    pub bytes: u64,
    pub crc32: u32,
}

/// `MANIFEST.json`: written last into a checkpoint; lists every other file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    pub format_version: u64,
    pub step: u64,
    pub files: BTreeMap<String, FileEntry>,
}

/// `trainer_state.json`: the trainer's own state wrapped with the format version and step.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrainerStateFile {
    pub format_version: u64,
    pub step: u64,
    pub trainer_state: serde_json::Value,
}

/// A writer that counts bytes and computes their CRC-32 on the way through.
struct HashingWriter<W> {
    inner: W,
    hasher: crc32fast::Hasher,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Creates `path` (which must not exist), streams `contents` into it, fsyncs it, and returns
/// its size and CRC-32.
pub(crate) fn write_file(
    path: &Path,
    contents: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<FileEntry> {
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path))?;
    let mut writer = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: crc32fast::Hasher::new(),
        bytes: 0,
    };
    contents(&mut writer).map_err(io_err(path))?;
    let file = writer
        .inner
        .into_inner()
        .map_err(|e| io_err(path)(e.into_error()))?;
    file.sync_all().map_err(io_err(path))?;
    Ok(FileEntry {
        bytes: writer.bytes,
        crc32: writer.hasher.finalize(),
    })
}

/// Writes `value` as pretty JSON to a new file at `path` (see [`write_file`]).
pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> Result<FileEntry> {
    write_file(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value)?;
        w.write_all(b"\n")
    })
}

/// Checks a tensor map before anything is written: each tensor's bytes match its shape.
pub(crate) fn validate_tensors(
    file: &'static str,
    tensors: &BTreeMap<String, RawTensor>,
) -> Result<()> {
    for (name, t) in tensors {
        if t.data.len() != t.expected_bytes() {
            return Err(CheckpointError::InvalidTensorData {
                file,
                name: name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                expected_bytes: t.expected_bytes(),
                found_bytes: t.data.len(),
            });
        }
    }
    Ok(())
}

/// One tensor's entry in a safetensors header.
#[derive(Serialize)]
struct HeaderEntry<'a> {
    dtype: safetensors::Dtype,
    shape: &'a [usize],
    data_offsets: [usize; 2],
}

/// Writes `tensors` in the safetensors format to a new file at `path`, streaming the bytes
/// (no second in-memory copy). Tensors are laid out widest dtype first, then by name, as the
/// `safetensors` crate does, so every tensor starts at an offset aligned to its element size.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, RawTensor>,
) -> Result<FileEntry> {
    let mut order: Vec<(&String, &RawTensor)> = tensors.iter().collect();
    order.sort_by(|(a_name, a), (b_name, b)| {
        b.dtype
            .size_bytes()
            .cmp(&a.dtype.size_bytes())
            .then(a_name.cmp(b_name))
    });
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".to_string(),
        serde_json::json!({ "format": "pt" }),
    );
    let mut offset = 0;
    for (name, t) in &order {
        let entry = HeaderEntry {
            dtype: t.dtype.to_safetensors(),
            shape: &t.shape,
            data_offsets: [offset, offset + t.data.len()],
        };
        offset += t.data.len();
        let entry = serde_json::to_value(entry).map_err(|source| CheckpointError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        header.insert((*name).clone(), entry);
    }
    let mut header = serde_json::to_vec(&header).map_err(|source| CheckpointError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    header.resize(header.len().next_multiple_of(8), b' ');
    write_file(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (_, t) in &order {
            w.write_all(&t.data)?;
        }
        Ok(())
    })
}

/// Checks `path` against its manifest entry (size first, then CRC-32) and maps it into memory.
pub(crate) fn read_verified(path: &Path, entry: FileEntry) -> Result<memmap2::Mmap> {
    let file = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CheckpointError::MissingFile {
            path: path.to_path_buf(),
        },
        _ => CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let found_bytes = file.metadata().map_err(io_err(path))?.len();
    if found_bytes != entry.bytes {
        return Err(CheckpointError::SizeMismatch {
            path: path.to_path_buf(),
            expected_bytes: entry.bytes,
            found_bytes,
        });
    }
    // SAFETY: a checkpoint directory is never modified after it is renamed into place; the map
    // is only invalid if another program truncates the file while we read it.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
    let found = crc32fast::hash(&map);
    if found != entry.crc32 {
        return Err(CheckpointError::ChecksumMismatch {
            path: path.to_path_buf(),
            expected: entry.crc32,
            found,
        });
    }
    Ok(map)
}

/// Parses the bytes of a JSON file carrying `format_version`: the version is checked first,
/// so a newer layout reports its version rather than an unknown field.
pub(crate) fn parse_versioned<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T> {
    let json_err = |source| CheckpointError::Json {
        path: path.to_path_buf(),
        source,
    };
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(json_err)?;
    if let Some(found) = value.get("format_version").and_then(|v| v.as_u64()) {
        if found != FORMAT_VERSION {
            return Err(CheckpointError::UnsupportedFormatVersion {
                path: path.to_path_buf(),
                found,
                supported: FORMAT_VERSION,
            });
        }
    }
    serde_json::from_value(value).map_err(json_err)
}

/// Parses a safetensors file's bytes into owned tensors.
pub(crate) fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, RawTensor>> {
    let parsed = safetensors::SafeTensors::deserialize(bytes).map_err(|source| {
        CheckpointError::Safetensors {
            path: path.to_path_buf(),
            source,
        }
    })?;
    parsed
        .iter()
        .map(|(name, view)| {
            let dtype = Dtype::from_safetensors(view.dtype()).ok_or_else(|| {
                CheckpointError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    dtype: format!("{:?}", view.dtype()),
                }
            })?;
            let tensor = RawTensor {
                dtype,
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
            };
            Ok((name.to_string(), tensor))
        })
        .collect()
}
