//! The CPU arm: the reference of [`crate::format::reference`] on the packed gate
//! activations, TwELL or ELL + tail, forward and backward (f32 math).
use tch::{Kind, Tensor};

use super::{CpuFormat, Inputs};
use crate::format::{EllTailMatrix, FfnProblem, SparseRows, TwellMatrix};
use crate::types::{FfnError, SparseFfnConfig};

/// The packed `P = relu(x Wg^T): [N, H]` of a CPU forward.
pub(super) enum Pattern {
    Twell(TwellMatrix),
    EllTail(EllTailMatrix),
}

/// A tensor as a row-major f32 vector.
fn to_vec(t: &Tensor) -> Vec<f32> {
    let t = t.to_kind(Kind::Float).contiguous();
    let n = t.numel();
    let mut v = vec![0.0f32; n];
    t.copy_data(&mut v, n);
    v
}

fn to_tensor(v: &[f32], shape: [i64; 2], kind: Kind) -> Tensor {
    Tensor::from_slice(v).view(shape).to_kind(kind)
}

/// `x, Wg, Wu, Wd^T` as f32 vectors, and `(N, D, H)`.
struct Dense {
    x: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down_t: Vec<f32>,
    dims: (usize, usize, usize),
}

impl Dense {
    fn of(t: &Inputs) -> Result<Self, FfnError> {
        let (n, d, h) = t.dims()?;
        Ok(Dense {
            x: to_vec(t.x),
            gate: to_vec(t.gate),
            up: to_vec(t.up),
            down_t: to_vec(t.down_t),
            dims: (n as usize, d as usize, h as usize),
        })
    }

    fn problem(&self) -> Result<FfnProblem<'_>, FfnError> {
        let (n, d, h) = self.dims;
        Ok(FfnProblem::new(
            &self.x,
            &self.gate,
            &self.up,
            &self.down_t,
            n,
            d,
            h,
        )?)
    }
}

pub(super) fn forward(
    format: CpuFormat,
    config: &SparseFfnConfig,
    t: &Inputs,
) -> Result<([Tensor; 5], Pattern), FfnError> {
    let (n, d, _) = t.dims()?;
    let dense = Dense::of(t)?;
    let (nu, _, hu) = dense.dims;
    let problem = dense.problem()?;
    // The gate GEMM through tch (as the dense oracle computes it), not the reference's loop.
    let xf = t.x.to_kind(Kind::Float);
    let p_dense = to_vec(&xf.matmul(&t.gate.to_kind(Kind::Float).tr()).relu());
    let (pattern, overflow) = match format {
        CpuFormat::Twell => {
            let m = TwellMatrix::pack(&p_dense, nu, hu, config.twell)?;
            let overflow = [m.stats().overflow_rows as i64, 0];
            (Pattern::Twell(m), overflow)
        }
        CpuFormat::EllTail => {
            let m = EllTailMatrix::pack(&p_dense, nu, hu, config.ell_tail)?;
            let s = m.stats();
            let overflow = [s.tail_rows as i64, s.rows_beyond_tail_capacity as i64];
            (Pattern::EllTail(m), overflow)
        }
    };
    let r = match &pattern {
        Pattern::Twell(m) => problem.forward(m)?,
        Pattern::EllTail(m) => problem.forward(m)?,
    };
    let outs = [
        to_tensor(&r.y, [n, d], t.x.kind()),
        Tensor::from(r.l1_sum),
        Tensor::from_slice(&r.active_per_token),
        Tensor::from_slice(&r.active_per_unit),
        Tensor::from_slice(&overflow),
    ];
    Ok((outs, pattern))
}

fn backward_on<S: SparseRows>(
    config: &SparseFfnConfig,
    p: &S,
    t: &Inputs,
    dy: &Tensor,
    dl1: &Tensor,
) -> Result<[Tensor; 4], FfnError> {
    let (n, d, h) = t.dims()?;
    let dense = Dense::of(t)?;
    let problem = dense.problem()?;
    let p_t = EllTailMatrix::transpose_of(p, config.ell_tail_transposed)?;
    let dl1 = f32::try_from(dl1.to_kind(Kind::Float))?;
    let g = problem.backward(p, &p_t, &to_vec(dy), dl1)?;
    Ok([
        to_tensor(&g.dx, [n, d], t.x.kind()),
        to_tensor(&g.d_gate, [h, d], t.gate.kind()),
        to_tensor(&g.d_up, [h, d], t.up.kind()),
        to_tensor(&g.d_down_t, [h, d], t.down_t.kind()),
    ])
}

pub(super) fn backward(
    config: &SparseFfnConfig,
    pattern: &Pattern,
    t: &Inputs,
    dy: &Tensor,
    dl1: &Tensor,
) -> Result<[Tensor; 4], FfnError> {
    match pattern {
        Pattern::Twell(m) => backward_on(config, m, t, dy, dl1),
        Pattern::EllTail(m) => backward_on(config, m, t, dy, dl1),
    }
}
