//! Tensor parallelism (Megatron style) over a group of ranks that see the same tokens.
//!
//! Each block's attention heads and FFN units are split evenly across the group: rank r holds
//! rows `[r h/t, (r+1) h/t)` of `q_proj`, `k_proj`, `v_proj`, `gate_proj`, `up_proj` and
//! `down_proj^T` (our `[H, D]` layout of the down projection), and the same block of columns
//! of `o_proj`. Embeddings, norms and the LM head are replicated. A block computes
//! `x + g(o(attn(f(norm(x)))))` and `x + g(ffn(f(norm(x))))`: `f` is the identity forward
//! with the gradient all-reduced backward, `g` the all-reduce of the partial outputs forward
//! with the identity backward, so every rank holds the same residual stream and the same
//! gradients of the replicated parameters. The sparse FFN runs on the local units; its L1
//! term in the loss is the local one (its gradient reaches only local units and, through
//! `f`, the shared input), and the activity statistics are summed over the group.
//!
//! Ranks are laid out tensor-major: world rank = `data_rank * tensor + tensor_rank`, so a
//! tensor-parallel group is `tensor` consecutive ranks (one node's GPUs, in practice).
use crate::checkpointing::{self, TrainerState};
use crate::config::{Config, TrainConfig};
use crate::optim::AdamW;
use crate::scheduler::PathScheduler;
use anyhow::{anyhow, bail, Result};
use sparse_kernels::hooks::hooked_identity;
use sparse_launch::{Collective, World};
use std::path::Path;
use std::rc::Rc;
use tch::{Kind, Tensor};

/// This rank's place in its tensor-parallel group, and the group.
pub struct TensorParallel {
    pub rank: usize,
    pub size: usize,
    group: Collective,
}

/// How a parameter is split across the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The same full tensor on every rank.
    Replicated,
    /// Split along this dimension into equal contiguous blocks, block r on rank r.
    Dim(i64),
}

/// The split of the parameter called `name` (internal names: HF's, with the down projection
/// as `mlp.down_proj.weight_t: [H, D]`).
pub fn split_of(name: &str) -> Split {
    const ROWS: [&str; 6] = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight_t",
    ];
    if ROWS.iter().any(|s| name.ends_with(s)) {
        Split::Dim(0)
    } else if name.ends_with("self_attn.o_proj.weight") {
        Split::Dim(1)
    } else {
        Split::Replicated
    }
}

impl TensorParallel {
    pub fn new(rank: usize, group: Collective) -> Rc<TensorParallel> {
        Rc::new(TensorParallel {
            rank,
            size: group.size(),
            group,
        })
    }

    pub fn group(&self) -> &Collective {
        &self.group
    }

    /// This rank's block of `full` along `split` (a view).
    pub fn local(&self, full: &Tensor, split: Split) -> Tensor {
        match split {
            Split::Replicated => full.shallow_clone(),
            Split::Dim(d) => {
                let n = full.size()[d as usize] / self.size as i64;
                full.narrow(d, self.rank as i64 * n, n)
            }
        }
    }

    /// The full tensor from every rank's block along `split` (collective over the group).
    pub fn gather(&self, local: &Tensor, split: Split) -> Result<Tensor> {
        let Split::Dim(d) = split else {
            return Ok(local.shallow_clone());
        };
        // all_gather concatenates flat blocks in rank order: gather with `d` moved first.
        let moved = local.transpose(0, d).contiguous();
        let mut shape = moved.size();
        shape[0] *= self.size as i64;
        let mut out = moved.new_zeros(shape.as_slice(), (moved.kind(), moved.device()));
        self.group
            .all_gather(&moved, &mut out)
            .map_err(|e| anyhow!("tensor-parallel gather: {e}"))?;
        Ok(out.transpose(0, d).contiguous())
    }

    /// Megatron's `f`: the identity forward; backward, the gradient summed over the group.
    pub fn copy_to_region(self: &Rc<Self>, x: &Tensor) -> Tensor {
        let me = self.clone();
        hooked_identity(
            x,
            None,
            Some(Box::new(move |g: &mut Tensor| {
                me.group.all_reduce_sum(g).map_err(|e| e.to_string())
            })),
        )
        .unwrap_or_else(|e| panic!("tensor-parallel copy: {e}"))
    }

    /// Megatron's `g`: the partial outputs summed over the group; the identity backward.
    pub fn reduce_from_region(self: &Rc<Self>, x: &Tensor) -> Tensor {
        let me = self.clone();
        hooked_identity(
            x,
            Some(Box::new(move |y: &mut Tensor| {
                me.group.all_reduce_sum(y).map_err(|e| e.to_string())
            })),
            None,
        )
        .unwrap_or_else(|e| panic!("tensor-parallel reduce: {e}"))
    }

    /// Sums a statistic (no gradient) over the group, in place.
    pub fn sum_stat(&self, t: &mut Tensor) -> Result<()> {
        self.group
            .all_reduce_sum(t)
            .map_err(|e| anyhow!("tensor-parallel statistics: {e}"))
    }
}

/// The data-parallel and tensor-parallel groups of this rank, from `parallel: {data, tensor}`.
pub struct ParallelGroups<'w> {
    world: &'w Collective,
    data_split: Option<Collective>,
    pub tensor: Option<Rc<TensorParallel>>,
}

impl<'w> ParallelGroups<'w> {
    /// Checks `parallel.data x parallel.tensor` against the job's ranks and builds the
    /// groups (collective: every rank calls it). Without tensor parallelism the data group is
    /// the whole job.
    pub fn new(cfg: &Config, world: &'w World) -> Result<ParallelGroups<'w>> {
        let everyone = world.collective();
        let (n, t) = (everyone.size(), cfg.parallel.tensor);
        if t == 0 || !n.is_multiple_of(t) {
            bail!(
                "config parallel.tensor = {t} does not divide the job's {n} rank(s) (launch a multiple of it with mpirun -n)"
            );
        }
        let d = n / t;
        if cfg.parallel.data != 0 && cfg.parallel.data != d {
            bail!(
                "config parallel.data = {} but the job has {n} rank(s) = data {d} x tensor {t} (set 0 to use every rank)",
                cfg.parallel.data
            );
        }
        if t == 1 {
            return Ok(ParallelGroups {
                world: everyone,
                data_split: None,
                tensor: None,
            });
        }
        let r = everyone.rank();
        let tensor = everyone.split(r / t, r % t)?;
        let data = everyone.split(r % t, r / t)?;
        Ok(ParallelGroups {
            world: everyone,
            data_split: Some(data),
            tensor: Some(TensorParallel::new(r % t, tensor)),
        })
    }

    /// The ranks holding the same block of the model (gradients are summed over them).
    pub fn data(&self) -> &Collective {
        self.data_split.as_ref().unwrap_or(self.world)
    }
}

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

/// `checkpointing::restore` for a rank holding blocks (`tp`; without it, the plain restore):
/// the checkpoint (always of the whole model) is read into full-size tensors, then this
/// rank's blocks are copied out, so a checkpoint resumes at any tensor-parallel width.
/// Nothing of `opt` changes on an error.
pub fn restore(
    tp: Option<&TensorParallel>,
    path: &Path,
    cfg: &Config,
    opt: &mut AdamW,
    sched: &mut PathScheduler,
    clocks: &mut [Tensor],
) -> Result<TrainerState> {
    let Some(tp) = tp else {
        return checkpointing::restore(path, cfg, opt, sched, clocks);
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
    let state = checkpointing::restore(path, cfg, &mut full, sched, &mut full_clocks)?;
    if !state.ffn_layout.is_empty() {
        bail!(
            "{}: the checkpoint's FFN was repacked (units removed); resume it with parallel.tensor = 1",
            path.display()
        );
    }
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
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::Llama;
    use tch::nn::VarStore;
    use tch::Device;

    fn cfg() -> ModelConfig {
        ModelConfig {
            vocab_size: 50,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: Some(2),
            max_seq_len: 8,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_embeddings: false,
            init_std: 0.02,
        }
    }

    /// Rank r of 2 holds exactly block r (per `split_of`) of the full model's draws.
    #[test]
    fn blocks_are_the_full_models_slices_named_by_split_of() {
        let full_vs = VarStore::new(Device::Cpu);
        tch::manual_seed(3);
        let _full = Llama::new(&full_vs, &cfg());
        let full = full_vs.variables();
        for rank in 0..2 {
            let tp = Rc::new(TensorParallel {
                rank,
                size: 2,
                group: Collective::single(1 << 20),
            });
            let vs = VarStore::new(Device::Cpu);
            tch::manual_seed(3);
            let _m = Llama::new_parallel(&vs, &cfg(), Some(tp.clone()));
            let local = vs.variables();
            assert_eq!(local.len(), full.len());
            let mut split = 0;
            for (name, f) in &full {
                let s = split_of(name);
                split += usize::from(s != Split::Replicated);
                let want = tp.local(f, s);
                assert!(local[name].equal(&want), "{name} on rank {rank}");
            }
            assert_eq!(split, 2 * 7, "q, k, v, o, gate, up, down per layer");
        }
    }
}
