//! ELL + dense-tail format ("ell_tail"): the layout of the gate activations and of their
//! transpose on the CPU `hybrid` path (the CUDA `hybrid` path uses the exact CSR/CSC pool of
//! [`crate::cuda::hybrid`] instead).
//!
//! A `[rows, cols]` matrix with at most `W` non-zeros in a row keeps that row in the ELL
//! part: `W` column indices and `W` values (entries in increasing column order, unused slots
//! zero) plus the row's true count. A row with more than `W` non-zeros is a *tail row*: it is
//! stored whole, dense, in the tail, found through the row -> tail map (reverse map tail ->
//! row alongside); its count stays true and its ELL slots are unused. The tail has a
//! configured capacity (what a fixed-size buffer would hold); when more rows need it, it grows and the
//! rows beyond capacity are counted ([`EllTailStats::rows_beyond_tail_capacity`]). No row is
//! ever dropped, so unpacking is exact.
//!
//! The forward packs `P = relu(x Wg^T)` (rows = tokens, cols = units, default `W` = 128);
//! the backward needs the transposed form (rows = units, cols = tokens, default `W` = 256),
//! built from any [`SparseRows`] by [`EllTailMatrix::transpose_of`].
//!
//! Index widths: column indices and row counts are `u32`, so `cols` (the token count of the
//! transposed form) may be anything up to `u32::MAX`, well past 65,536; rows are limited to
//! `u32::MAX - 1` because `u32::MAX` marks "not in the tail". Values are f32, so packing f32
//! or bf16 is bit-exact.
//!
//! Worked example, `W = 2`, tail capacity 1, `cols = 4`:
//!
//! ```text
//! dense row 0: [0, 7, 0, 0]   ELL cols [1, 0] vals [7, 0] count 1
//! dense row 1: [1, 2, 3, 0]   count 3 > W -> tail slot 0 = [1, 2, 3, 0]
//! dense row 2: [0, 0, 0, 0]   ELL count 0
//! dense row 3: [4, 0, 5, 6]   count 3 > W -> tail slot 1 (beyond capacity 1: counted)
//! row -> tail: [-, 0, -, 1]   tail -> row: [1, 3]   rows_beyond_tail_capacity = 1
//! ```
use thiserror::Error;

use super::reference::{
    check_dense_len, dense_slot, for_each_nonzero, mean_per_row, DenseLengthError, Element,
    SparseRows,
};

/// Row -> tail map value of a row that is not in the tail.
pub const NOT_IN_TAIL: u32 = u32::MAX;

/// ELL width and tail capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EllTailConfig {
    /// `W`: entries per ELL row.
    pub ell_width: usize,
    /// Tail rows the storage is sized for; more are stored and counted.
    pub tail_capacity: usize,
}

impl EllTailConfig {
    /// Defaults for the token-major form (rows = tokens).
    pub const TOKENS: EllTailConfig = EllTailConfig {
        ell_width: 128,
        tail_capacity: 2048,
    };
    /// Defaults for the transposed form (rows = units).
    pub const UNITS: EllTailConfig = EllTailConfig {
        ell_width: 256,
        tail_capacity: 2048,
    };
}

impl Default for EllTailConfig {
    fn default() -> Self {
        EllTailConfig::TOKENS
    }
}

/// Errors of ELL + tail packing.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EllTailError {
    #[error("ell_tail ell_width must be positive")]
    EllWidth,
    #[error("ell_tail {field} = {value} exceeds the 32-bit index limit {max}")]
    TooLarge {
        field: &'static str,
        value: usize,
        max: usize,
    },
    #[error(transparent)]
    Length(#[from] DenseLengthError),
}

/// Packing statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EllTailStats {
    pub rows: usize,
    pub nnz: usize,
    pub nnz_per_row_mean: f64,
    pub nnz_per_row_max: usize,
    /// Rows stored in the tail (nnz > W).
    pub tail_rows: usize,
    /// Tail rows past the configured capacity (stored all the same).
    pub rows_beyond_tail_capacity: usize,
}

/// An ELL + tail packed `[rows, cols]` matrix. See the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct EllTailMatrix {
    rows: usize,
    cols: usize,
    config: EllTailConfig,
    /// `[rows, W]`
    ell_cols: Vec<u32>,
    /// `[rows, W]`
    ell_values: Vec<f32>,
    /// `[rows]`: true non-zero count of each row.
    row_nnz: Vec<u32>,
    /// `[rows]`: tail slot or [`NOT_IN_TAIL`].
    row_to_tail: Vec<u32>,
    /// `[tail rows]`
    tail_to_row: Vec<u32>,
    /// `[tail rows, cols]`
    tail: Vec<f32>,
}

impl EllTailMatrix {
    fn empty(rows: usize, cols: usize, config: EllTailConfig) -> Result<Self, EllTailError> {
        if config.ell_width == 0 {
            return Err(EllTailError::EllWidth);
        }
        let max = u32::MAX as usize;
        if rows >= max {
            return Err(EllTailError::TooLarge {
                field: "rows",
                value: rows,
                max: max - 1,
            });
        }
        if cols > max {
            return Err(EllTailError::TooLarge {
                field: "cols",
                value: cols,
                max,
            });
        }
        let w = config.ell_width;
        Ok(EllTailMatrix {
            rows,
            cols,
            config,
            ell_cols: vec![0; rows * w],
            ell_values: vec![0.0; rows * w],
            row_nnz: vec![0; rows],
            row_to_tail: vec![NOT_IN_TAIL; rows],
            tail_to_row: Vec::new(),
            tail: Vec::new(),
        })
    }

    /// Stores `row` from its entries (increasing columns), `nnz` of them.
    fn set_row(&mut self, row: usize, nnz: usize, entries: impl Iterator<Item = (usize, f32)>) {
        let w = self.config.ell_width;
        self.row_nnz[row] = nnz as u32;
        if nnz <= w {
            for (k, (c, v)) in entries.enumerate() {
                self.ell_cols[row * w + k] = c as u32;
                self.ell_values[row * w + k] = v;
            }
        } else {
            self.row_to_tail[row] = self.tail_to_row.len() as u32;
            self.tail_to_row.push(row as u32);
            let start = self.tail.len();
            self.tail.resize(start + self.cols, 0.0);
            for (c, v) in entries {
                self.tail[start + c] = v;
            }
        }
    }

    /// Packs a dense row-major `[rows, cols]` matrix; every non-zero is kept.
    pub fn pack<E: Element>(
        dense: &[E],
        rows: usize,
        cols: usize,
        config: EllTailConfig,
    ) -> Result<Self, EllTailError> {
        check_dense_len(dense, rows, cols)?;
        let mut m = EllTailMatrix::empty(rows, cols, config)?;
        for r in 0..rows {
            let row = &dense[r * cols..(r + 1) * cols];
            let nnz = row.iter().filter(|v| !v.is_zero()).count();
            let entries = row.iter().enumerate().filter(|(_, v)| !v.is_zero());
            m.set_row(r, nnz, entries.map(|(c, v)| (c, v.to_f32())));
        }
        Ok(m)
    }

    /// The transposed form of `src: [r, c]`, a `[c, r]` ELL + tail matrix with the same entries,
    /// built from the entries only (a counting sort by column).
    pub fn transpose_of<S: SparseRows>(
        src: &S,
        config: EllTailConfig,
    ) -> Result<Self, EllTailError> {
        let (rows, cols) = (src.n_cols(), src.n_rows());
        let mut m = EllTailMatrix::empty(rows, cols, config)?;
        let mut start = vec![0usize; rows + 1];
        for r in 0..cols {
            src.for_each_in_row(r, |c, _| start[c + 1] += 1);
        }
        for c in 0..rows {
            start[c + 1] += start[c];
        }
        let mut next = start.clone();
        let mut entries = vec![(0usize, 0.0f32); start[rows]];
        for r in 0..cols {
            src.for_each_in_row(r, |c, v| {
                entries[next[c]] = (r, v);
                next[c] += 1;
            });
        }
        for c in 0..rows {
            let e = &entries[start[c]..start[c + 1]];
            m.set_row(c, e.len(), e.iter().copied());
        }
        Ok(m)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn config(&self) -> EllTailConfig {
        self.config
    }

    /// `[rows, W]`: ELL column indices.
    pub fn ell_cols(&self) -> &[u32] {
        &self.ell_cols
    }

    /// `[rows, W]`: ELL values.
    pub fn ell_values(&self) -> &[f32] {
        &self.ell_values
    }

    /// `[rows]`: the true non-zero count of each row.
    pub fn row_nnz(&self) -> &[u32] {
        &self.row_nnz
    }

    /// `[rows]`: each row's tail slot, or [`NOT_IN_TAIL`].
    pub fn row_to_tail(&self) -> &[u32] {
        &self.row_to_tail
    }

    /// `[tail rows]`: the row held by each tail slot.
    pub fn tail_to_row(&self) -> &[u32] {
        &self.tail_to_row
    }

    /// `[tail rows, cols]`: the tail rows, dense.
    pub fn tail_values(&self) -> &[f32] {
        &self.tail
    }

    pub fn stats(&self) -> EllTailStats {
        let nnz: usize = self.row_nnz.iter().map(|&n| n as usize).sum();
        let tail_rows = self.tail_to_row.len();
        EllTailStats {
            rows: self.rows,
            nnz,
            nnz_per_row_mean: mean_per_row(nnz, self.rows),
            nnz_per_row_max: self.row_nnz.iter().copied().max().unwrap_or(0) as usize,
            tail_rows,
            rows_beyond_tail_capacity: tail_rows.saturating_sub(self.config.tail_capacity),
        }
    }
}

impl SparseRows for EllTailMatrix {
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn for_each_in_row<F: FnMut(usize, f32)>(&self, row: usize, mut f: F) {
        let slot = self.row_to_tail[row];
        if let Some(dense) = dense_slot(&self.tail, slot, NOT_IN_TAIL, self.cols) {
            return for_each_nonzero(dense, f);
        }
        let w = self.config.ell_width;
        let n = self.row_nnz[row] as usize;
        for k in row * w..row * w + n {
            f(self.ell_cols[k] as usize, self.ell_values[k]);
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    fn sparse_matrix(rows: usize, cols: usize, density: f64, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut rnd = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..rows * cols)
            .map(|_| {
                if rnd() < density {
                    (rnd() * 2.0 - 1.0) as f32
                } else {
                    0.0
                }
            })
            .collect()
    }

    fn transpose_dense(d: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols * rows)
            .map(|i| d[(i % rows) * cols + i / rows])
            .collect()
    }

    #[test]
    fn worked_example_matches_module_docs() {
        let dense = [
            0.0, 7.0, 0.0, 0.0, //
            1.0, 2.0, 3.0, 0.0, //
            0.0, 0.0, 0.0, 0.0, //
            4.0, 0.0, 5.0, 6.0f32,
        ];
        let m = EllTailMatrix::pack(
            &dense,
            4,
            4,
            EllTailConfig {
                ell_width: 2,
                tail_capacity: 1,
            },
        )
        .unwrap();
        assert_eq!(&m.ell_cols()[..2], &[1, 0]);
        assert_eq!(&m.ell_values()[..2], &[7.0, 0.0]);
        assert_eq!(m.row_nnz(), &[1, 3, 0, 3]);
        assert_eq!(m.row_to_tail(), &[NOT_IN_TAIL, 0, NOT_IN_TAIL, 1]);
        assert_eq!(m.tail_to_row(), &[1, 3]);
        assert_eq!(&m.tail_values()[..4], &dense[4..8]);
        assert_eq!(m.unpack(), dense);
        let s = m.stats();
        assert_eq!(
            (
                s.nnz,
                s.nnz_per_row_max,
                s.tail_rows,
                s.rows_beyond_tail_capacity
            ),
            (7, 3, 2, 1)
        );
    }

    #[test]
    fn round_trip_and_transpose_are_lossless() {
        let cfgs = [
            EllTailConfig::TOKENS,
            EllTailConfig {
                ell_width: 3,
                tail_capacity: 2,
            },
        ];
        for (i, &cfg) in cfgs.iter().enumerate() {
            for &(rows, cols) in &[(1, 1), (7, 13), (40, 300), (300, 9)] {
                for &density in &[0.0, 0.005, 0.1, 0.5, 1.0] {
                    let dense = sparse_matrix(rows, cols, density, (i * 7919 + rows * cols) as u64);
                    let m = EllTailMatrix::pack(&dense, rows, cols, cfg).unwrap();
                    assert_eq!(m.unpack(), dense, "{cfg:?} {rows}x{cols} density {density}");
                    assert_eq!(m.stats().nnz, dense.iter().filter(|v| **v != 0.0).count());
                    let t = EllTailMatrix::transpose_of(&m, cfg).unwrap();
                    assert_eq!(t.unpack(), transpose_dense(&dense, rows, cols));
                    assert_eq!(EllTailMatrix::transpose_of(&t, cfg).unwrap(), m);
                    let bf: Vec<bf16> = dense.iter().map(|v| bf16::from_f32(*v)).collect();
                    let mb = EllTailMatrix::pack(&bf, rows, cols, cfg).unwrap();
                    let widened: Vec<f32> = bf.iter().map(|v| v.to_f32()).collect();
                    assert_eq!(mb.unpack(), widened);
                }
            }
        }
    }

    #[test]
    fn tail_grows_past_capacity_and_counts() {
        let (rows, cols) = (50, 20);
        let cfg = EllTailConfig {
            ell_width: 4,
            tail_capacity: 3,
        };
        let mut dense = sparse_matrix(rows, cols, 0.05, 3);
        for r in (0..rows).step_by(5) {
            dense[r * cols..(r + 1) * cols].fill(1.5);
        }
        let m = EllTailMatrix::pack(&dense, rows, cols, cfg).unwrap();
        let s = m.stats();
        assert!(s.tail_rows >= 10);
        assert_eq!(s.rows_beyond_tail_capacity, s.tail_rows - 3);
        assert_eq!(m.unpack(), dense);
        for (slot, &r) in m.tail_to_row().iter().enumerate() {
            assert_eq!(m.row_to_tail()[r as usize] as usize, slot);
        }
    }

    #[test]
    fn transpose_handles_more_than_65536_tokens() {
        let (tokens, units) = (70_000, 3);
        let mut dense = vec![0.0f32; tokens * units];
        for t in [0, 65_535, 65_536, 69_999] {
            dense[t * units + 1] = t as f32 + 0.5;
        }
        let m = EllTailMatrix::pack(&dense, tokens, units, EllTailConfig::TOKENS).unwrap();
        let t = EllTailMatrix::transpose_of(&m, EllTailConfig::UNITS).unwrap();
        let mut seen = Vec::new();
        t.for_each_in_row(1, |c, v| seen.push((c, v)));
        assert_eq!(
            seen,
            [
                (0, 0.5),
                (65_535, 65_535.5),
                (65_536, 65_536.5),
                (69_999, 69_999.5)
            ]
        );
    }

    #[test]
    fn bad_inputs_give_typed_errors() {
        assert_eq!(
            EllTailMatrix::pack(&[0.0f32; 5], 2, 3, EllTailConfig::TOKENS),
            Err(EllTailError::Length(DenseLengthError {
                len: 5,
                rows: 2,
                cols: 3
            }))
        );
        assert_eq!(
            EllTailMatrix::pack(
                &[0.0f32],
                1,
                1,
                EllTailConfig {
                    ell_width: 0,
                    tail_capacity: 1
                }
            ),
            Err(EllTailError::EllWidth)
        );
    }
}
