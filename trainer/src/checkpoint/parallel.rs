//! Checkpoints of a tensor-parallel run: always of the whole model, whatever the layout.
//! Data-parallel group 0 gathers every rank's blocks into full tensors for the writer
//! ([`gather_full`]); a restore reads full tensors and copies each rank's blocks out
//! ([`restore`]), so a checkpoint resumes at any tensor-parallel width.
use super::state::{self, TrainerState};
use crate::config::{Config, TrainConfig};
use crate::model::parallel::{split_of, Split, TensorParallel};
use crate::optim::AdamW;
use crate::sparsity::paths::PathScheduler;
use anyhow::{bail, Result};
use std::path::Path;
use tch::{Kind, Tensor};

/// The full optimizer (parameters and moments) and dead-unit clocks from every rank's
/// blocks, for one checkpoint of the whole model (collective over the group).
pub fn gather_full(
    tp: &TensorParallel,
    opt: &AdamW,
    clocks: &[Tensor],
    train: &TrainConfig,
) -> Result<(AdamW, Vec<Tensor>)> {
    tch::no_grad(|| {
        let named = opt
            .params
            .iter()
            .map(|p| {
                Ok((
                    p.name.clone(),
                    tp.gather(&p.param.detach(), split_of(&p.name))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut full = AdamW::new(named, train);
        full.step = opt.step;
        // Both are sorted by name, so they pair up.
        for (f, p) in full.params.iter_mut().zip(&opt.params) {
            let split = split_of(&p.name);
            f.exp_avg = tp.gather(&p.exp_avg, split)?;
            f.exp_avg_sq = tp.gather(&p.exp_avg_sq, split)?;
        }
        let clocks = clocks
            .iter()
            .map(|c| tp.gather(c, Split::Dim(0)))
            .collect::<Result<Vec<_>>>()?;
        Ok((full, clocks))
    })
}

/// [`state::restore`] for a rank holding blocks (`tp`; without it, the plain restore): the
/// checkpoint (always of the whole model) is read into full-size tensors, then this rank's
/// blocks are copied out. Nothing of `opt` or `sched` changes on an error.
pub fn restore(
    tp: Option<&TensorParallel>,
    path: &Path,
    cfg: &Config,
    opt: &mut AdamW,
    sched: &mut PathScheduler,
    clocks: &mut [Tensor],
) -> Result<TrainerState> {
    let Some(tp) = tp else {
        return state::restore(path, cfg, opt, sched, clocks);
    };
    let t = tp.size as i64;
    let named = opt
        .params
        .iter()
        .map(|p| {
            let mut shape = p.param.size();
            if let Split::Dim(d) = split_of(&p.name) {
                shape[d as usize] *= t;
            }
            (
                p.name.clone(),
                p.param
                    .new_zeros(shape.as_slice(), (Kind::Float, p.param.device())),
            )
        })
        .collect();
    let mut full = AdamW::new(named, &cfg.train);
    let mut full_clocks: Vec<Tensor> = clocks
        .iter()
        .map(|c| c.new_zeros([c.size()[0] * t], (c.kind(), c.device())))
        .collect();
    let verified = state::verify(path, cfg, &full)?;
    if !verified.state.ffn_layout.is_empty() {
        bail!(
            "{}: the checkpoint's FFN was repacked (units removed); resume it with parallel.tensor = 1",
            path.display()
        );
    }
    let state = verified.apply(&mut full, sched, &mut full_clocks);
    tch::no_grad(|| {
        for (p, f) in opt.params.iter_mut().zip(&full.params) {
            let split = split_of(&p.name);
            p.param.copy_(&tp.local(&f.param, split));
            p.exp_avg.copy_(&tp.local(&f.exp_avg, split));
            p.exp_avg_sq.copy_(&tp.local(&f.exp_avg_sq, split));
        }
        for (c, f) in clocks.iter_mut().zip(&full_clocks) {
            *c = tp.local(f, Split::Dim(0)).contiguous();
        }
    });
    opt.step = full.step;
    Ok(state)
}
