//! One step's micro-batches: forward and backward of this rank's share of the global batch,
//! with the hybrid FFN's pool checks deferred to the end of the step and the micro-batches
//! run again when a pool overflowed (`DeferredChecks`).
use super::Trainer;
use crate::model::LayerStats;
use anyhow::{bail, Result};
use sparse_kernels::cuda::DeferredChecks;
use tch::{Kind, Tensor};

/// Runs of one step's micro-batches before an overflowing hybrid pool is an error (each
/// overflow grows the pool to what the kernels asked for, with headroom).
const MAX_POOL_ATTEMPTS: usize = 4;

impl Trainer<'_> {
    /// Forward and backward of this rank's micro-batches of the step (the gradients
    /// accumulated into the masters' `.grad`, the activity statistics recorded); returns the
    /// summed cross-entropy and L1 terms (device scalars). On CUDA the hybrid FFN's pool checks
    /// wait for the end of the micro-batches ([`DeferredChecks`]): when any rank's pool
    /// overflowed, the gradients are dropped, the pools grow and the micro-batches run again.
    pub(super) fn micro_batches(&mut self, step: usize, lambda: f64) -> Result<(Tensor, Tensor)> {
        let device = self.device;
        for attempt in 1.. {
            let checks = device
                .is_cuda()
                .then(|| DeferredChecks::begin(device))
                .transpose()?;
            let (ce, l1, layers) = self.run_micro_batches(lambda)?;
            // Every rank has the same kind of device: all of them take this branch or none.
            let (any_rank, grown) = match checks {
                Some(c) => {
                    let settled = c.finish()?;
                    let any_rank = self.world.collective().any_rank_flag(settled.overflowed);
                    (any_rank, settled.grown)
                }
                None => (false, 0),
            };
            if !any_rank {
                for stats in &layers {
                    self.activity.add(stats);
                }
                return Ok((ce, l1));
            }
            self.opt.zero_grad();
            self.pool_reruns += 1;
            if attempt >= MAX_POOL_ATTEMPTS {
                bail!("step {step}: the hybrid FFN's active pool overflowed {attempt} times in a row (it grows each time): report this with the config");
            }
            self.log.line(&format!(
                "step {step}: a hybrid FFN pool overflowed ({grown} shapes grew on this rank); step re-run ({} re-runs so far)",
                self.pool_reruns
            ));
        }
        unreachable!("the loop returns or fails")
    }

    /// One pass over this rank's micro-batches: summed cross-entropy and L1 terms, and each
    /// micro-batch's per-layer statistics.
    fn run_micro_batches(&mut self, lambda: f64) -> Result<(Tensor, Tensor, Vec<Vec<LayerStats>>)> {
        let t = &self.cfg.train;
        let dp = self.groups.data();
        let device = self.device;
        let paths = self.sched.paths().to_vec();
        let mut ce_acc = Tensor::zeros([], (Kind::Float, device));
        let mut l1_acc = Tensor::zeros([], (Kind::Float, device));
        let mut layers = Vec::with_capacity(self.accum);
        // The step's compute-dtype weights: one cast per optimizer update, not per micro-batch.
        self.runner.begin_step(&self.model, lambda);
        let captures = self.runner.captures();
        for micro in 0..self.accum {
            // Rank r's micro-batches are its own contiguous block of the global batch.
            let first =
                self.cursor + ((dp.rank() * self.accum + micro) * t.micro_batch_size) as u64;
            let batch = self.loader.sequences(first, t.micro_batch_size)?;
            let out = self
                .runner
                .run(&self.model, &batch, &paths, self.step_tokens)?;
            ce_acc += out.ce_sum;
            l1_acc += out.l1_sum;
            layers.push(out.layers);
        }
        if self.runner.captures() > captures {
            self.log.line(&format!(
                "the micro-batch was captured as a CUDA graph ({} captures so far)",
                self.runner.captures()
            ));
        }
        Ok((ce_acc, l1_acc, layers))
    }
}
