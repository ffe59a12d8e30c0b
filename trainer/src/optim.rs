//! AdamW on tch tensors (its state is ours, so checkpoints hold it exactly), the cosine LR
//! schedule with linear warm-up, global-norm gradient clipping, and ZeRO-1 sharding of the
//! moments over the data-parallel ranks.
use crate::config::TrainConfig;
use sparse_launch::{Collective, LaunchError};
use tch::{Kind, Tensor};

/// One parameter with its AdamW moments.
pub struct ParamState {
    pub name: String,
    pub param: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub decay: bool,
    /// Weight of this tensor's squared gradient in the global norm: 1, or 1/t for a tensor
    /// replicated on the t ranks of a tensor-parallel group (whose norms are then summed).
    pub norm_share: f64,
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
                    norm_share: 1.0,
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
        let h = self.hyper(lr);
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.param.grad();
                if !g.defined() {
                    continue;
                }
                let decay = if p.decay { Decay::All } else { Decay::None };
                adamw_update(
                    &mut p.param,
                    &g,
                    &mut p.exp_avg,
                    &mut p.exp_avg_sq,
                    &h,
                    decay,
                );
            }
        });
    }

    fn hyper(&self, lr: f64) -> Hyper {
        Hyper {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            bc1: 1.0 - self.beta1.powi(self.step as i32),
            bc2: 1.0 - self.beta2.powi(self.step as i32),
        }
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
        self.grad_sq().sqrt()
    }

    /// The parameter called `name`, with its moments.
    pub fn param(&self, name: &str) -> Option<&ParamState> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Sum of the squared gradients, each tensor weighted by its `norm_share` (one device
    /// scalar; summed over a tensor-parallel group it is the squared global norm).
    pub fn grad_sq(&self) -> Tensor {
        let sq: Vec<Tensor> = self
            .params
            .iter()
            .filter_map(|p| {
                let g = p.param.grad();
                g.defined()
                    .then(|| g.to_kind(Kind::Float).square().sum(Kind::Float) * p.norm_share)
            })
            .collect();
        Tensor::stack(&sq, 0).sum(Kind::Float)
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

/// Hyper-parameters of one AdamW update (bias corrections for the current step).
struct Hyper {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    bc1: f64,
    bc2: f64,
}

/// Which elements of a tensor weight decay applies to.
enum Decay<'a> {
    All,
    None,
    /// 1 where it applies, 0 where not (a ZeRO-1 shard spans several parameters).
    Mask(&'a Tensor),
}

/// The AdamW update of one tensor, in place: decoupled decay, moments, bias-corrected step.
fn adamw_update(
    p: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    h: &Hyper,
    decay: Decay,
) {
    if h.weight_decay > 0.0 {
        match decay {
            Decay::All => {
                let _ = p.g_mul_scalar_(1.0 - h.lr * h.weight_decay);
            }
            Decay::Mask(mask) => {
                let _ = p.g_mul_(&(mask * (-h.lr * h.weight_decay) + 1.0));
            }
            Decay::None => {}
        }
    }
    let _ = m.lerp_(g, 1.0 - h.beta1);
    let _ = v
        .g_mul_scalar_(h.beta2)
        .addcmul_(g, &g.g_mul_scalar(1.0 - h.beta2));
    let denom = v.g_div_scalar(h.bc2).sqrt_().g_add_scalar_(h.eps);
    let _ = p.addcdiv_(&m.g_mul_scalar(-h.lr / h.bc1), &denom);
}

/// ZeRO-1: each data-parallel rank keeps the AdamW moments of one contiguous block of the
/// flattened parameters (in [`AdamW::params`] order), gets that block of the summed
/// gradients by reduce-scatter, updates it, and all-gathers the new parameters.
pub struct Zero1 {
    numels: Vec<i64>,
    /// Elements per rank (the flat length padded to a multiple of the ranks).
    shard: i64,
    offset: i64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay_mask: Tensor,
    /// Each element's `norm_share`.
    norm_mask: Tensor,
    grad_shard: Tensor,
}

fn flat(parts: &[Tensor], padded: i64) -> Tensor {
    let flat = Tensor::cat(
        &parts
            .iter()
            .map(|t| t.to_kind(Kind::Float).reshape([-1]))
            .collect::<Vec<_>>(),
        0,
    );
    let pad = padded - flat.size()[0];
    if pad > 0 {
        Tensor::cat(
            &[
                flat.shallow_clone(),
                flat.zeros_like().narrow(0, 0, 1).expand([pad], false),
            ],
            0,
        )
    } else {
        flat
    }
}

impl Zero1 {
    /// Takes this rank's block of the moments `opt` holds (zeros, or restored ones).
    pub fn new(opt: &AdamW, dp: &Collective) -> Zero1 {
        let numels: Vec<i64> = opt.params.iter().map(|p| p.param.numel() as i64).collect();
        let total: i64 = numels.iter().sum();
        let ranks = dp.size() as i64;
        let shard = (total + ranks - 1) / ranks;
        let offset = dp.rank() as i64 * shard;
        let padded = shard * ranks;
        let block = |parts: Vec<Tensor>| flat(&parts, padded).narrow(0, offset, shard).copy();
        let masks: Vec<Tensor> = opt
            .params
            .iter()
            .map(|p| {
                p.param
                    .ones_like()
                    .g_mul_scalar(if p.decay { 1.0 } else { 0.0 })
            })
            .collect();
        let shares: Vec<Tensor> = opt
            .params
            .iter()
            .map(|p| p.param.ones_like().g_mul_scalar(p.norm_share))
            .collect();
        Zero1 {
            norm_mask: block(shares),
            exp_avg: block(
                opt.params
                    .iter()
                    .map(|p| p.exp_avg.shallow_clone())
                    .collect(),
            ),
            exp_avg_sq: block(
                opt.params
                    .iter()
                    .map(|p| p.exp_avg_sq.shallow_clone())
                    .collect(),
            ),
            decay_mask: block(masks),
            grad_shard: Tensor::zeros([shard], (Kind::Float, opt.params[0].param.device())),
            numels,
            shard,
            offset,
        }
    }

    /// Reduce-scatters the gradients; returns the squared global norm over the data-parallel
    /// group, weighted by `norm_share` (a device scalar).
    pub fn reduce_scatter_grads(
        &mut self,
        opt: &AdamW,
        dp: &Collective,
    ) -> Result<Tensor, LaunchError> {
        let grads: Vec<Tensor> = opt
            .params
            .iter()
            .map(|p| {
                let g = p.param.grad();
                if g.defined() {
                    g
                } else {
                    p.param.zeros_like()
                }
            })
            .collect();
        let flat_grad = flat(&grads, self.shard * dp.size() as i64);
        dp.reduce_scatter_sum(&flat_grad, &mut self.grad_shard)?;
        let mut sq = (self.grad_shard.square() * &self.norm_mask)
            .sum(Kind::Float)
            .view([1]);
        dp.all_reduce_sum(&mut sq)?;
        Ok(sq.view([]))
    }

    /// Clips and applies AdamW to this rank's block, then all-gathers the parameters.
    pub fn step(
        &mut self,
        opt: &mut AdamW,
        dp: &Collective,
        lr: f64,
        norm: f64,
        max_norm: f64,
    ) -> Result<(), LaunchError> {
        opt.step += 1;
        let h = opt.hyper(lr);
        let padded = self.shard * dp.size() as i64;
        tch::no_grad(|| -> Result<(), LaunchError> {
            if max_norm > 0.0 && norm > max_norm {
                let _ = self.grad_shard.g_mul_scalar_(max_norm / (norm + 1e-6));
            }
            let params: Vec<Tensor> = opt.params.iter().map(|p| p.param.shallow_clone()).collect();
            let mut block = flat(&params, padded)
                .narrow(0, self.offset, self.shard)
                .copy();
            adamw_update(
                &mut block,
                &self.grad_shard,
                &mut self.exp_avg,
                &mut self.exp_avg_sq,
                &h,
                Decay::Mask(&self.decay_mask),
            );
            let mut gathered = block.new_zeros([padded], (Kind::Float, block.device()));
            dp.all_gather(&block, &mut gathered)?;
            scatter_into(
                &gathered,
                &self.numels,
                opt.params.iter_mut().map(|p| &mut p.param),
            );
            Ok(())
        })
    }

    /// All-gathers the moments into `opt` (every rank takes part), so a checkpoint holds the
    /// full optimizer state and can be resumed on any number of ranks.
    pub fn gather_moments(&self, opt: &mut AdamW, dp: &Collective) -> Result<(), LaunchError> {
        let padded = self.shard * dp.size() as i64;
        for (mine, pick) in [(&self.exp_avg, 0), (&self.exp_avg_sq, 1)] {
            let mut gathered = mine.new_zeros([padded], (Kind::Float, mine.device()));
            dp.all_gather(mine, &mut gathered)?;
            let targets = opt.params.iter_mut().map(|p| {
                if pick == 0 {
                    &mut p.exp_avg
                } else {
                    &mut p.exp_avg_sq
                }
            });
            tch::no_grad(|| scatter_into(&gathered, &self.numels, targets));
        }
        Ok(())
    }
}

/// Copies consecutive blocks of `flat` into `targets` (`numels` elements each).
fn scatter_into<'a>(flat: &Tensor, numels: &[i64], targets: impl Iterator<Item = &'a mut Tensor>) {
    let mut at = 0;
    for (t, &n) in targets.zip(numels) {
        let src = flat.narrow(0, at, n).view_as(t).to_kind(t.kind());
        t.copy_(&src);
        at += n;
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
