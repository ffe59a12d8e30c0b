//! Recompute equals keeping everything: the loss, the L1 term, every layer's statistics and
//! every parameter's gradient, bit for bit on the CPU.
use super::RERUNS;
use crate::config::{ModelConfig, Recompute};
use crate::model::llama::seeded_model;
use sparse_kernels::FfnPath;
use std::collections::BTreeMap;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// What two accumulated micro-batches of the training forward and backward give.
struct Run {
    /// Per micro-batch: the cross-entropy sum and the L1 term.
    losses: Vec<[Tensor; 2]>,
    /// Per micro-batch and layer: the L1 value and the two activity counts.
    stats: Vec<[Tensor; 3]>,
    grads: BTreeMap<String, Tensor>,
    /// Regions run again by the backward.
    reruns: usize,
}

/// The model of `cfg` with the weights `init` (drawn once: torch's generator is shared by the
/// tests running alongside, so two draws need not agree).
fn run(
    (cfg, init): (&ModelConfig, &VarStore),
    compute: Kind,
    recompute: Recompute,
    paths: &[FfnPath],
) -> Run {
    let (mut vs, mut model) = seeded_model(0, cfg);
    vs.copy(init).unwrap();
    model.compute = compute;
    model.recompute = recompute;
    let before = RERUNS.with(|n| n.get());
    let weights = model.compute_weights();
    let (mut losses, mut stats) = (Vec::new(), Vec::new());
    for micro in 0..2 {
        // Fixed tokens, not drawn (for the same reason).
        let data = (Tensor::arange(27, (Kind::Int64, Device::Cpu)) * (7 + 4 * micro) + 3)
            .remainder(cfg.vocab_size as i64)
            .view([3, 9]);
        let (inputs, targets) = (data.narrow(1, 0, 8), data.narrow(1, 1, 8));
        let out = model.training_forward(&weights, &inputs, &targets, paths);
        // A large lambda, so that the L1 term's gradient weighs in every weight's.
        ((&out.ce_sum + &out.l1_sum * 0.5) / 48.0).backward();
        losses.push([out.ce_sum.detach(), out.l1_sum.detach()]);
        stats.extend(
            out.layers
                .into_iter()
                .map(|l| [l.l1_sum, l.active_per_token, l.active_per_unit]),
        );
    }
    Run {
        losses,
        stats,
        grads: vs
            .variables()
            .into_iter()
            .map(|(name, p)| (name, p.grad()))
            .collect(),
        reruns: RERUNS.with(|n| n.get()) - before,
    }
}

/// Every value of `got` equals `want`'s bit for bit (NaN nowhere: the runs are finite).
fn assert_same(what: &str, got: &Run, want: &Run) {
    let eq = |a: &Tensor, b: &Tensor| a.size() == b.size() && a.kind() == b.kind() && a.equal(b);
    for (i, (g, w)) in got.losses.iter().zip(&want.losses).enumerate() {
        assert!(
            eq(&g[0], &w[0]) && eq(&g[1], &w[1]),
            "{what}: micro-batch {i}: ce {} l1 {} against ce {} l1 {}",
            g[0].double_value(&[]),
            g[1].double_value(&[]),
            w[0].double_value(&[]),
            w[1].double_value(&[])
        );
    }
    assert_eq!(got.stats.len(), want.stats.len(), "{what}: layers");
    for (i, (g, w)) in got.stats.iter().zip(&want.stats).enumerate() {
        for (name, a, b) in [
            ("L1", &g[0], &w[0]),
            ("active units per token", &g[1], &w[1]),
            ("tokens per unit", &g[2], &w[2]),
        ] {
            assert!(
                eq(a, b),
                "{what}: statistics {i} (micro-batch, layer): {name}"
            );
        }
    }
    assert_eq!(got.grads.len(), want.grads.len());
    for (name, g) in &got.grads {
        let w = &want.grads[name];
        assert!(g.defined() && w.defined(), "{what}: {name} has no gradient");
        let err = (g - w).abs().max().double_value(&[]);
        assert!(eq(g, w), "{what}: {name} gradient off by {err:e}");
    }
}

/// `ffn` and `full` against `none` over two accumulated micro-batches: untied and tied
/// embeddings, every FFN path the CPU runs (the dense oracle, the hybrid ELL + tail and
/// TwELL references), a mixed per-layer choice, and bf16 compute copies (where the
/// gradients go through the FFN op's masters and `master_linear` into the fp32 masters
/// rather than to the masters themselves).
#[test]
fn recompute_equals_keeping_everything_bit_for_bit() {
    let untied = ModelConfig::tiny();
    let tied = ModelConfig {
        tie_embeddings: true,
        ..ModelConfig::tiny()
    };
    let cases: [(&str, &ModelConfig, Kind, [FfnPath; 2]); 6] = [
        ("untied dense", &untied, Kind::Float, [FfnPath::Dense; 2]),
        ("tied dense", &tied, Kind::Float, [FfnPath::Dense; 2]),
        ("hybrid", &untied, Kind::Float, [FfnPath::Hybrid; 2]),
        ("twell", &tied, Kind::Float, [FfnPath::Twell; 2]),
        (
            "hybrid then dense",
            &untied,
            Kind::Float,
            [FfnPath::Hybrid, FfnPath::Dense],
        ),
        ("bf16 copies", &tied, Kind::BFloat16, [FfnPath::Dense; 2]),
    ];
    for (name, cfg, compute, paths) in cases {
        let (init, _) = seeded_model(4, cfg);
        let kept = run((cfg, &init), compute, Recompute::None, &paths);
        assert_eq!(kept.reruns, 0, "{name}: none recomputes nothing");
        for mode in [Recompute::Ffn, Recompute::Full] {
            let got = run((cfg, &init), compute, mode, &paths);
            let what = format!("{name}, recompute {}", mode.name());
            // One region a layer a micro-batch, each run again once.
            assert_eq!(got.reruns, 2 * cfg.num_layers, "{what}: regions run again");
            assert_same(&what, &got, &kept);
        }
    }
}

/// A region's forward with grad on (taken where the arm depends on it: TwELL on CUDA) and
/// without give plain autograd's outputs and gradients: the input's through the node, the
/// weight's (not an input of the node) accumulated once by the re-run; an integer output
/// passes through without a gradient.
#[test]
fn a_region_forward_with_grad_equals_one_without_and_plain_autograd() {
    let opts = (Kind::Float, Device::Cpu);
    // Fixed values, not drawn (torch's generator is shared with the tests alongside).
    let w = (Tensor::arange(12, opts) * 0.37)
        .sin()
        .view([3, 4])
        .set_requires_grad(true);
    let x0 = (Tensor::arange(8, opts) * 0.91).cos().view([2, 4]);
    let g = (Tensor::arange(6, opts) * 0.53).cos().view([2, 3]);
    let weight = w.shallow_clone();
    let region: super::Region = std::rc::Rc::new(move |ins: &[Tensor]| {
        let h = ins[0].matmul(&weight.tr()).relu();
        let l1 = h.abs().sum(Kind::Float);
        let count = h.gt(0.0).sum_dim_intlist(0, false, Kind::Int64);
        vec![h, l1, count]
    });
    let mut results = Vec::new();
    for how in ["plain", "without grad", "with grad"] {
        let x = x0.copy().set_requires_grad(true);
        let [h, l1, count] = match how {
            "plain" => <[Tensor; 3]>::try_from(region(&[x.shallow_clone()])).unwrap(),
            with => super::checkpoint(&[&x], with == "with grad", region.clone()),
        };
        assert!(
            !count.requires_grad(),
            "{how}: the count carries no gradient"
        );
        ((&h * &g).sum(Kind::Float) + &l1 * 0.5).backward();
        results.push((
            how,
            [h.detach(), l1.detach(), count, x.grad(), w.grad().copy()],
        ));
        let _ = w.grad().zero_();
    }
    let (_, want) = &results[0];
    for (how, got) in &results[1..] {
        for (name, a, b) in ["h", "L1", "count", "x gradient", "w gradient"]
            .iter()
            .zip(got)
            .zip(want)
            .map(|((n, a), b)| (n, a, b))
        {
            assert!(a.equal(b), "{how}: {name} differs from plain autograd");
        }
    }
}
