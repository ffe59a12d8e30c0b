//! The deterministic, resumable data loader over token shards ([`super::shards`]).
//!
//! The shards of a directory (sorted by name) form one token stream. It is cut into
//! windows of `seq_len + 1` tokens at stride `seq_len` (inputs and next-token labels).
//! Sequence `i` of the run is window `perm_e[i mod W]` of epoch `e = i div W`, where `perm_e`
//! is a permutation seeded by (seed, e). The cursor is the number of sequences consumed, so
//! resuming, or re-splitting over another number of ranks, continues the same stream.
use super::shards::{open_shards, Shard, ShardError};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::Path;
use tch::Tensor;

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
    /// Fails, naming the file, when a shard it read from changed since the run opened it
    /// (checked after the reads, so changed tokens never reach a batch that is returned).
    pub fn sequences(&mut self, first: u64, count: usize) -> Result<Tensor, ShardError> {
        let len = self.seq_len + 1;
        let mut out: Vec<i64> = Vec::with_capacity(count * len);
        let mut touched = Vec::new();
        for k in 0..count as u64 {
            if let TokenSource::Synthetic { vocab_size } = &self.source {
                use rand::Rng;
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                    self.seed ^ (first + k).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                out.extend((0..len).map(|_| rng.random_range(0..*vocab_size as i64)));
                continue;
            }
            let start = self.window_start(first + k);
            let TokenSource::Shards { shards, starts, .. } = &mut self.source else {
                unreachable!()
            };
            touched.resize(shards.len(), false);
            let mut s = starts.partition_point(|&x| x <= start) - 1;
            let mut pos = start - starts[s];
            let mut left = len;
            while left > 0 {
                while pos >= shards[s].tokens {
                    s += 1;
                    pos = 0;
                }
                let n = left.min(shards[s].tokens - pos);
                shards[s].read_tokens(pos, n, &mut out)?;
                touched[s] = true;
                pos += n;
                left -= n;
            }
        }
        if let TokenSource::Shards { shards, .. } = &mut self.source {
            for (shard, _) in shards.iter_mut().zip(&touched).filter(|(_, &t)| t) {
                shard.check_unchanged()?;
            }
        }
        Ok(Tensor::from_slice(&out).view([count as i64, len as i64]))
    }
}

#[cfg(test)]
mod tests {
    use super::super::shards::tests::shard_dir;
    use super::super::shards::write_shard;
    use super::*;

    #[test]
    fn loader_is_deterministic_and_covers_an_epoch_exactly_once() {
        let toks: Vec<u32> = (0..1001).collect();
        let d = shard_dir(&toks);
        let mut a = DataLoader::from_shards(d.path(), 10, 7).unwrap();
        let mut b = DataLoader::from_shards(d.path(), 10, 7).unwrap();
        assert_eq!(a.windows_per_epoch(), 100);
        let x = a.sequences(0, 100).unwrap();
        assert!(x.equal(&b.sequences(0, 100).unwrap()));
        // Each window starts at a distinct multiple of 10, labels follow inputs.
        let mut firsts: Vec<i64> = (0..100).map(|i| x.int64_value(&[i, 0])).collect();
        firsts.sort();
        assert_eq!(firsts, (0..100).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(x.int64_value(&[3, 10]), x.int64_value(&[3, 0]) + 10);
        // Reading from the middle gives the same sequences (resume, other ranks).
        assert!(x.narrow(0, 40, 20).equal(&b.sequences(40, 20).unwrap()));
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
        let all = l.sequences(0, 3).unwrap();
        for i in 0..3 {
            let s = all.int64_value(&[i, 0]);
            for j in 0..11 {
                assert_eq!(all.int64_value(&[i, j]), s + j);
            }
        }
    }

    /// A shard replaced after the loader opened it fails the next batch, naming the file.
    #[test]
    fn a_shard_replaced_under_the_loader_fails_the_next_batch_by_name() {
        let d = shard_dir(&(0..1001).collect::<Vec<u32>>());
        let mut l = DataLoader::from_shards(d.path(), 10, 3).unwrap();
        let _batch = l.sequences(0, 4).unwrap();
        let p = d.path().join("shard_00000.bin");
        write_shard(&p, &(1..1002).collect::<Vec<u32>>(), 50257).unwrap();
        let e = l.sequences(4, 4).unwrap_err().to_string();
        assert!(
            e.contains("shard_00000.bin") && e.contains("changed while the run reads it"),
            "{e}"
        );
    }
}
