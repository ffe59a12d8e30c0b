//! Token shards: the on-disk format, reading (verified, watched for changes) and writing.
//!
//! ## Shard format (`*.bin`, little-endian)
//! ```text
//! offset  size  field
//!      0     8  magic  b"SPTOKSH1"
//!      8     4  format version (u32) = 1
//!     12     4  bytes per token (u32): 2 (u16) or 4 (u32)
//!     16     8  token count (u64)
//!     24     4  vocabulary size of the tokenizer (u32); every token is below it
//!     28     4  CRC-32 (IEEE) of the token payload (u32)
//!     32    32  reserved, zero
//!     64     …  tokens
//! ```
//! A shard's length and checksum are verified when it is opened, so a truncated or corrupted
//! file is rejected with an error that names it.
//!
//! ## A shard changed under a running job
//! The run keeps each shard's file open and reads tokens with positioned reads (not a memory
//! map: a file truncated under a map kills the process with SIGBUS, a read returns an error).
//! After every batch the loader asks each shard it read from whether its file is still the
//! one verified at open ([`Shard::check_unchanged`]): same inode at the path, same size, same
//! modification and change times. Every write moves those times before its bytes can be read,
//! so a batch that read changed bytes is caught right after it was read, before it trains
//! (to the file system's timestamp granularity, a few milliseconds after the open). A change
//! that leaves the tokens as they were (`touch`, `chmod`, the same shard written again) is
//! re-verified in full and accepted; any other is an error naming the file: the run's data
//! order and its checkpoints' resumes mean the tokens it started on, never other ones.
use std::fs::{File, Metadata};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"SPTOKSH1";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("shard {file}: {source}")]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("shard {file}: {message}")]
    Corrupt { file: PathBuf, message: String },
    #[error("data {dir}: no *.bin shards found")]
    Empty { dir: PathBuf },
    #[error("data {}: no such directory; {}", dir.display(), made_by(dir))]
    Missing { dir: PathBuf },
    #[error(
        "shard {}: changed while the run reads it: {what}; a run trains on the tokens it started \
         with: put the original shard back and `--resume`, or train the new data in a new run \
         (without --resume)",
        file.display()
    )]
    Changed { file: PathBuf, what: String },
}

/// Which command makes the shard directory `dir`: `corpus build` for its own layout
/// (`ROOT/shards/{train,val}` and `ROOT/shards49k/{train,val}`), else `prepare`.
pub fn made_by(dir: &Path) -> String {
    let split = dir.file_name().and_then(|n| n.to_str());
    let parent = dir.parent();
    let kind = parent.and_then(|p| p.file_name()).and_then(|n| n.to_str());
    if let (Some("train" | "val"), Some(kind @ ("shards" | "shards49k"))) = (split, kind) {
        let root = parent.and_then(Path::parent).unwrap_or(Path::new("."));
        let what = if kind == "shards" {
            "GPT-2 shards"
        } else {
            "shards of the 49152-entry tokenizer it trains"
        };
        return format!(
            "`sparse-train corpus build --out {}` makes it ({what})",
            root.display()
        );
    }
    if dir.ends_with("data/shards/tiny/train") || dir.ends_with("data/shards/tiny/val") {
        return "`bash scripts/tiny-data.sh` makes it".to_string();
    }
    format!(
        "`sparse-train prepare --input FILE... --out {}` makes it",
        dir.display()
    )
}

/// The header fields of a verified shard: equal headers mean equal tokens (the CRC-32 of
/// the payload is one of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    bytes_per_token: usize,
    tokens: usize,
    vocab_size: u32,
    crc32: u32,
}

/// What identifies a file's contents without reading them: which file (device, inode),
/// its size, and its modification and change times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(meta: &Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    fn same_file(&self, other: &FileStamp) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// One open, verified shard.
pub struct Shard {
    pub path: PathBuf,
    file: File,
    header: Header,
    /// The file as it was when its checksum last verified.
    stamp: FileStamp,
    pub tokens: usize,
    pub vocab_size: u32,
}

/// Bytes read at a time while checksumming a shard (bounded memory, whatever its size).
const CHECKSUM_CHUNK: usize = 1 << 20;

/// Reads and verifies the shard open as `file` (header, length, checksum) and stamps it: the
/// stamp is taken before the checksum and must still hold after it, so the bytes verified
/// are the bytes of the stamped file.
fn verify(file: &File, path: &Path) -> Result<(Header, FileStamp), ShardError> {
    let io = |source| ShardError::Io {
        file: path.to_path_buf(),
        source,
    };
    let corrupt = |message: String| ShardError::Corrupt {
        file: path.to_path_buf(),
        message,
    };
    let stamp = FileStamp::of(&file.metadata().map_err(io)?);
    let len = stamp.len;
    if len < HEADER_BYTES as u64 {
        return Err(corrupt(format!(
            "{len} bytes, shorter than the 64-byte header"
        )));
    }
    let mut head = [0u8; HEADER_BYTES];
    file.read_exact_at(&mut head, 0).map_err(io)?;
    if &head[0..8] != MAGIC {
        return Err(corrupt("bad magic (not a sparse-train token shard)".into()));
    }
    let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap());
    let version = u32_at(8);
    if version != VERSION {
        return Err(corrupt(format!(
            "format version {version}, expected {VERSION}"
        )));
    }
    let bytes_per_token = u32_at(12) as usize;
    if bytes_per_token != 2 && bytes_per_token != 4 {
        return Err(corrupt(format!(
            "bytes per token {bytes_per_token}, expected 2 or 4"
        )));
    }
    let tokens = u64::from_le_bytes(head[16..24].try_into().unwrap()) as usize;
    let vocab_size = u32_at(24);
    // Checked: a count near 2^64 would wrap to a plausible size (found by fuzzing).
    let expected = tokens
        .checked_mul(bytes_per_token)
        .and_then(|b| b.checked_add(HEADER_BYTES));
    if expected.map(|b| b as u64) != Some(len) {
        return Err(corrupt(format!(
            "{len} bytes but the header announces {tokens} tokens of {bytes_per_token} bytes: truncated or corrupt"
        )));
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut chunk = vec![0u8; CHECKSUM_CHUNK];
    let mut offset = HEADER_BYTES as u64;
    while offset < len {
        let n = ((len - offset) as usize).min(CHECKSUM_CHUNK);
        file.read_exact_at(&mut chunk[..n], offset).map_err(io)?;
        hasher.update(&chunk[..n]);
        offset += n as u64;
    }
    if hasher.finalize() != u32_at(28) {
        return Err(corrupt(
            "checksum mismatch: the token payload is corrupt".into(),
        ));
    }
    let after = FileStamp::of(&file.metadata().map_err(io)?);
    if after != stamp {
        return Err(corrupt(
            "written to while its checksum was being verified".into(),
        ));
    }
    let header = Header {
        bytes_per_token,
        tokens,
        vocab_size,
        crc32: u32_at(28),
    };
    Ok((header, stamp))
}

impl Shard {
    pub fn open(path: &Path) -> Result<Shard, ShardError> {
        let file = File::open(path).map_err(|source| ShardError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        let (header, stamp) = verify(&file, path)?;
        Ok(Shard {
            path: path.to_path_buf(),
            file,
            header,
            stamp,
            tokens: header.tokens,
            vocab_size: header.vocab_size,
        })
    }

    /// CRC-32 of the token payload, as verified at open.
    pub fn crc32(&self) -> u32 {
        self.header.crc32
    }

    /// Appends tokens `first .. first + count` (within the shard) to `out`. A failed read
    /// reports the change to the file that caused it, when there is one.
    pub(super) fn read_tokens(
        &mut self,
        first: usize,
        count: usize,
        out: &mut Vec<i64>,
    ) -> Result<(), ShardError> {
        assert!(
            first + count <= self.tokens,
            "tokens {first}..{} of a {}-token shard",
            first + count,
            self.tokens
        );
        let width = self.header.bytes_per_token;
        let mut bytes = vec![0u8; count * width];
        let offset = (HEADER_BYTES + first * width) as u64;
        if let Err(source) = self.file.read_exact_at(&mut bytes, offset) {
            self.check_unchanged()?;
            return Err(ShardError::Io {
                file: self.path.clone(),
                source,
            });
        }
        if width == 2 {
            out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]) as i64),
            );
        } else {
            out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as i64),
            );
        }
        Ok(())
    }

    /// Token `i` (tests of the writers read shards back with it).
    #[cfg(test)]
    pub(super) fn token(&self, i: usize) -> u32 {
        let width = self.header.bytes_per_token;
        let mut b = [0u8; 4];
        let offset = (HEADER_BYTES + i * width) as u64;
        self.file.read_exact_at(&mut b[..width], offset).unwrap();
        u32::from_le_bytes(b)
    }

    /// Ok when the path still names the file opened, with the tokens verified at open (see
    /// the module docs); else [`ShardError::Changed`], saying what changed. A change that
    /// keeps the tokens is re-verified and accepted (then the shard reads the file now at
    /// the path).
    pub fn check_unchanged(&mut self) -> Result<(), ShardError> {
        let changed = |what: String| ShardError::Changed {
            file: self.path.clone(),
            what,
        };
        let at_path = match std::fs::metadata(&self.path) {
            Ok(meta) => FileStamp::of(&meta),
            Err(e) => return Err(changed(format!("removed or unreadable ({e})"))),
        };
        let open = FileStamp::of(&self.file.metadata().map_err(|source| ShardError::Io {
            file: self.path.clone(),
            source,
        })?);
        if at_path.same_file(&self.stamp) && open == self.stamp {
            return Ok(());
        }
        let (file, what) = if at_path.same_file(&self.stamp) {
            let same = self.file.try_clone().map_err(|source| ShardError::Io {
                file: self.path.clone(),
                source,
            })?;
            (same, "modified in place")
        } else {
            match File::open(&self.path) {
                Ok(other) => (other, "replaced by another file"),
                Err(e) => return Err(changed(format!("replaced, and unreadable ({e})"))),
            }
        };
        let (header, stamp) = match verify(&file, &self.path) {
            Ok(v) => v,
            Err(e) => return Err(changed(format!("{what}, which does not verify ({e})"))),
        };
        if header != self.header {
            let h = self.header;
            return Err(changed(format!(
                "{what}, now {} tokens with CRC-32 {:#010x} where the run opened {} tokens with CRC-32 {:#010x}",
                header.tokens, header.crc32, h.tokens, h.crc32
            )));
        }
        self.file = file;
        self.stamp = stamp;
        Ok(())
    }
}

/// Writes one shard atomically (temp file + rename).
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: u32) -> Result<(), ShardError> {
    let io = |source| ShardError::Io {
        file: path.to_path_buf(),
        source,
    };
    let bytes_per_token: u32 = if vocab_size <= 1 << 16 { 2 } else { 4 };
    let mut payload = Vec::with_capacity(tokens.len() * bytes_per_token as usize);
    for &t in tokens {
        if t >= vocab_size {
            return Err(ShardError::Corrupt {
                file: path.to_path_buf(),
                message: format!("token {t} is not below the vocabulary size {vocab_size}"),
            });
        }
        if bytes_per_token == 2 {
            payload.extend_from_slice(&(t as u16).to_le_bytes());
        } else {
            payload.extend_from_slice(&t.to_le_bytes());
        }
    }
    let mut header = [0u8; HEADER_BYTES];
    header[0..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&bytes_per_token.to_le_bytes());
    header[16..24].copy_from_slice(&(tokens.len() as u64).to_le_bytes());
    header[24..28].copy_from_slice(&vocab_size.to_le_bytes());
    header[28..32].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let tmp = path.with_extension("bin.tmp");
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(&header).map_err(io)?;
    f.write_all(&payload).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// The shards of a directory (or a single shard file), in name order.
pub fn open_shards(path: &Path) -> Result<Vec<Shard>, ShardError> {
    if path.is_file() {
        return Ok(vec![Shard::open(path)?]);
    }
    if !path.exists() {
        return Err(ShardError::Missing {
            dir: path.to_path_buf(),
        });
    }
    let rd = std::fs::read_dir(path).map_err(|source| ShardError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ShardError::Empty {
            dir: path.to_path_buf(),
        });
    }
    files.iter().map(|f| Shard::open(f)).collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A directory holding one shard of `tokens` (GPT-2 vocabulary).
    pub(in crate::data) fn shard_dir(tokens: &[u32]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        write_shard(&d.path().join("shard_00000.bin"), tokens, 50257).unwrap();
        d
    }

    #[test]
    fn shard_round_trip() {
        let toks: Vec<u32> = (0..1000).map(|i| (i * 37) % 50257).collect();
        let d = shard_dir(&toks);
        let mut s = Shard::open(&d.path().join("shard_00000.bin")).unwrap();
        assert_eq!(s.tokens, 1000);
        assert_eq!(s.vocab_size, 50257);
        let mut read = Vec::new();
        s.read_tokens(0, 600, &mut read).unwrap();
        s.read_tokens(600, 400, &mut read).unwrap();
        assert_eq!(read, toks.iter().map(|&t| t as i64).collect::<Vec<_>>());
    }

    #[test]
    fn truncated_and_corrupt_shards_are_rejected_by_name() {
        let d = shard_dir(&(0..1000).collect::<Vec<u32>>());
        let p = d.path().join("shard_00000.bin");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let e = Shard::open(&p).err().unwrap().to_string();
        assert!(
            e.contains("shard_00000.bin") && e.contains("truncated"),
            "{e}"
        );
        let mut flipped = bytes.clone();
        flipped[HEADER_BYTES + 7] ^= 0x40;
        std::fs::write(&p, &flipped).unwrap();
        let e = Shard::open(&p).err().unwrap().to_string();
        assert!(
            e.contains("shard_00000.bin") && e.contains("checksum"),
            "{e}"
        );
        let mut magic = bytes;
        magic[0] = b'X';
        std::fs::write(&p, &magic).unwrap();
        assert!(Shard::open(&p).err().unwrap().to_string().contains("magic"));
    }

    /// A count whose byte size wraps around 2^64 to the file's real size is refused (the
    /// unchecked product accepted it, and reads then ran past the map).
    #[test]
    fn a_token_count_that_wraps_is_refused() {
        let d = shard_dir(&(0..1000).collect::<Vec<u32>>());
        let p = d.path().join("shard_00000.bin");
        let mut bytes = std::fs::read(&p).unwrap();
        // 2 bytes a token: (2^63 + 1000) * 2 wraps to 2000, the payload's length.
        bytes[16..24].copy_from_slice(&((1u64 << 63) + 1000).to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let e = Shard::open(&p).err().unwrap().to_string();
        assert!(
            e.contains("shard_00000.bin") && e.contains("announces"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_directory_names_the_command_that_makes_it() {
        let e = |p: &str| open_shards(Path::new(p)).err().unwrap().to_string();
        assert!(
            e("/nowhere/data/corpus/shards49k/train")
                .contains("`sparse-train corpus build --out /nowhere/data/corpus`"),
            "{}",
            e("/nowhere/data/corpus/shards49k/train")
        );
        assert!(e("/nowhere/data/corpus/shards/val")
            .contains("corpus build --out /nowhere/data/corpus"));
        assert!(e("/nowhere/mine")
            .contains("`sparse-train prepare --input FILE... --out /nowhere/mine`"));
    }

    /// The tokens of `shard_00000.bin` in `dir` rewritten as `tokens` (a valid shard), in
    /// place: the same file, truncated and written again.
    fn overwrite_in_place(path: &Path, tokens: &[u32]) {
        let other = tempfile::tempdir().unwrap();
        let fresh = other.path().join("s.bin");
        write_shard(&fresh, tokens, 50257).unwrap();
        let bytes = std::fs::read(&fresh).unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all(&bytes).unwrap();
        f.set_len(bytes.len() as u64).unwrap();
    }

    /// A shard rewritten in place with other tokens of the same size (the same inode) is
    /// named as changed, and so is one truncated; reading it fails the same way.
    #[test]
    fn a_shard_modified_in_place_is_named_as_changed() {
        let toks: Vec<u32> = (0..1000).collect();
        let d = shard_dir(&toks);
        let p = d.path().join("shard_00000.bin");
        let mut s = Shard::open(&p).unwrap();
        s.check_unchanged().unwrap();
        let other: Vec<u32> = (0..1000).rev().collect();
        overwrite_in_place(&p, &other);
        let e = s.check_unchanged().unwrap_err().to_string();
        assert!(
            e.contains("shard_00000.bin") && e.contains("modified in place"),
            "{e}"
        );
        assert!(e.contains("put the original shard back"), "{e}");
        // Truncated to half: the read past the end names the change, not a bare EOF.
        let mut s = Shard::open(&p).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(64 + 1000)
            .unwrap();
        let e = s
            .read_tokens(900, 100, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("modified in place") && e.contains("truncated"),
            "{e}"
        );
    }

    /// A path renamed over with another valid shard is named (with both checksums); one
    /// renamed over with the same tokens, or only touched and chmod-ed, is accepted.
    #[test]
    fn a_replaced_shard_is_named_unless_its_tokens_are_the_same() {
        use std::os::unix::fs::PermissionsExt;
        let toks: Vec<u32> = (0..1000).collect();
        let d = shard_dir(&toks);
        let p = d.path().join("shard_00000.bin");
        let mut s = Shard::open(&p).unwrap();
        let crc = s.crc32();
        // The same tokens written again (temp file + rename: a new inode), then touched.
        write_shard(&p, &toks, 50257).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let f = File::options().write(true).open(&p).unwrap();
        f.set_modified(std::time::SystemTime::now()).unwrap();
        s.check_unchanged().unwrap();
        let mut read = Vec::new();
        s.read_tokens(0, 3, &mut read).unwrap();
        assert_eq!(read, [0, 1, 2]);
        // Other tokens, same size.
        write_shard(&p, &(1..1001).collect::<Vec<u32>>(), 50257).unwrap();
        let e = s.check_unchanged().unwrap_err().to_string();
        assert!(
            e.contains("replaced by another file") && e.contains(&format!("{crc:#010x}")),
            "{e}"
        );
        std::fs::remove_file(&p).unwrap();
        let e = s.check_unchanged().unwrap_err().to_string();
        assert!(e.contains("removed"), "{e}");
    }

    #[test]
    fn token_out_of_vocabulary_is_refused_at_write() {
        let d = tempfile::tempdir().unwrap();
        assert!(write_shard(&d.path().join("s.bin"), &[5, 70000], 50257).is_err());
    }
}
