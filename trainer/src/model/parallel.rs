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
use crate::config::Config;
use anyhow::{anyhow, bail, Result};
use sparse_kernels::hooks::hooked_identity;
use sparse_launch::{Collective, World};
use std::rc::Rc;
use tch::Tensor;

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

    /// Rank `rank` of a group of `size` whose collectives run in this process alone: for
    /// checks of the block layout, which call none of them.
    pub fn detached(rank: usize, size: usize) -> Rc<TensorParallel> {
        Rc::new(TensorParallel {
            rank,
            size,
            group: Collective::single(1 << 20),
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
