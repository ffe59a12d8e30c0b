//! Checkpoints at any tensor-parallel layout: always of the whole model. Data-parallel group
//! 0 gathers every rank's blocks into full tensors for the writer ([`gather_full`]); the
//! restore of a run ([`restore`], with or without tensor parallelism) reads full tensors and
//! copies each rank's blocks out, so a checkpoint resumes at any tensor-parallel width.
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

/// Restores parameters, AdamW state, dead-unit clocks and scheduler from the checkpoint at
/// `path` after checking it fits this run ([`state::verify`]); nothing changes on an error.
/// A rank holding blocks (`tp`) reads the checkpoint (always of the whole model) into
/// full-size tensors, then copies its blocks out.
pub fn restore(
    tp: Option<&TensorParallel>,
    path: &Path,
    cfg: &Config,
    opt: &mut AdamW,
    sched: &mut PathScheduler,
    clocks: &mut [Tensor],
) -> Result<TrainerState> {
    let Some(tp) = tp else {
        return Ok(state::verify(path, cfg, opt)?.apply(opt, sched, clocks));
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

#[cfg(test)]
mod tests {
    use super::super::state::snapshot;
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::llama::seeded_model;
    use crate::sparsity::repack;
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    fn config() -> Config {
        Config {
            model: ModelConfig::tiny(),
            train: Default::default(),
            sparsity: Default::default(),
            data: Default::default(),
            parallel: Default::default(),
            checkpoint: Default::default(),
        }
    }

    fn optimizer(cfg: &Config, seed: i64) -> (VarStore, AdamW) {
        let (vs, _model) = seeded_model(seed, &cfg.model);
        let opt = AdamW::new(vs.variables().into_iter().collect(), &cfg.train);
        (vs, opt)
    }

    fn state(cfg: &Config, sched: &PathScheduler, ffn_layout: Vec<Vec<i64>>) -> TrainerState {
        TrainerState {
            step: 7,
            cursor: 28,
            tokens_seen: 0,
            skipped_total: 0,
            seed: 0,
            l1_coeff: 0.0,
            ffn_paths: vec!["hybrid".into(); cfg.model.num_layers],
            next_path_decision: sched.next_decision(),
            world_size: 1,
            config: cfg.clone(),
            interval: Default::default(),
            ffn_layout,
        }
    }

    /// A checkpoint whose state needs a repack (layer 1 keeps 20 of 24 units) but holds one
    /// misshapen moment: the resume fails and leaves optimizer, clocks and scheduler as
    /// they were (no repack applied, no value copied).
    #[test]
    fn failed_resume_of_a_repacked_checkpoint_changes_nothing() {
        let cfg = config();
        let hidden = cfg.model.intermediate_size as i64;
        let sched = PathScheduler::new(&cfg.sparsity, cfg.model.num_layers).unwrap();
        let (_saved_vs, mut saved) = optimizer(&cfg, 1);
        let kept: Vec<i64> = (0..20).collect();
        repack::apply_keep(&mut saved, 1, &Tensor::from_slice(&kept));
        let layout = vec![(0..hidden).collect(), kept];
        let clocks: Vec<Tensor> = [hidden, 20]
            .iter()
            .map(|&h| Tensor::zeros([h], (Kind::Int64, Device::Cpu)))
            .collect();
        let mut ckpt = snapshot(&cfg, &saved, &state(&cfg, &sched, layout), &clocks).unwrap();
        let bad = "exp_avg.model.layers.1.mlp.up_proj.weight";
        let moment = ckpt.optimizer.get_mut(bad).unwrap();
        let d = cfg.model.hidden_size;
        moment.shape = vec![19, d];
        moment.data.truncate(19 * d * 4);
        let run = tempfile::tempdir().unwrap();
        let dir = sparse_checkpoints::save(run.path(), 7, &ckpt, 0).unwrap();

        let (_vs, mut opt) = optimizer(&cfg, 2);
        let before: Vec<Tensor> = opt.params.iter().map(|p| p.param.copy()).collect();
        let moments: Vec<Tensor> = opt.params.iter().map(|p| p.exp_avg.copy()).collect();
        let mut sched2 = PathScheduler::new(&cfg.sparsity, cfg.model.num_layers).unwrap();
        let mut clocks2: Vec<Tensor> = (0..2)
            .map(|_| Tensor::zeros([hidden], (Kind::Int64, Device::Cpu)))
            .collect();
        let err = restore(None, &dir, &cfg, &mut opt, &mut sched2, &mut clocks2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("resuming from"), "{err}");
        for ((p, b), m) in opt.params.iter().zip(&before).zip(&moments) {
            assert!(p.param.equal(b), "{} changed", p.name);
            assert!(p.exp_avg.equal(m), "moment of {} changed", p.name);
        }
        assert_eq!(opt.step, 0);
        assert!(clocks2.iter().all(|c| c.size() == [hidden]));
        assert_eq!(sched2.paths(), sched.paths());
        // The same checkpoint with the moment intact resumes, repacked.
        let ckpt_ok = snapshot(
            &cfg,
            &saved,
            &state(&cfg, &sched, vec![(0..hidden).collect(), (0..20).collect()]),
            &clocks,
        )
        .unwrap();
        let dir = sparse_checkpoints::save(run.path(), 8, &ckpt_ok, 0).unwrap();
        let restored = restore(None, &dir, &cfg, &mut opt, &mut sched2, &mut clocks2).unwrap();
        assert_eq!(restored.step, 7);
        let up = opt.param("model.layers.1.mlp.up_proj.weight").unwrap();
        assert_eq!(up.param.size(), [20, d as i64]);
        assert_eq!(clocks2[1].size(), [20]);
    }
}
