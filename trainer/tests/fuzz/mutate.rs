//! A seeded mutation engine over valid seed files: each input is a seed file with a few
//! random edits (bit flips, interesting bytes and integers written at random offsets,
//! truncation, deleted, duplicated or inserted ranges, splices of another part of the seed).
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Values that make readers take their edge branches when written as integers.
const INTERESTING: [u64; 10] = [
    0,
    1,
    7,
    8,
    0x7f,
    0xff,
    0xffff_ffff,
    1 << 31,
    1 << 60,
    u64::MAX,
];

pub struct Mutator {
    rng: ChaCha8Rng,
}

impl Mutator {
    pub fn new(seed: u64) -> Mutator {
        Mutator {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n.max(1))
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    /// `seed` with 1 to 4 random edits.
    pub fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            self.edit(&mut v);
        }
        v
    }

    fn edit(&mut self, v: &mut Vec<u8>) {
        let len = v.len();
        match self.below(8) {
            0 if len > 0 => {
                let i = self.below(len);
                v[i] ^= 1 << self.below(8);
            }
            1 if len > 0 => {
                let i = self.below(len);
                v[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'-', b'9'][self.below(8)];
            }
            2 if len >= 8 => {
                let i = self.below(len - 7);
                let x = INTERESTING[self.below(INTERESTING.len())];
                let bytes = x.to_le_bytes();
                let w = [1, 2, 4, 8][self.below(4)];
                v[i..i + w].copy_from_slice(&bytes[..w]);
            }
            3 => v.truncate(self.below(len + 1)),
            4 if len > 0 => {
                let a = self.below(len);
                let b = (a + 1 + self.below(64)).min(len);
                v.drain(a..b);
            }
            5 if len > 0 => {
                let a = self.below(len);
                let b = (a + 1 + self.below(64)).min(len);
                let chunk = v[a..b].to_vec();
                let at = self.below(len);
                v.splice(at..at, chunk);
            }
            6 => {
                let at = self.below(len + 1);
                let n = 1 + self.below(16);
                let junk: Vec<u8> = (0..n).map(|_| self.rng.random()).collect();
                v.splice(at..at, junk);
            }
            _ if len > 0 => {
                // A splice: one range overwritten with another range of the same input.
                let n = 1 + self.below(32.min(len));
                let from = self.below(len - n + 1);
                let to = self.below(len - n + 1);
                let chunk = v[from..from + n].to_vec();
                v[to..to + n].copy_from_slice(&chunk);
            }
            _ => v.push(self.rng.random()),
        }
    }
}

/// How many inputs each `fuzz_*` test runs: `SPARSE_TRAIN_FUZZ_INPUTS`, default 10,000 (the
/// CI smoke); a longer run sets it higher.
pub fn inputs() -> usize {
    std::env::var("SPARSE_TRAIN_FUZZ_INPUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
}

/// Runs `read` on every input inside `catch_unwind`: a panic fails the test with the input
/// (its index and first bytes) that caused it. Returns how many inputs were accepted (Ok).
pub fn run(
    name: &str,
    mut next: impl FnMut(usize) -> Vec<u8>,
    read: impl Fn(&[u8]) -> bool,
) -> usize {
    let n = inputs();
    let mut accepted = 0;
    for i in 0..n {
        let input = next(i);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(&input)));
        match r {
            Ok(ok) => accepted += usize::from(ok),
            Err(p) => {
                let msg = sparse_kernels::torch::panic_message(p);
                let head: Vec<u8> = input.iter().take(96).copied().collect();
                panic!(
                    "{name}: input {i} ({} bytes) panicked: {msg}\nfirst bytes: {:?}",
                    input.len(),
                    String::from_utf8_lossy(&head)
                );
            }
        }
    }
    println!("{name}: {n} inputs, {accepted} accepted, the rest refused with an error");
    accepted
}
