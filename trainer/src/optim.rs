//! AdamW on tch tensors (its state is ours, so checkpoints hold it exactly), the cosine LR
//! schedule with linear warm-up, the lambda ramp, and global-norm gradient clipping.
use crate::config::{SparsityConfig, TrainConfig};
use tch::{Kind, Tensor};

/// One parameter with its AdamW moments.
pub struct ParamState {
    pub name: String,
    pub param: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub decay: bool,
}

pub struct AdamW {
    pub params: Vec<ParamState>,
    /// Optimizer steps taken (bias correction uses it).
    pub step: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    /// Parameters sorted by name (a stable order on every rank). Norm weights (1-D) are
    /// exempt from weight decay.
    pub fn new(mut named: Vec<(String, Tensor)>, cfg: &TrainConfig) -> AdamW {
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params = named
            .into_iter()
            .map(|(name, param)| {
                let decay = param.dim() >= 2;
                ParamState {
                    exp_avg: param.zeros_like(),
                    exp_avg_sq: param.zeros_like(),
                    name,
                    param,
                    decay,
                }
            })
            .collect();
        AdamW {
            params,
            step: 0,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        }
    }

    /// One update with learning rate `lr` from the gradients in `.grad()`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.param.grad();
                if !g.defined() {
                    continue;
                }
                if p.decay && self.weight_decay > 0.0 {
                    let _ = p.param.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = p.exp_avg.lerp_(&g, 1.0 - self.beta1);
                let _ = p
                    .exp_avg_sq
                    .g_mul_scalar_(self.beta2)
                    .addcmul_(&g, &g.g_mul_scalar(1.0 - self.beta2));
                let denom = (p.exp_avg_sq.g_div_scalar(bc2))
                    .sqrt_()
                    .g_add_scalar_(self.eps);
                let _ = p.param.addcdiv_(&p.exp_avg.g_mul_scalar(-lr / bc1), &denom);
            }
        });
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.param.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Global L2 norm of all gradients (one device scalar).
    pub fn grad_norm(&self) -> Tensor {
        let sq: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.param.grad())
            .filter(|g| g.defined())
            .map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float))
            .collect();
        Tensor::stack(&sq, 0).sum(Kind::Float).sqrt()
    }

    /// Scales gradients so their global norm is at most `max_norm`.
    pub fn clip(&mut self, norm: f64, max_norm: f64) {
        if max_norm <= 0.0 || norm <= max_norm {
            return;
        }
        let scale = max_norm / (norm + 1e-6);
        tch::no_grad(|| {
            for p in &mut self.params {
                let mut g = p.param.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(scale);
                }
            }
        });
    }
}

/// Learning rate at optimizer step `step` (0-based): linear warm-up, then cosine to
/// `lr * min_lr_ratio` at `max_steps`.
pub fn learning_rate(cfg: &TrainConfig, step: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = cfg.max_steps.saturating_sub(cfg.warmup_steps).max(1);
    let progress = ((step - cfg.warmup_steps) as f64 / span as f64).min(1.0);
    let min_lr = cfg.lr * cfg.min_lr_ratio;
    min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_warms_up_then_decays_to_min() {
        let cfg = TrainConfig {
            lr: 1.0,
            warmup_steps: 10,
            max_steps: 110,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert!((learning_rate(&cfg, 0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&cfg, 9) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&cfg, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&cfg, 60) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&cfg, 110) - 0.1).abs() < 1e-12);
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

    #[test]
    fn adamw_matches_closed_form_first_step() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let cfg = TrainConfig {
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], &cfg);
        (&p * Tensor::from_slice(&[3.0f32, -4.0]))
            .sum(Kind::Float)
            .backward();
        opt.step(0.1);
        // First step of Adam moves each weight by lr * sign(grad) (up to eps).
        let v: Vec<f32> = Vec::try_from(p.detach()).unwrap();
        assert!(
            (v[0] - 0.9).abs() < 1e-5 && (v[1] + 1.9).abs() < 1e-5,
            "{v:?}"
        );
    }
}
