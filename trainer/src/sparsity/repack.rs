//! Physical repack: dead FFN units are removed from `Wg`, `Wu` and `Wd^T` (H shrinks per
//! layer) with their AdamW moments and dead-unit clocks, so the sparse kernels and the
//! optimizer stop paying for them. A removed unit never fired for `tokens_until_dead`
//! tokens; on any input where it still would not fire the model's outputs are unchanged.
//!
//! The layout (per layer, the indices into the original H of the units kept) is saved in the
//! trainer state. Checkpoints store the FFN weights padded back to the full H with zero rows
//! (exactly equivalent: a zero gate row never fires), so HF exports and `logits`/`generate`
//! need no layout; a resume applies the layout again.
use crate::optim::AdamW;
use tch::{Kind, Tensor};

/// Layer index of an FFN weight name (`model.layers.{l}.mlp.*`).
pub fn ffn_layer(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    tail.starts_with("mlp.")
        .then(|| layer.parse().ok())
        .flatten()
}

/// Replaces `t`'s data (shape included) with rows `keep` of it, in place, so every handle
/// on the tensor (model, optimizer, VarStore) sees the new shape.
fn keep_rows(t: &mut Tensor, keep: &Tensor) {
    let kept = t.index_select(0, keep);
    t.set_data(&kept);
}

/// Resizes layer `l`'s FFN parameters, moments and gradients to rows `keep`.
pub fn apply_keep(opt: &mut AdamW, layer: usize, keep: &Tensor) {
    tch::no_grad(|| {
        for p in opt
            .params
            .iter_mut()
            .filter(|p| ffn_layer(&p.name) == Some(layer))
        {
            keep_rows(&mut p.param, keep);
            keep_rows(&mut p.exp_avg, keep);
            keep_rows(&mut p.exp_avg_sq, keep);
            let mut g = p.param.grad();
            if g.defined() {
                g.set_data(&p.param.zeros_like());
            }
        }
    });
}

/// Removes the dead units of every layer (at least one unit stays). `layout[l]` holds the
/// original indices of layer l's units and is updated; returns the units removed per layer.
pub fn prune_dead(
    opt: &mut AdamW,
    clocks: &mut [Tensor],
    layout: &mut [Tensor],
    tokens_until_dead: u64,
) -> Vec<i64> {
    let mut removed = Vec::with_capacity(clocks.len());
    for (l, (clock, kept)) in clocks.iter_mut().zip(layout.iter_mut()).enumerate() {
        let alive = clock.lt(tokens_until_dead as i64);
        let mut keep = alive.nonzero().squeeze_dim(1);
        if keep.size()[0] == 0 {
            keep = clock.argmin(0, true);
        }
        let n = clock.size()[0] - keep.size()[0];
        removed.push(n);
        if n == 0 {
            continue;
        }
        apply_keep(opt, l, &keep);
        *clock = clock.index_select(0, &keep);
        *kept = kept.index_select(0, &keep.to_device(kept.device()));
    }
    removed
}

/// The identity layout: every unit of every layer.
pub fn full_layout(layers: usize, hidden: usize) -> Vec<Tensor> {
    (0..layers)
        .map(|_| Tensor::arange(hidden as i64, (Kind::Int64, tch::Device::Cpu)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::llama::seeded_model;
    use sparse_kernels::FfnPath;
    use tch::Device;

    #[test]
    fn removing_units_that_never_fire_keeps_outputs_and_slices_state() {
        let cfg = ModelConfig {
            init_std: 0.2,
            ..ModelConfig::tiny_shaped(40, 16, 24, 2, 8).tied_mha(2)
        };
        let (vs, model) = seeded_model(3, &cfg);
        let mut opt = AdamW::new(vs.variables().into_iter().collect(), &Default::default());
        // Units 3, 7 and 20 of layer 1 can never fire: zero gate rows give relu(0) = 0.
        let dead = Tensor::from_slice(&[3i64, 7, 20]);
        tch::no_grad(|| {
            let mut g = model.blocks[1].gate.shallow_clone();
            let _ = g.index_fill_(0, &dead, 0.0);
        });
        for p in &mut opt.params {
            p.exp_avg.copy_(&Tensor::rand_like(&p.param));
        }
        let tokens = Tensor::randint(40, [2, 8], (Kind::Int64, Device::Cpu));
        let before = tch::no_grad(|| model.forward(&tokens, &[FfnPath::Dense; 2]).logits);
        let up = "model.layers.1.mlp.up_proj.weight";
        let up_m = |opt: &AdamW| opt.param(up).unwrap().exp_avg.copy();
        let m_before = up_m(&opt);
        let mut clocks: Vec<Tensor> = (0..2)
            .map(|_| Tensor::zeros([24], (Kind::Int64, Device::Cpu)))
            .collect();
        let _ = clocks[1].index_fill_(0, &dead, 1000);
        let mut layout = full_layout(2, 24);
        let removed = prune_dead(&mut opt, &mut clocks, &mut layout, 1000);
        assert_eq!(removed, [0, 3]);
        assert_eq!(model.blocks[1].gate.size(), [21, 16]);
        assert_eq!(model.blocks[1].down_t.size(), [21, 16]);
        assert_eq!(model.blocks[0].gate.size(), [24, 16]);
        assert_eq!(layout[1].size(), [21]);
        assert_eq!(i64::try_from(layout[1].get(3)).unwrap(), 4);
        let after = tch::no_grad(|| model.forward(&tokens, &[FfnPath::Dense; 2]).logits);
        let diff = (&before - &after).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "outputs changed by {diff}");
        let keep = layout[1].shallow_clone();
        assert!(up_m(&opt).equal(&m_before.index_select(0, &keep)));
        // Training continues on the new shapes.
        let out = model.forward(&tokens, &[FfnPath::Hybrid; 2]);
        out.logits.sum(Kind::Float).backward();
        assert_eq!(model.blocks[1].up.grad().size(), [21, 16]);
    }
}
