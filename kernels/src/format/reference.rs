//! CPU reference of the sparse gated FFN, computed from the non-zeros of the packed gate
//! activations only.
//!
//! With `P = relu(x Wg^T)` (the packed gate activations, `[N, H]`), `u_tj = x_t . Wu_j` and
//! `h_tj = P_tj * u_tj`, for every stored entry `(t, j)`:
//!
//! - forward: `y_t += h_tj Wd^T_j`, `l1_sum += |h_tj|`;
//! - backward, given `dy: [N, D]` and `dl1` (the upstream gradient of `l1_sum`):
//!   `dh_tj = dy_t . Wd^T_j + dl1 * sign(h_tj)`, `du_tj = dh_tj * P_tj` (gradient of `u`),
//!   `dg_tj = dh_tj * u_tj` (gradient of the gate pre-activation; stored entries are exactly
//!   the positions where `g > 0`), then
//!   `dx_t += du_tj Wu_j + dg_tj Wg_j` (row pass over `P`) and
//!   `dWu_j += du_tj x_t`, `dWg_j += dg_tj x_t`, `dWd^T_j += h_tj dy_t` (unit pass over the
//!   transposed pattern `P^T: [H, N]`, so every weight-gradient row is a gather, as on the GPU).
//!
//! `u`, `h` and `dh` are recomputed per entry in each pass instead of being stored: the
//! reference keeps no state besides the packed pattern. All arithmetic is f32 except the
//! scalar `l1_sum`, accumulated in f64 and returned as f32.
use half::bf16;
use thiserror::Error;

/// A scalar a format can be packed from.
pub trait Element: Copy {
    fn to_f32(self) -> f32;
    fn to_bf16(self) -> bf16;
    fn is_zero(self) -> bool;
}

impl Element for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn to_bf16(self) -> bf16 {
        bf16::from_f32(self)
    }
    fn is_zero(self) -> bool {
        self == 0.0
    }
}

impl Element for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn to_bf16(self) -> bf16 {
        self
    }
    fn is_zero(self) -> bool {
        self.to_bits() & 0x7fff == 0
    }
}

/// Row-wise read access to a sparse `[rows, cols]` matrix: what the reference computes from.
/// Every packed format implements it, whatever its physical layout.
pub trait SparseRows {
    /// `(rows, cols)`.
    fn shape(&self) -> (usize, usize);
    fn n_rows(&self) -> usize {
        self.shape().0
    }
    fn n_cols(&self) -> usize {
        self.shape().1
    }
    /// Calls `f(col, value)` for every stored entry of `row`, in increasing column order.
    fn for_each_in_row<F: FnMut(usize, f32)>(&self, row: usize, f: F);

    /// The dense `[rows, cols]` matrix (row-major).
    fn unpack(&self) -> Vec<f32> {
        let cols = self.n_cols();
        let mut out = vec![0.0f32; self.n_rows() * cols];
        for r in 0..self.n_rows() {
            let row = &mut out[r * cols..(r + 1) * cols];
            self.for_each_in_row(r, |c, v| row[c] = v);
        }
        out
    }
}

/// Calls `f(col, value)` for every non-zero of a dense row (the overflow or tail rows of
/// the packed formats), in increasing column order.
pub(crate) fn for_each_nonzero<E: Element, F: FnMut(usize, f32)>(row: &[E], mut f: F) {
    for (c, &v) in row.iter().enumerate() {
        if !v.is_zero() {
            f(c, v.to_f32());
        }
    }
}

/// Row `slot` of a buffer of dense `cols`-wide rows (the overflow or tail part of a packed
/// format), `None` when `slot` is the format's "not stored here" marker `none`.
pub(crate) fn dense_slot<E>(rows: &[E], slot: u32, none: u32, cols: usize) -> Option<&[E]> {
    (slot != none).then(|| &rows[slot as usize * cols..(slot as usize + 1) * cols])
}

/// Mean non-zeros per row of the packing statistics (0 for a matrix without rows).
pub(crate) fn mean_per_row(nnz: usize, rows: usize) -> f64 {
    if rows == 0 {
        0.0
    } else {
        nnz as f64 / rows as f64
    }
}

/// A dense input to pack whose length is not `rows x cols`.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("dense input has {len} elements, expected rows x cols = {rows} x {cols}")]
pub struct DenseLengthError {
    pub len: usize,
    pub rows: usize,
    pub cols: usize,
}

/// Checks that a dense input to pack holds `rows x cols` elements.
pub(crate) fn check_dense_len<E>(
    dense: &[E],
    rows: usize,
    cols: usize,
) -> Result<(), DenseLengthError> {
    if dense.len() == rows * cols {
        Ok(())
    } else {
        Err(DenseLengthError {
            len: dense.len(),
            rows,
            cols,
        })
    }
}

/// Errors of the CPU reference: inconsistent shapes.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("{name} has {len} elements, expected {rows} x {cols} = {}", rows * cols)]
    Length {
        name: &'static str,
        len: usize,
        rows: usize,
        cols: usize,
    },
    #[error("{name} is [{rows}, {cols}], expected [{want_rows}, {want_cols}]")]
    PatternShape {
        name: &'static str,
        rows: usize,
        cols: usize,
        want_rows: usize,
        want_cols: usize,
    },
}

/// The dense operands of one FFN call, row-major f32: `x: [N, D]`, `Wg, Wu, Wd^T: [H, D]`.
#[derive(Clone, Copy, Debug)]
pub struct FfnProblem<'a> {
    x: &'a [f32],
    gate: &'a [f32],
    up: &'a [f32],
    down_t: &'a [f32],
    n: usize,
    d: usize,
    h: usize,
}

/// Forward results: `y: [N, D]`, `l1_sum`, and the active-unit counts (`h != 0`) per token
/// (`[N]`) and per unit (`[H]`).
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardResult {
    pub y: Vec<f32>,
    pub l1_sum: f32,
    pub active_per_token: Vec<i64>,
    pub active_per_unit: Vec<i64>,
}

/// Backward results: `dx: [N, D]`, `dWg, dWu, dWd^T: [H, D]`.
#[derive(Clone, Debug, PartialEq)]
pub struct FfnGrads {
    pub dx: Vec<f32>,
    pub d_gate: Vec<f32>,
    pub d_up: Vec<f32>,
    pub d_down_t: Vec<f32>,
}

/// What one stored entry `(t, j)` contributes in the backward.
struct EntryGrad {
    h: f32,
    du: f32,
    dg: f32,
}

fn check_len(
    name: &'static str,
    v: &[f32],
    rows: usize,
    cols: usize,
) -> Result<(), ReferenceError> {
    check_dense_len(v, rows, cols).map_err(|e| ReferenceError::Length {
        name,
        len: e.len,
        rows,
        cols,
    })
}

fn check_pattern<S: SparseRows>(
    name: &'static str,
    s: &S,
    rows: usize,
    cols: usize,
) -> Result<(), ReferenceError> {
    if s.n_rows() == rows && s.n_cols() == cols {
        Ok(())
    } else {
        Err(ReferenceError::PatternShape {
            name,
            rows: s.n_rows(),
            cols: s.n_cols(),
            want_rows: rows,
            want_cols: cols,
        })
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(acc: &mut [f32], alpha: f32, v: &[f32]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += alpha * b;
    }
}

fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl<'a> FfnProblem<'a> {
    /// Checks every length against `x: [n, d]` and the weights `[h, d]`.
    pub fn new(
        x: &'a [f32],
        gate: &'a [f32],
        up: &'a [f32],
        down_t: &'a [f32],
        n: usize,
        d: usize,
        h: usize,
    ) -> Result<Self, ReferenceError> {
        check_len("x", x, n, d)?;
        check_len("Wg", gate, h, d)?;
        check_len("Wu", up, h, d)?;
        check_len("Wd^T", down_t, h, d)?;
        Ok(FfnProblem {
            x,
            gate,
            up,
            down_t,
            n,
            d,
            h,
        })
    }

    fn x_row(&self, t: usize) -> &[f32] {
        &self.x[t * self.d..(t + 1) * self.d]
    }

    fn w_row<'b>(&self, w: &'b [f32], j: usize) -> &'b [f32] {
        &w[j * self.d..(j + 1) * self.d]
    }

    /// The dense gate GEMM, `relu(x Wg^T): [N, H]`: the one product a sparse FFN cannot skip.
    pub fn gate_activations(&self) -> Vec<f32> {
        let mut p = vec![0.0f32; self.n * self.h];
        for t in 0..self.n {
            let xt = self.x_row(t);
            for j in 0..self.h {
                p[t * self.h + j] = dot(xt, self.w_row(self.gate, j)).max(0.0);
            }
        }
        p
    }

    /// Forward from the packed gate activations `p: [N, H]`.
    pub fn forward<S: SparseRows>(&self, p: &S) -> Result<ForwardResult, ReferenceError> {
        check_pattern("P", p, self.n, self.h)?;
        let mut y = vec![0.0f32; self.n * self.d];
        let mut l1 = 0.0f64;
        let mut active_per_token = vec![0i64; self.n];
        let mut active_per_unit = vec![0i64; self.h];
        for t in 0..self.n {
            let xt = self.x_row(t);
            let yt = &mut y[t * self.d..(t + 1) * self.d];
            p.for_each_in_row(t, |j, pv| {
                let h = pv * dot(xt, self.w_row(self.up, j));
                if h != 0.0 {
                    axpy(yt, h, self.w_row(self.down_t, j));
                    l1 += f64::from(h.abs());
                    active_per_token[t] += 1;
                    active_per_unit[j] += 1;
                }
            });
        }
        Ok(ForwardResult {
            y,
            l1_sum: l1 as f32,
            active_per_token,
            active_per_unit,
        })
    }

    fn entry_grad(&self, t: usize, j: usize, pv: f32, dy: &[f32], dl1: f32) -> EntryGrad {
        let u = dot(self.x_row(t), self.w_row(self.up, j));
        let h = pv * u;
        let dh = dot(
            &dy[t * self.d..(t + 1) * self.d],
            self.w_row(self.down_t, j),
        ) + dl1 * sign(h);
        EntryGrad {
            h,
            du: dh * pv,
            dg: dh * u,
        }
    }

    /// Backward from the packed gate activations `p: [N, H]` and their transpose
    /// `p_t: [H, N]` (same entries), given `dy: [N, D]` and `dl1`.
    pub fn backward<S: SparseRows, T: SparseRows>(
        &self,
        p: &S,
        p_t: &T,
        dy: &[f32],
        dl1: f32,
    ) -> Result<FfnGrads, ReferenceError> {
        check_pattern("P", p, self.n, self.h)?;
        check_pattern("P^T", p_t, self.h, self.n)?;
        check_len("dy", dy, self.n, self.d)?;
        let d = self.d;
        let mut dx = vec![0.0f32; self.n * d];
        for t in 0..self.n {
            let dxt = &mut dx[t * d..(t + 1) * d];
            p.for_each_in_row(t, |j, pv| {
                let e = self.entry_grad(t, j, pv, dy, dl1);
                axpy(dxt, e.du, self.w_row(self.up, j));
                axpy(dxt, e.dg, self.w_row(self.gate, j));
            });
        }
        let mut d_gate = vec![0.0f32; self.h * d];
        let mut d_up = vec![0.0f32; self.h * d];
        let mut d_down_t = vec![0.0f32; self.h * d];
        for j in 0..self.h {
            let rows = j * d..(j + 1) * d;
            let (dg_j, du_j, dd_j) = (
                &mut d_gate[rows.clone()],
                &mut d_up[rows.clone()],
                &mut d_down_t[rows],
            );
            p_t.for_each_in_row(j, |t, pv| {
                let e = self.entry_grad(t, j, pv, dy, dl1);
                let xt = self.x_row(t);
                axpy(dg_j, e.dg, xt);
                axpy(du_j, e.du, xt);
                axpy(dd_j, e.h, &dy[t * d..(t + 1) * d]);
            });
        }
        Ok(FfnGrads {
            dx,
            d_gate,
            d_up,
            d_down_t,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ell_tail::{EllTailConfig, EllTailMatrix};
    use crate::format::twell::{TwellConfig, TwellMatrix};

    fn random(len: usize, seed: u64, shift: f32) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 + shift
            })
            .collect()
    }

    /// The same forward and backward on dense matrices, `p: [N, H]` given.
    fn dense(pr: &FfnProblem, p: &[f32], dy: &[f32], dl1: f32) -> (Vec<f32>, f32, FfnGrads) {
        let (n, d, h) = (pr.n, pr.d, pr.h);
        let mut y = vec![0.0; n * d];
        let mut l1 = 0.0;
        let mut gr = FfnGrads {
            dx: vec![0.0; n * d],
            d_gate: vec![0.0; h * d],
            d_up: vec![0.0; h * d],
            d_down_t: vec![0.0; h * d],
        };
        for t in 0..n {
            for j in 0..h {
                let pv = p[t * h + j];
                if pv == 0.0 {
                    continue;
                }
                let u = dot(pr.x_row(t), pr.w_row(pr.up, j));
                let hv = pv * u;
                l1 += hv.abs();
                axpy(&mut y[t * d..(t + 1) * d], hv, pr.w_row(pr.down_t, j));
                let dyt = &dy[t * d..(t + 1) * d];
                let dh = dot(dyt, pr.w_row(pr.down_t, j)) + dl1 * sign(hv);
                axpy(&mut gr.dx[t * d..(t + 1) * d], dh * pv, pr.w_row(pr.up, j));
                axpy(&mut gr.dx[t * d..(t + 1) * d], dh * u, pr.w_row(pr.gate, j));
                axpy(&mut gr.d_up[j * d..(j + 1) * d], dh * pv, pr.x_row(t));
                axpy(&mut gr.d_gate[j * d..(j + 1) * d], dh * u, pr.x_row(t));
                axpy(&mut gr.d_down_t[j * d..(j + 1) * d], hv, dyt);
            }
        }
        (y, l1, gr)
    }

    fn assert_close(name: &str, got: &[f32], want: &[f32]) {
        let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 1e-5 * scale,
            "{name}: max error {err:e}, scale {scale:e}"
        );
    }

    /// The packed pattern as dense, and the sparse forward and backward on it.
    fn run_on<S: SparseRows>(
        pr: &FfnProblem,
        p: &S,
        t_cfg: EllTailConfig,
        dy: &[f32],
    ) -> (Vec<f32>, ForwardResult, FfnGrads) {
        let p_t = EllTailMatrix::transpose_of(p, t_cfg).unwrap();
        let grads = pr.backward(p, &p_t, dy, 0.7).unwrap();
        (p.unpack(), pr.forward(p).unwrap(), grads)
    }

    #[test]
    fn sparse_reference_equals_dense_formulas_on_both_formats() {
        let (n, d, h) = (29, 7, 45);
        let x = random(n * d, 1, 0.0);
        let (wg, wu, wd) = (
            random(h * d, 2, -0.3),
            random(h * d, 3, 0.0),
            random(h * d, 4, 0.0),
        );
        let dy = random(n * d, 5, 0.0);
        let pr = FfnProblem::new(&x, &wg, &wu, &wd, n, d, h).unwrap();
        let p = pr.gate_activations();
        let twell = TwellMatrix::pack(
            &p,
            n,
            h,
            TwellConfig {
                tile: 16,
                compression: 4,
            },
        )
        .unwrap();
        let ell_tail = EllTailMatrix::pack(
            &p,
            n,
            h,
            EllTailConfig {
                ell_width: 8,
                tail_capacity: 2,
            },
        )
        .unwrap();
        assert!(twell.stats().overflow_rows > 0 && ell_tail.stats().rows_beyond_tail_capacity > 0);
        let t_cfg = EllTailConfig {
            ell_width: 6,
            tail_capacity: 4,
        };
        for (name, (p_used, fwd, grads)) in [
            ("twell", run_on(&pr, &twell, t_cfg, &dy)),
            ("ell_tail", run_on(&pr, &ell_tail, t_cfg, &dy)),
        ] {
            let (y, l1, want) = dense(&pr, &p_used, &dy, 0.7);
            assert_close(&format!("{name} y"), &fwd.y, &y);
            assert_close(&format!("{name} l1"), &[fwd.l1_sum], &[l1]);
            assert_close(&format!("{name} dx"), &grads.dx, &want.dx);
            assert_close(&format!("{name} dWg"), &grads.d_gate, &want.d_gate);
            assert_close(&format!("{name} dWu"), &grads.d_up, &want.d_up);
            assert_close(&format!("{name} dWd^T"), &grads.d_down_t, &want.d_down_t);
        }
        assert_eq!(ell_tail.unpack(), p);
    }

    #[test]
    fn mismatched_shapes_give_typed_errors() {
        let v = vec![0.0f32; 12];
        assert_eq!(
            FfnProblem::new(&v, &v, &v[..8], &v, 3, 4, 3).unwrap_err(),
            ReferenceError::Length {
                name: "Wu",
                len: 8,
                rows: 3,
                cols: 4
            }
        );
        let pr = FfnProblem::new(&v, &v, &v, &v, 3, 4, 3).unwrap();
        let p = EllTailMatrix::pack(&v, 4, 3, EllTailConfig::TOKENS).unwrap();
        assert_eq!(
            pr.forward(&p).unwrap_err(),
            ReferenceError::PatternShape {
                name: "P",
                rows: 4,
                cols: 3,
                want_rows: 3,
                want_cols: 3
            }
        );
    }
}
