//! The sparsity schedule: the L1 coefficient lambda per step ([`l1_coeff`]) and the
//! per-layer FFN path choice from measured activity ([`PathScheduler`]).
//!
//! `sparsity.ffn_path` fixes one path for every layer, or `auto` starts dense and, at most
//! every `switch_period` optimizer steps, moves each layer to the hybrid path when its mean
//! active units per token (over the last log interval, all tokens of the global batch) is
//! below `l0_cutoff`, and back to dense when it rises above it. The statistics are global, so
//! every rank takes the same decision.
use super::activity::LayerSummary;
use crate::config::SparsityConfig;
use anyhow::Result;
use sparse_kernels::FfnPath;

/// lambda at optimizer step `step`: 0 before `l1_start_step`, linear to `l1_coeff` at
/// `l1_end_step`, constant after.
pub fn l1_coeff(cfg: &SparsityConfig, step: usize) -> f64 {
    if step < cfg.l1_start_step {
        0.0
    } else if step >= cfg.l1_end_step {
        cfg.l1_coeff
    } else {
        let span = (cfg.l1_end_step - cfg.l1_start_step) as f64;
        cfg.l1_coeff * (step - cfg.l1_start_step) as f64 / span
    }
}

pub struct PathScheduler {
    auto: bool,
    cutoff: f64,
    period: usize,
    next_decision: usize,
    paths: Vec<FfnPath>,
}

impl PathScheduler {
    pub fn new(cfg: &SparsityConfig, layers: usize) -> Result<Self> {
        let auto = cfg.ffn_path == "auto";
        let fixed = if auto {
            FfnPath::Dense
        } else {
            cfg.ffn_path.parse().map_err(anyhow::Error::msg)?
        };
        Ok(PathScheduler {
            auto,
            cutoff: cfg.l0_cutoff,
            period: cfg.switch_period,
            next_decision: cfg.switch_period,
            paths: vec![fixed; layers],
        })
    }

    pub fn paths(&self) -> &[FfnPath] {
        &self.paths
    }

    /// Restores the per-layer paths (resume).
    pub fn set_paths(&mut self, paths: Vec<FfnPath>, next_decision: usize) {
        self.paths = paths;
        self.next_decision = next_decision;
    }

    pub fn next_decision(&self) -> usize {
        self.next_decision
    }

    /// Feeds the statistics of the interval that ended at optimizer step `step` (0-based).
    pub fn observe(&mut self, step: usize, layers: &[LayerSummary]) {
        if !self.auto || step + 1 < self.next_decision {
            return;
        }
        for (p, l) in self.paths.iter_mut().zip(layers) {
            *p = if l.nnz_mean < self.cutoff {
                FfnPath::Hybrid
            } else {
                FfnPath::Dense
            };
        }
        self.next_decision = step + 1 + self.period;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(nnz: f64) -> LayerSummary {
        LayerSummary {
            nnz_mean: nnz,
            nnz_max: 0,
            sparsity: 0.0,
            l1: 0.0,
            dead: 0,
        }
    }

    #[test]
    fn auto_switches_each_layer_on_its_own_cutoff() {
        let cfg = SparsityConfig {
            ffn_path: "auto".into(),
            l0_cutoff: 50.0,
            switch_period: 10,
            ..Default::default()
        };
        let mut s = PathScheduler::new(&cfg, 2).unwrap();
        assert_eq!(s.paths(), &[FfnPath::Dense, FfnPath::Dense]);
        s.observe(4, &[summary(10.0), summary(100.0)]);
        assert_eq!(
            s.paths(),
            &[FfnPath::Dense, FfnPath::Dense],
            "before the first period"
        );
        s.observe(9, &[summary(10.0), summary(100.0)]);
        assert_eq!(s.paths(), &[FfnPath::Hybrid, FfnPath::Dense]);
        s.observe(19, &[summary(60.0), summary(20.0)]);
        assert_eq!(s.paths(), &[FfnPath::Dense, FfnPath::Hybrid]);
    }

    #[test]
    fn l1_ramp_is_linear_between_start_and_end() {
        let cfg = SparsityConfig {
            l1_coeff: 2.0,
            l1_start_step: 10,
            l1_end_step: 20,
            ..Default::default()
        };
        assert_eq!(l1_coeff(&cfg, 5), 0.0);
        assert_eq!(l1_coeff(&cfg, 15), 1.0);
        assert_eq!(l1_coeff(&cfg, 25), 2.0);
    }
}
