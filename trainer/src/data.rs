//! Token shards and the deterministic, resumable data loader.
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
//!
//! ## Loader
//! The shards of a directory (sorted by name) form one token stream. It is cut into
//! windows of `seq_len + 1` tokens at stride `seq_len` (inputs and next-token labels).
//! Sequence `i` of the run is window `perm_e[i mod W]` of epoch `e = i div W`, where `perm_e`
//! is a permutation seeded by (seed, e). The cursor is the number of sequences consumed, so
//! resuming, or re-splitting over another number of ranks, continues the same stream.
use memmap2::Mmap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Tensor;

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
        let expected = HEADER_BYTES + tokens * bytes_per_token;
        if map.len() != expected {
            return Err(corrupt(format!(
                "{} bytes but the header announces {tokens} tokens ({expected} bytes): truncated or corrupt",
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

    fn token(&self, i: usize) -> u32 {
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

/// Where a batch's sequences come from.
pub enum TokenSource {
    Shards {
        shards: Vec<Shard>,
        starts: Vec<usize>,
        total: usize,
    },
    /// Uniform random tokens (throughput benchmarks).
    Synthetic { vocab_size: usize },
}

/// Deterministic sequence sampler over a token source (see the module docs).
pub struct DataLoader {
    source: TokenSource,
    seq_len: usize,
    seed: u64,
    windows: usize,
    perm_epoch: Option<u64>,
    perm: Vec<u32>,
}

impl DataLoader {
    pub fn new(source: TokenSource, seq_len: usize, seed: u64) -> Result<Self, ShardError> {
        let windows = match &source {
            TokenSource::Shards { total, shards, .. } => {
                let w = total.saturating_sub(1) / seq_len;
                if w == 0 {
                    return Err(ShardError::Corrupt {
                        file: shards[0].path.clone(),
                        message: format!(
                            "{total} tokens in all: fewer than one sequence of {} tokens",
                            seq_len + 1
                        ),
                    });
                }
                w
            }
            TokenSource::Synthetic { .. } => usize::MAX,
        };
        Ok(DataLoader {
            source,
            seq_len,
            seed,
            windows,
            perm_epoch: None,
            perm: Vec::new(),
        })
    }

    pub fn from_shards(path: &Path, seq_len: usize, seed: u64) -> Result<Self, ShardError> {
        let shards = open_shards(path)?;
        let mut starts = Vec::with_capacity(shards.len());
        let mut total = 0;
        for s in &shards {
            starts.push(total);
            total += s.tokens;
        }
        DataLoader::new(
            TokenSource::Shards {
                shards,
                starts,
                total,
            },
            seq_len,
            seed,
        )
    }

    /// Largest token id + 1 the source may produce (the shards' tokenizer vocabulary).
    pub fn vocab_size(&self) -> usize {
        match &self.source {
            TokenSource::Shards { shards, .. } => shards
                .iter()
                .map(|s| s.vocab_size as usize)
                .max()
                .unwrap_or(0),
            TokenSource::Synthetic { vocab_size } => *vocab_size,
        }
    }

    /// Number of distinct sequences per epoch.
    pub fn windows_per_epoch(&self) -> usize {
        self.windows
    }

    fn window_start(&mut self, index: u64) -> usize {
        let w = self.windows as u64;
        let epoch = index / w;
        if self.perm_epoch != Some(epoch) {
            let mut perm: Vec<u32> = (0..self.windows as u32).collect();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            perm.shuffle(&mut rng);
            self.perm = perm;
            self.perm_epoch = Some(epoch);
        }
        self.perm[(index % w) as usize] as usize * self.seq_len
    }

    /// Sequences `first .. first + count` of the stream as `[count, seq_len + 1]` int64.
    pub fn sequences(&mut self, first: u64, count: usize) -> Tensor {
        let len = self.seq_len + 1;
        let mut out: Vec<i64> = Vec::with_capacity(count * len);
        for k in 0..count as u64 {
            match &self.source {
                TokenSource::Synthetic { vocab_size } => {
                    use rand::Rng;
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                        self.seed ^ (first + k).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    );
                    out.extend((0..len).map(|_| rng.random_range(0..*vocab_size as i64)));
                }
                TokenSource::Shards { .. } => {
                    let start = self.window_start(first + k);
                    let TokenSource::Shards { shards, starts, .. } = &self.source else {
                        unreachable!()
                    };
                    let mut s = starts.partition_point(|&x| x <= start) - 1;
                    let mut pos = start - starts[s];
                    for _ in 0..len {
                        while pos >= shards[s].tokens {
                            s += 1;
                            pos = 0;
                        }
                        out.push(shards[s].token(pos) as i64);
                        pos += 1;
                    }
                }
            }
        }
        Tensor::from_slice(&out).view([count as i64, len as i64])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard_dir(tokens: &[u32]) -> tempfile::TempDir {
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

    #[test]
    fn token_out_of_vocabulary_is_refused_at_write() {
        let d = tempfile::tempdir().unwrap();
        assert!(write_shard(&d.path().join("s.bin"), &[5, 70000], 50257).is_err());
    }

    #[test]
    fn loader_is_deterministic_and_covers_an_epoch_exactly_once() {
        let toks: Vec<u32> = (0..1001).collect();
        let d = shard_dir(&toks);
        let mut a = DataLoader::from_shards(d.path(), 10, 7).unwrap();
        let mut b = DataLoader::from_shards(d.path(), 10, 7).unwrap();
        assert_eq!(a.windows_per_epoch(), 100);
        let x = a.sequences(0, 100);
        assert!(x.equal(&b.sequences(0, 100)));
        // Each window starts at a distinct multiple of 10, labels follow inputs.
        let mut firsts: Vec<i64> = (0..100).map(|i| x.int64_value(&[i, 0])).collect();
        firsts.sort();
        assert_eq!(firsts, (0..100).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(x.int64_value(&[3, 10]), x.int64_value(&[3, 0]) + 10);
        // Reading from the middle gives the same sequences (resume, other ranks).
        assert!(x.narrow(0, 40, 20).equal(&b.sequences(40, 20)));
    }

    #[test]
    fn sequences_span_shard_boundaries() {
        let d = tempfile::tempdir().unwrap();
        write_shard(
            &d.path().join("shard_00000.bin"),
            &(0..15).collect::<Vec<u32>>(),
            100,
        )
        .unwrap();
        write_shard(
            &d.path().join("shard_00001.bin"),
            &(15..31).collect::<Vec<u32>>(),
            100,
        )
        .unwrap();
        let mut l = DataLoader::from_shards(d.path(), 10, 0).unwrap();
        let all = l.sequences(0, 3);
        for i in 0..3 {
            let s = all.int64_value(&[i, 0]);
            for j in 0..11 {
                assert_eq!(all.int64_value(&[i, j]), s + j);
            }
        }
    }
}
