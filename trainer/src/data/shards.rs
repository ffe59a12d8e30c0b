//! Token shards: the on-disk format, reading (memory-mapped, verified) and writing.
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
//! A shard is read memory-mapped; its length and checksum are verified when opened, so a
//! truncated or corrupted file is rejected with an error that names it.
use memmap2::Mmap;
use std::fs::File;
use std::io::Write;
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

/// One memory-mapped, verified shard.
pub struct Shard {
    pub path: PathBuf,
    map: Mmap,
    bytes_per_token: usize,
    pub tokens: usize,
    pub vocab_size: u32,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Shard, ShardError> {
        let io = |source| ShardError::Io {
            file: path.to_path_buf(),
            source,
        };
        let corrupt = |message: String| ShardError::Corrupt {
            file: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: shards are written once and never modified while training reads them.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        if map.len() < HEADER_BYTES {
            return Err(corrupt(format!(
                "{} bytes, shorter than the 64-byte header",
                map.len()
            )));
        }
        if &map[0..8] != MAGIC {
            return Err(corrupt("bad magic (not a sparse-train token shard)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap());
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
        let tokens = u64::from_le_bytes(map[16..24].try_into().unwrap()) as usize;
        let vocab_size = u32_at(24);
        // Checked: a count near 2^64 would wrap to a plausible size (found by fuzzing).
        let expected = tokens
            .checked_mul(bytes_per_token)
            .and_then(|b| b.checked_add(HEADER_BYTES));
        if expected != Some(map.len()) {
            return Err(corrupt(format!(
                "{} bytes but the header announces {tokens} tokens of {bytes_per_token} bytes: truncated or corrupt",
                map.len()
            )));
        }
        let crc = crc32fast::hash(&map[HEADER_BYTES..]);
        if crc != u32_at(28) {
            return Err(corrupt(
                "checksum mismatch: the token payload is corrupt".into(),
            ));
        }
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            bytes_per_token,
            tokens,
            vocab_size,
        })
    }

    pub(super) fn token(&self, i: usize) -> u32 {
        let o = HEADER_BYTES + i * self.bytes_per_token;
        if self.bytes_per_token == 2 {
            u16::from_le_bytes([self.map[o], self.map[o + 1]]) as u32
        } else {
            u32::from_le_bytes(self.map[o..o + 4].try_into().unwrap())
        }
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
        let s = Shard::open(&d.path().join("shard_00000.bin")).unwrap();
        assert_eq!(s.tokens, 1000);
        assert_eq!(s.vocab_size, 50257);
        assert!((0..1000).all(|i| s.token(i) == toks[i]));
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

    #[test]
    fn token_out_of_vocabulary_is_refused_at_write() {
        let d = tempfile::tempdir().unwrap();
        assert!(write_shard(&d.path().join("s.bin"), &[5, 70000], 50257).is_err());
    }
}
