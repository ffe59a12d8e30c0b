//! Per-layer FFN activity, kept on the device between logs: active units per token, the L1
//! value, and each unit's tokens since it last fired (the dead-unit clocks). Summarised at
//! each log, combined over the data-parallel ranks; the path scheduler, the dead-unit
//! re-initialisation and the repack read it.
use crate::model::LayerStats;
use serde::Serialize;
use sparse_launch::{Collective, LaunchError};
use tch::{Device, Kind, Tensor};

/// Per-layer FFN activity, accumulated on the device over a log interval.
pub struct LayerActivity {
    active_sum: Vec<Tensor>,
    active_max: Vec<Tensor>,
    l1_sum: Vec<Tensor>,
    tokens: u64,
    /// Tokens since each unit last fired, `[H]` per layer (persists across intervals).
    pub tokens_since_fired: Vec<Tensor>,
    step_fired: Vec<Option<Tensor>>,
}

/// The running sums of an unfinished log interval (global over ranks).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct IntervalActivity {
    pub active_sum: Vec<i64>,
    pub active_max: Vec<i64>,
    pub l1_sum: Vec<f64>,
    pub tokens: u64,
}

/// What a layer did over a log interval.
#[derive(Clone, Debug, Serialize)]
pub struct LayerSummary {
    pub nnz_mean: f64,
    pub nnz_max: i64,
    pub sparsity: f64,
    pub l1: f64,
    pub dead: i64,
}

impl LayerActivity {
    pub fn new(layers: usize, hidden: usize, device: Device) -> Self {
        let z = || Tensor::zeros([], (Kind::Int64, device));
        LayerActivity {
            active_sum: (0..layers).map(|_| z()).collect(),
            active_max: (0..layers).map(|_| z()).collect(),
            l1_sum: (0..layers)
                .map(|_| Tensor::zeros([], (Kind::Float, device)))
                .collect(),
            tokens: 0,
            tokens_since_fired: (0..layers)
                .map(|_| Tensor::zeros([hidden as i64], (Kind::Int64, device)))
                .collect(),
            step_fired: (0..layers).map(|_| None).collect(),
        }
    }

    /// Adds one micro-batch's statistics (no host sync).
    pub fn add(&mut self, stats: &[LayerStats]) {
        for (l, s) in stats.iter().enumerate() {
            self.active_sum[l] += s.active_per_token.sum(Kind::Int64);
            self.active_max[l] = self.active_max[l].maximum(&s.active_per_token.max());
            self.l1_sum[l] += &s.l1_sum;
            let fired = s.active_per_unit.gt(0);
            self.step_fired[l] = Some(match self.step_fired[l].take() {
                None => fired,
                Some(f) => f.logical_or(&fired),
            });
        }
        if let Some(s) = stats.first() {
            self.tokens += s.active_per_token.size()[0] as u64;
        }
    }

    /// Ends an optimizer step covering `step_tokens` tokens: updates the dead-unit clocks.
    pub fn end_step(&mut self, step_tokens: u64) {
        for l in 0..self.step_fired.len() {
            if let Some(fired) = self.step_fired[l].take() {
                let advanced = &self.tokens_since_fired[l] + step_tokens as i64;
                self.tokens_since_fired[l] =
                    advanced.where_self(&fired.logical_not(), &advanced.zeros_like());
            }
        }
    }

    /// The interval's running sums, combined over the data-parallel ranks (all take part),
    /// for a checkpoint: a run resumed mid-interval then takes the same path decisions.
    pub fn export_interval(&self, dp: &Collective) -> Result<IntervalActivity, LaunchError> {
        let mut sums = Tensor::cat(
            &[
                Tensor::stack(&self.active_sum, 0).to_kind(Kind::Double),
                Tensor::stack(&self.l1_sum, 0).to_kind(Kind::Double),
            ],
            0,
        );
        dp.all_reduce_sum(&mut sums)?;
        let v: Vec<f64> = Vec::try_from(sums.to_device(Device::Cpu)).expect("f64 sums");
        let layers = self.active_sum.len();
        Ok(IntervalActivity {
            active_sum: v[..layers].iter().map(|&x| x as i64).collect(),
            active_max: self
                .active_max
                .iter()
                .map(|m| dp.all_reduce_max_f64(m.int64_value(&[]) as f64) as i64)
                .collect(),
            l1_sum: v[layers..].to_vec(),
            tokens: self.tokens * dp.size() as u64,
        })
    }

    /// Restores an interval saved by [`LayerActivity::export_interval`]: rank 0 holds the
    /// sums, every rank its share of the tokens.
    pub fn import_interval(&mut self, saved: &IntervalActivity, dp: &Collective) {
        let main = dp.rank() == 0;
        for l in 0..self.active_sum.len() {
            let device = self.active_sum[l].device();
            let (sum, l1) = if main {
                (saved.active_sum[l], saved.l1_sum[l])
            } else {
                (0, 0.0)
            };
            self.active_sum[l] = Tensor::from(sum).to_device(device);
            self.active_max[l] = Tensor::from(saved.active_max[l]).to_device(device);
            self.l1_sum[l] = Tensor::from(l1 as f32).to_device(device);
        }
        self.tokens = saved.tokens / dp.size() as u64;
    }

    /// Combines this step's "which units fired" over the data-parallel ranks, so every rank
    /// keeps the same dead-unit clocks.
    pub fn reduce_step(&mut self, dp: &Collective) -> Result<(), LaunchError> {
        if dp.size() == 1 {
            return Ok(());
        }
        for f in self.step_fired.iter_mut().flatten() {
            let mut n = f.to_kind(Kind::Int64);
            dp.all_reduce_sum(&mut n)?;
            *f = n.gt(0);
        }
        Ok(())
    }

    /// Reads and resets the interval's statistics, combined over the data-parallel ranks
    /// (one host sync).
    pub fn summarize(
        &mut self,
        hidden: usize,
        tokens_until_dead: u64,
        dp: &Collective,
        tp: Option<&Collective>,
    ) -> Result<Vec<LayerSummary>, LaunchError> {
        let mut sums = Tensor::stack(&self.active_sum, 0).to_kind(Kind::Double);
        let l1 = Tensor::stack(&self.l1_sum, 0).to_kind(Kind::Double);
        let mut both = Tensor::cat(&[sums.shallow_clone(), l1], 0);
        dp.all_reduce_sum(&mut both)?;
        sums = both.to_device(tch::Device::Cpu);
        let layers = self.active_sum.len() as i64;
        let tokens = (self.tokens * dp.size() as u64).max(1) as f64;
        // Dead units of the local block of units, summed over a tensor-parallel group.
        let mut dead = Tensor::stack(
            &self
                .tokens_since_fired
                .iter()
                .map(|c| c.ge(tokens_until_dead as i64).sum(Kind::Int64))
                .collect::<Vec<_>>(),
            0,
        );
        if let Some(tp) = tp {
            tp.all_reduce_sum(&mut dead)?;
        }
        let dead = dead.to_device(Device::Cpu);
        let out = (0..layers)
            .map(|l| {
                let nnz_mean = sums.double_value(&[l]) / tokens;
                LayerSummary {
                    nnz_mean,
                    nnz_max: dp
                        .all_reduce_max_f64(self.active_max[l as usize].int64_value(&[]) as f64)
                        as i64,
                    sparsity: 1.0 - nnz_mean / hidden as f64,
                    l1: sums.double_value(&[layers + l]) / tokens,
                    dead: dead.int64_value(&[l]),
                }
            })
            .collect();
        for t in self.active_sum.iter_mut().chain(self.active_max.iter_mut()) {
            let _ = t.zero_();
        }
        for t in &mut self.l1_sum {
            let _ = t.zero_();
        }
        self.tokens = 0;
        Ok(out)
    }
}
