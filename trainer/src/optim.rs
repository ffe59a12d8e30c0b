//! AdamW on tch tensors (its state is ours, so checkpoints hold it exactly), the cosine LR
//! schedule with linear warm-up, global-norm gradient clipping, and ZeRO-1 sharding of the
//! moments over the data-parallel ranks.
use crate::config::TrainConfig;
use sparse_kernels::fused::adamw::{foreach_norm, fused_adamw, AdamWStep, AdamWTensor};
use sparse_kernels::fused::FusedError;
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

    /// One update with learning rate `lr` from the gradients in `.grad()`, with the global
    /// norm clipped to `max_norm` (off when <= 0) given its value `norm`: ATen's multi-tensor
    /// AdamW, one pass per group (decayed matrices, undecayed norms) that divides each
    /// gradient by the clipping factor as it reads it. The gradients are left divided.
    pub fn clip_and_step(&mut self, lr: f64, norm: f64, max_norm: f64) -> Result<(), FusedError> {
        self.step += 1;
        let Some(first) = self.params.first() else {
            return Ok(());
        };
        let divisor = clip_divisor(norm, max_norm, first.param.device());
        let grads: Vec<Tensor> = self.params.iter().map(|p| p.param.grad()).collect();
        for decay in [true, false] {
            let group: Vec<AdamWTensor> = self
                .params
                .iter()
                .zip(&grads)
                .filter(|(p, g)| p.decay == decay && g.defined())
                .map(|(p, g)| AdamWTensor {
                    param: &p.param,
                    grad: g,
                    exp_avg: &p.exp_avg,
                    exp_avg_sq: &p.exp_avg_sq,
                })
                .collect();
            let h = AdamWStep {
                lr,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: if decay { self.weight_decay } else { 0.0 },
                step: self.step,
            };
            tch::no_grad(|| fused_adamw(&group, &h, divisor.as_ref()))?;
        }
        Ok(())
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
    /// scalar; summed over a tensor-parallel group it is the squared global norm). The norms
    /// come from one multi-tensor pass.
    pub fn grad_sq(&self) -> Tensor {
        let (grads, shares): (Vec<Tensor>, Vec<f32>) = self
            .params
            .iter()
            .map(|p| (p.param.grad(), p.norm_share as f32))
            .filter(|(g, _)| g.defined())
            .unzip();
        let refs: Vec<&Tensor> = grads.iter().collect();
        let norms = foreach_norm(&refs).unwrap_or_else(|e| panic!("{e}"));
        let Some(first) = norms.first() else {
            return Tensor::zeros([], (Kind::Float, self.params[0].param.device()));
        };
        let shares = Tensor::from_slice(&shares).to_device(first.device());
        (Tensor::stack(&norms, 0).square() * shares).sum(Kind::Float)
    }
}

/// What fused AdamW divides the gradients by to clip their global norm `norm` to `max_norm`
/// (`None`: no clipping, off when `max_norm <= 0`), as a one-element tensor on `device`.
fn clip_divisor(norm: f64, max_norm: f64, device: tch::Device) -> Option<Tensor> {
    (max_norm > 0.0 && norm > max_norm)
        .then(|| Tensor::from_slice(&[((norm + 1e-6) / max_norm) as f32]).to_device(device))
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

    /// Clips and applies AdamW to this rank's block (the decay masked in one pass, then
    /// ATen's fused AdamW dividing the gradient by the clipping factor), then all-gathers the
    /// parameters.
    pub fn step(
        &mut self,
        opt: &mut AdamW,
        dp: &Collective,
        lr: f64,
        norm: f64,
        max_norm: f64,
    ) -> anyhow::Result<()> {
        opt.step += 1;
        let padded = self.shard * dp.size() as i64;
        let device = self.grad_shard.device();
        tch::no_grad(|| -> anyhow::Result<()> {
            let params: Vec<Tensor> = opt.params.iter().map(|p| p.param.shallow_clone()).collect();
            let mut block = flat(&params, padded)
                .narrow(0, self.offset, self.shard)
                .copy();
            if opt.weight_decay > 0.0 {
                let _ = block.g_mul_(&(&self.decay_mask * (-lr * opt.weight_decay) + 1.0));
            }
            let divisor = clip_divisor(norm, max_norm, device);
            let h = AdamWStep {
                lr,
                beta1: opt.beta1,
                beta2: opt.beta2,
                eps: opt.eps,
                weight_decay: 0.0,
                step: opt.step,
            };
            let shard = AdamWTensor {
                param: &block,
                grad: &self.grad_shard,
                exp_avg: &self.exp_avg,
                exp_avg_sq: &self.exp_avg_sq,
            };
            fused_adamw(&[shard], &h, divisor.as_ref())?;
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
        opt.clip_and_step(0.1, 0.0, 0.0).unwrap();
        // First step of Adam moves each weight by lr * sign(grad) (up to eps).
        let v: Vec<f32> = Vec::try_from(p.detach()).unwrap();
        assert!(
            (v[0] - 0.9).abs() < 1e-5 && (v[1] + 1.9).abs() < 1e-5,
            "{v:?}"
        );
    }
}
