//! Dead FFN units and their gate re-initialisation.
//!
//! A unit is dead once it has not fired for `sparsity.tokens_until_dead` tokens of the global
//! batch (the clocks are combined over ranks, so every rank agrees). With
//! `sparsity.reinit_dead`, each log interval redraws a dead unit's gate row from the init
//! distribution, zeroes its AdamW moments and restarts its clock, giving it another chance to
//! become useful. The draws come from a generator seeded by (seed, step, layer), so every rank
//! draws the same rows.
use crate::model::Llama;
use crate::optim::AdamW;
use tch::{Device, Kind, Tensor};

/// Re-initialises the gate rows of dead units; returns how many per layer.
pub fn reinit_dead_gates(
    model: &Llama,
    opt: &mut AdamW,
    clocks: &mut [Tensor],
    tokens_until_dead: u64,
    seed: u64,
    step: usize,
) -> Vec<i64> {
    let d = model.cfg.hidden_size as i64;
    let mut counts = Vec::with_capacity(clocks.len());
    tch::no_grad(|| {
        for (l, (blk, clock)) in model.blocks.iter().zip(clocks.iter_mut()).enumerate() {
            let idx = clock.ge(tokens_until_dead as i64).nonzero().squeeze_dim(1);
            let k = idx.size()[0];
            counts.push(k);
            if k == 0 {
                continue;
            }
            tch::manual_seed((seed ^ ((step as u64) << 16) ^ l as u64) as i64);
            let rows = (Tensor::randn([k, d], (Kind::Float, Device::Cpu)) * model.cfg.init_std)
                .to_device(blk.gate.device())
                .to_kind(blk.gate.kind());
            let mut gate = blk.gate.shallow_clone();
            let _ = gate.index_copy_(0, &idx, &rows);
            let name = format!("model.layers.{l}.mlp.gate_proj.weight");
            if let Some(p) = opt.params.iter_mut().find(|p| p.name == name) {
                let _ = p.exp_avg.index_fill_(0, &idx, 0.0);
                let _ = p.exp_avg_sq.index_fill_(0, &idx, 0.0);
            }
            let _ = clock.index_fill_(0, &idx, 0);
        }
    });
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::llama::seeded_model;

    /// Units 1 and 3 of six have not fired for 500 tokens.
    #[test]
    fn only_dead_rows_are_redrawn_and_their_state_reset() {
        let (vs, model) = seeded_model(0, &ModelConfig::tiny_shaped(10, 8, 6, 1, 4).tied_mha(2));
        let mut opt = AdamW::new(vs.variables().into_iter().collect(), &Default::default());
        for p in &mut opt.params {
            let _ = p.exp_avg.fill_(1.0);
        }
        let before = model.blocks[0].gate.copy();
        let mut clocks = vec![Tensor::from_slice(&[0i64, 500, 10, 700, 0, 0])];
        let n = reinit_dead_gates(&model, &mut opt, &mut clocks, 500, 1, 3);
        assert_eq!(n, [2]);
        let changed: Vec<bool> = (0..6)
            .map(|r| !model.blocks[0].gate.get(r).equal(&before.get(r)))
            .collect();
        assert_eq!(changed, [false, true, false, true, false, false]);
        assert_eq!(
            Vec::<i64>::try_from(&clocks[0]).unwrap(),
            [0, 0, 10, 0, 0, 0]
        );
        let m = &opt
            .param("model.layers.0.mlp.gate_proj.weight")
            .unwrap()
            .exp_avg;
        assert_eq!(m.get(1).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(m.get(0).sum(Kind::Float).double_value(&[]), 8.0);
    }
}
