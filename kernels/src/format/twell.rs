//! TwELL ("tile-wise ELL"): the inference layout of the gate activations.
//!
//! A `[rows, cols]` matrix is cut, per row, into column tiles of width `T` (default 256).
//! Each tile owns `T / C` 32-bit words (`C` = compression factor, default 8, so 32 words):
//! word 0 holds the tile's count of non-zeros, words `1..=T/C - 1` hold the entries in
//! increasing column order, each `value bf16 bits << 16 | global column index`. A tile thus
//! stores at most `T/C - 1` entries (31 for the defaults). The last tile of a row is partial
//! when `cols` is not a multiple of `T`. Column indices are 16-bit, so `cols <= 65536`.
//!
//! Unlike a plain TwELL buffer, nothing is ever lost: a row with any tile over capacity is an
//! *overflow row*, stored whole (dense, bf16) in the overflow part, with a row -> slot map and
//! the reverse slot -> row map. Its tile counts keep the true values and its tiles keep the
//! first `T/C - 1` entries each; readers take overflow rows from the overflow part.
//!
//! Values are stored as bf16: packing bf16 is bit-exact, packing f32 rounds each value to
//! nearest bf16 (entries that round to zero are still stored).
//!
//! Worked example, `T = 4`, `C = 2` (2 words per tile, capacity 1), `cols = 6`
//! (tiles `[0, 4)` and `[4, 6)`):
//!
//! ```text
//! dense row 0: [0, 2, 0, 0 | 0, 0]   tiles: [1, (2.0, col 1)] [0, -]
//! dense row 1: [0, 0, 0, 0 | 0, 5]   tiles: [0, -]            [1, (5.0, col 5)]
//! dense row 2: [1, 0, 3, 0 | 0, 0]   tiles: [2, (1.0, col 0)] [0, -]  -> overflow slot 0
//! overflow part: slot 0 = row 2 = [1, 0, 3, 0, 0, 0]
//! ```
use half::bf16;
use thiserror::Error;

use super::reference::{
    check_dense_len, dense_slot, for_each_nonzero, mean_per_row, DenseLengthError, Element,
    SparseRows,
};

/// Column indices are 16-bit: at most this many columns.
pub const MAX_COLS: usize = 1 << 16;
/// Row -> overflow slot map value of a row that is not an overflow row.
pub const NOT_OVERFLOW: u32 = u32::MAX;

/// Tile width and compression factor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TwellConfig {
    /// `T`: columns per tile.
    pub tile: usize,
    /// `C`: a tile owns `T / C` words.
    pub compression: usize,
}

impl Default for TwellConfig {
    fn default() -> Self {
        TwellConfig {
            tile: 256,
            compression: 8,
        }
    }
}

impl TwellConfig {
    /// Words per tile, `T / C` (count word included).
    pub fn words_per_tile(&self) -> usize {
        self.tile / self.compression
    }

    /// Entries a tile can hold, `T / C - 1`.
    pub fn capacity(&self) -> usize {
        self.words_per_tile() - 1
    }

    /// `T` must be a positive multiple of `C`, with at least two words per tile.
    pub fn validate(&self) -> Result<(), TwellError> {
        let ok = self.compression > 0
            && self.tile.is_multiple_of(self.compression)
            && self.tile / self.compression >= 2;
        if ok {
            Ok(())
        } else {
            Err(TwellError::Tile {
                tile: self.tile,
                compression: self.compression,
            })
        }
    }
}

/// Errors of TwELL packing.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TwellError {
    #[error(
        "TwELL tile = {tile} must be a multiple of compression = {compression} with at least 2 \
         words per tile"
    )]
    Tile { tile: usize, compression: usize },
    #[error("TwELL column indices are 16-bit: cols = {cols} exceeds {MAX_COLS}")]
    TooManyCols { cols: usize },
    #[error("TwELL overflow slots are 32-bit: rows = {rows} exceeds {max}", max = u32::MAX)]
    TooManyRows { rows: usize },
    #[error(transparent)]
    Length(#[from] DenseLengthError),
}

/// Packing statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TwellStats {
    pub rows: usize,
    /// Non-zeros of the whole matrix (overflow rows included).
    pub nnz: usize,
    pub nnz_per_row_mean: f64,
    pub nnz_per_row_max: usize,
    /// Largest tile count (may exceed the tile capacity).
    pub tile_count_max: usize,
    /// Rows stored in the overflow part.
    pub overflow_rows: usize,
}

/// A TwELL-packed `[rows, cols]` matrix plus its overflow part. See the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct TwellMatrix {
    rows: usize,
    cols: usize,
    config: TwellConfig,
    /// `[rows, tiles * T/C]`
    words: Vec<u32>,
    /// `[rows]`: overflow slot or [`NOT_OVERFLOW`].
    overflow_slot: Vec<u32>,
    /// `[overflow rows]`: the row stored in each slot.
    overflow_row: Vec<u32>,
    /// `[overflow rows, cols]`, bf16.
    overflow: Vec<bf16>,
    nnz: usize,
    nnz_per_row_max: usize,
    tile_count_max: usize,
}

fn entry_word(value: bf16, col: usize) -> u32 {
    (u32::from(value.to_bits()) << 16) | col as u32
}

fn entry_col(word: u32) -> usize {
    (word & 0xffff) as usize
}

fn entry_value(word: u32) -> bf16 {
    bf16::from_bits((word >> 16) as u16)
}

impl TwellMatrix {
    /// Packs a dense row-major `[rows, cols]` matrix; every non-zero is kept.
    pub fn pack<E: Element>(
        dense: &[E],
        rows: usize,
        cols: usize,
        config: TwellConfig,
    ) -> Result<Self, TwellError> {
        config.validate()?;
        if cols > MAX_COLS {
            return Err(TwellError::TooManyCols { cols });
        }
        if rows >= NOT_OVERFLOW as usize {
            return Err(TwellError::TooManyRows { rows });
        }
        check_dense_len(dense, rows, cols)?;
        let tiles = cols.div_ceil(config.tile);
        let wpt = config.words_per_tile();
        let mut m = TwellMatrix {
            rows,
            cols,
            config,
            words: vec![0; rows * tiles * wpt],
            overflow_slot: vec![NOT_OVERFLOW; rows],
            overflow_row: Vec::new(),
            overflow: Vec::new(),
            nnz: 0,
            nnz_per_row_max: 0,
            tile_count_max: 0,
        };
        for r in 0..rows {
            let row = &dense[r * cols..(r + 1) * cols];
            let mut row_nnz = 0;
            let mut over = false;
            for t in 0..tiles {
                let base = (r * tiles + t) * wpt;
                let mut count = 0;
                for (c, &v) in row
                    .iter()
                    .enumerate()
                    .take(cols.min((t + 1) * config.tile))
                    .skip(t * config.tile)
                {
                    if v.is_zero() {
                        continue;
                    }
                    if count < config.capacity() {
                        m.words[base + 1 + count] = entry_word(v.to_bf16(), c);
                    }
                    count += 1;
                }
                m.words[base] = count as u32;
                over |= count > config.capacity();
                row_nnz += count;
                m.tile_count_max = m.tile_count_max.max(count);
            }
            if over {
                m.overflow_slot[r] = m.overflow_row.len() as u32;
                m.overflow_row.push(r as u32);
                m.overflow.extend(row.iter().map(|v| v.to_bf16()));
            }
            m.nnz += row_nnz;
            m.nnz_per_row_max = m.nnz_per_row_max.max(row_nnz);
        }
        Ok(m)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn config(&self) -> TwellConfig {
        self.config
    }

    /// Tiles per row, `ceil(cols / T)`.
    pub fn tiles_per_row(&self) -> usize {
        self.cols.div_ceil(self.config.tile)
    }

    /// The packed words, `[rows, tiles * T/C]`.
    pub fn words(&self) -> &[u32] {
        &self.words
    }

    /// `[rows]`: each row's overflow slot, or [`NOT_OVERFLOW`].
    pub fn overflow_slots(&self) -> &[u32] {
        &self.overflow_slot
    }

    /// `[overflow rows]`: the row held by each overflow slot.
    pub fn overflow_rows(&self) -> &[u32] {
        &self.overflow_row
    }

    /// `[overflow rows, cols]`: the overflow rows, dense bf16.
    pub fn overflow_values(&self) -> &[bf16] {
        &self.overflow
    }

    pub fn stats(&self) -> TwellStats {
        TwellStats {
            rows: self.rows,
            nnz: self.nnz,
            nnz_per_row_mean: mean_per_row(self.nnz, self.rows),
            nnz_per_row_max: self.nnz_per_row_max,
            tile_count_max: self.tile_count_max,
            overflow_rows: self.overflow_row.len(),
        }
    }
}

impl SparseRows for TwellMatrix {
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn for_each_in_row<F: FnMut(usize, f32)>(&self, row: usize, mut f: F) {
        let slot = self.overflow_slot[row];
        if let Some(dense) = dense_slot(&self.overflow, slot, NOT_OVERFLOW, self.cols) {
            return for_each_nonzero(dense, f);
        }
        let wpt = self.config.words_per_tile();
        let tiles = self.tiles_per_row();
        let row_words = &self.words[row * tiles * wpt..(row + 1) * tiles * wpt];
        for tile in row_words.chunks_exact(wpt) {
            for &w in &tile[1..=tile[0] as usize] {
                f(entry_col(w), entry_value(w).to_f32());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// A `[rows, cols]` matrix with roughly `density` non-zeros, all bf16-representable.
    fn sparse_matrix(rows: usize, cols: usize, density: f32, seed: u64) -> Vec<f32> {
        let mut rnd = lcg(seed);
        (0..rows * cols)
            .map(|_| {
                let keep = rnd().abs() < density;
                let v = bf16::from_f32(rnd()).to_f32();
                if keep {
                    v
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn worked_example_matches_module_docs() {
        let dense = [
            0.0, 2.0, 0.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, 0.0, 0.0, 5.0, //
            1.0, 0.0, 3.0, 0.0, 0.0, 0.0f32,
        ];
        let m = TwellMatrix::pack(
            &dense,
            3,
            6,
            TwellConfig {
                tile: 4,
                compression: 2,
            },
        )
        .unwrap();
        let w = |v: f32, c: u32| (u32::from(bf16::from_f32(v).to_bits()) << 16) | c;
        assert_eq!(m.words()[..4], [1, w(2.0, 1), 0, 0]);
        assert_eq!(m.words()[4..8], [0, 0, 1, w(5.0, 5)]);
        assert_eq!(m.words()[8..10], [2, w(1.0, 0)]);
        assert_eq!(m.overflow_slots(), &[NOT_OVERFLOW, NOT_OVERFLOW, 0]);
        assert_eq!(m.overflow_rows(), &[2]);
        assert_eq!(m.unpack(), dense);
        let s = m.stats();
        assert_eq!(
            (s.nnz, s.nnz_per_row_max, s.tile_count_max, s.overflow_rows),
            (4, 2, 2, 1)
        );
    }

    #[test]
    fn round_trip_is_lossless_at_every_density_and_shape() {
        let configs = [
            TwellConfig::default(),
            TwellConfig {
                tile: 16,
                compression: 4,
            },
            TwellConfig {
                tile: 8,
                compression: 4,
            },
        ];
        for (i, &cfg) in configs.iter().enumerate() {
            for &(rows, cols) in &[(1, 1), (3, 17), (17, 300), (5, 256), (2, 513)] {
                for &density in &[0.0, 0.01, 0.2, 0.7, 1.0] {
                    let dense =
                        sparse_matrix(rows, cols, density, (i * 1000 + rows * 10 + cols) as u64);
                    let m = TwellMatrix::pack(&dense, rows, cols, cfg).unwrap();
                    assert_eq!(
                        m.unpack(),
                        dense,
                        "cfg {cfg:?} shape {rows}x{cols} density {density}"
                    );
                    let nnz = dense.iter().filter(|v| **v != 0.0).count();
                    assert_eq!(m.stats().nnz, nnz);
                    let bf: Vec<bf16> = dense.iter().map(|v| bf16::from_f32(*v)).collect();
                    assert_eq!(TwellMatrix::pack(&bf, rows, cols, cfg).unwrap(), m);
                }
            }
        }
    }

    #[test]
    fn overflow_rows_are_flagged_and_exact() {
        let cfg = TwellConfig {
            tile: 16,
            compression: 4,
        };
        let (rows, cols) = (40, 50);
        let mut dense = sparse_matrix(rows, cols, 0.1, 7);
        for c in 0..cols {
            dense[3 * cols + c] = 1.0 + c as f32;
        }
        dense[(rows - 1) * cols..].fill(0.0);
        let m = TwellMatrix::pack(&dense, rows, cols, cfg).unwrap();
        assert_ne!(m.overflow_slots()[3], NOT_OVERFLOW);
        assert_eq!(m.overflow_slots()[rows - 1], NOT_OVERFLOW);
        assert_eq!(m.stats().nnz_per_row_max, cols);
        assert_eq!(m.stats().tile_count_max, 16);
        assert_eq!(m.unpack(), dense);
        for (slot, &r) in m.overflow_rows().iter().enumerate() {
            assert_eq!(m.overflow_slots()[r as usize] as usize, slot);
        }
    }

    #[test]
    fn f32_values_round_to_nearest_bf16() {
        let dense = [1.0f32 + 1.0 / 512.0, -3.3, 0.0, 1e-3];
        let m = TwellMatrix::pack(&dense, 1, 4, TwellConfig::default()).unwrap();
        let want: Vec<f32> = dense.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
        assert_eq!(m.unpack(), want);
    }

    #[test]
    fn bad_inputs_give_typed_errors() {
        let cfg = TwellConfig::default();
        assert_eq!(
            TwellMatrix::pack(&[0.0f32; 3], 2, 2, cfg),
            Err(TwellError::Length(DenseLengthError {
                len: 3,
                rows: 2,
                cols: 2
            }))
        );
        assert_eq!(
            TwellMatrix::pack::<f32>(&[], 0, MAX_COLS + 1, cfg),
            Err(TwellError::TooManyCols { cols: MAX_COLS + 1 })
        );
        for (tile, compression) in [(256, 0), (256, 3), (8, 8)] {
            assert_eq!(
                TwellMatrix::pack(&[0.0f32], 1, 1, TwellConfig { tile, compression }),
                Err(TwellError::Tile { tile, compression })
            );
        }
        let wide = TwellMatrix::pack::<f32>(&[], 0, MAX_COLS, cfg).unwrap();
        assert_eq!(wide.tiles_per_row(), MAX_COLS / 256);
    }
}
