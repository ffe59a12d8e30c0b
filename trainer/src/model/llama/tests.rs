//! Unit tests of the decoder: the fused training forward against the plain one, shapes and
//! names, the FFN statistics, the compute copies (the tensor-parallel layout: tests/tensor_parallel_init.rs).
use super::*;
use tch::Device;

/// The f32 path (ATen's RMSNorm) equals the written-out formula computed in f64, values
/// and the gradients of x and the weight.
#[test]
fn rms_norm_equals_the_formula_values_and_gradients() {
    tch::manual_seed(11);
    let x = Tensor::randn([3, 5, 48], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let w = (Tensor::randn([48], (Kind::Float, Device::Cpu)) + 1.0).set_requires_grad(true);
    let dy = Tensor::randn([3, 5, 48], (Kind::Float, Device::Cpu));
    let got = rms_norm(&x, &w, 1e-5);
    let g = Tensor::run_backward(&[(&got * &dy).sum(Kind::Float)], &[&x, &w], false, false);
    let d = |t: &Tensor| t.detach().to_kind(Kind::Double).set_requires_grad(true);
    let (x64, w64) = (d(&x), d(&w));
    let r = (x64.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Double) + 1e-5).rsqrt();
    let want = &w64 * (&x64 * r);
    let dy64 = dy.to_kind(Kind::Double);
    let gw = Tensor::run_backward(
        &[(&want * dy64).sum(Kind::Double)],
        &[&x64, &w64],
        false,
        false,
    );
    for (name, a, b) in [
        ("y", &got, &want),
        ("dx", &g[0], &gw[0]),
        ("dw", &g[1], &gw[1]),
    ] {
        let err = (a.to_kind(Kind::Double) - b).abs().max().double_value(&[]);
        let scale = b.abs().max().double_value(&[]);
        assert!(
            err <= 1e-5 * scale,
            "{name}: max error {err:e} of {scale:e}"
        );
    }
}

/// The training forward (stacked q/k/v GEMM, gradients written into the masters, chunked
/// LM head + cross-entropy) equals `forward` + `cross_entropy` through plain autograd:
/// loss, L1 term and every parameter's gradient after two accumulated micro-batches, with
/// tied and untied embeddings.
#[test]
fn training_forward_equals_the_unfused_forward_and_loss() {
    for tie in [false, true] {
        let cfg = ModelConfig {
            tie_embeddings: tie,
            ..ModelConfig::tiny()
        };
        let (vs_a, a) = seeded_model(4, &cfg);
        // b takes a's values by copy: a second seeded init can interleave with another
        // test's draws from tch's one global generator (the seed lock orders inits only).
        let (mut vs_b, b) = seeded_model(5, &cfg);
        tch::no_grad(|| vs_b.copy(&vs_a)).expect("same variables");
        let paths = [FfnPath::Dense; 2];
        let w = a.compute_weights();
        for micro in 0..2 {
            let data = Tensor::randint(50, [3, 8], (Kind::Int64, Device::Cpu));
            let (inputs, targets) = (data.narrow(1, 0, 7), data.narrow(1, 1, 7));
            let fused = a.training_forward(&w, &inputs, &targets, &paths);
            let plain = b.forward(&inputs, &paths);
            let ce = cross_entropy(&plain.logits, &targets, tch::Reduction::Sum);
            let (la, lb) = (
                &fused.ce_sum + &fused.l1_sum * 0.3,
                &ce + &plain.l1_sum * 0.3,
            );
            assert!(
                fused.ce_sum.allclose(&ce, 1e-5, 1e-5, false),
                "tie {tie} micro {micro}: ce {} vs {}",
                fused.ce_sum.double_value(&[]),
                ce.double_value(&[])
            );
            assert!(fused.l1_sum.allclose(&plain.l1_sum, 1e-5, 1e-5, false));
            la.backward();
            lb.backward();
        }
        let (va, vb) = (vs_a.variables(), vs_b.variables());
        for (name, pa) in &va {
            let (ga, gb) = (pa.grad(), vb[name].grad());
            let err = (&ga - &gb).abs().max().double_value(&[]);
            let scale = gb.abs().max().double_value(&[]);
            assert!(
                err <= 1e-5 * scale.max(1e-3),
                "tie {tie}: {name} gradient off by {err:e} of {scale:e}"
            );
        }
    }
}

#[test]
fn forward_shapes_and_hf_parameter_names() {
    let cfg = ModelConfig::tiny();
    let (vs, m) = seeded_model(0, &cfg);
    let tokens = Tensor::randint(50, [3, 7], (Kind::Int64, Device::Cpu));
    let out = m.forward(&tokens, &[FfnPath::Dense; 2]);
    assert_eq!(out.logits.size(), [3, 7, 50]);
    assert_eq!(out.layers.len(), 2);
    assert_eq!(out.layers[0].active_per_token.size(), [21]);
    assert_eq!(out.layers[0].active_per_unit.size(), [24]);
    let vars = vs.variables();
    for name in [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.mlp.down_proj.weight_t",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        assert!(vars.contains_key(name), "missing {name}");
    }
    assert_eq!(
        vars["model.layers.1.self_attn.k_proj.weight"].size(),
        [8, 16]
    );
    assert_eq!(
        vars.values().map(|t| t.numel()).sum::<usize>(),
        cfg.num_params()
    );
}

#[test]
fn l1_and_l0_statistics_on_a_hand_made_ffn() {
    // x = [[1, 0], [0, 1]]; g = x Wg^T, u = x Wu^T with Wg, Wu: [3, 2].
    let x = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([2, 2]);
    let wg = Tensor::from_slice(&[1.0f32, -1.0, -2.0, 3.0, 0.5, 0.5]).view([3, 2]);
    let wu = Tensor::from_slice(&[2.0f32, 1.0, -1.0, -4.0, 0.0, 1.0]).view([3, 2]);
    let wd = Tensor::ones([3, 2], (Kind::Float, Device::Cpu));
    // token 0: g = [1, -2, 0.5] -> relu [1, 0, 0.5]; u = [2, -1, 0] -> h = [2, 0, 0]
    // token 1: g = [-1, 3, 0.5] -> relu [0, 3, 0.5]; u = [1, -4, 1] -> h = [0, -12, 0.5]
    let w = sparse_kernels::FfnWeights::new(&wg, &wu, &wd);
    let out = sparse_kernels::sparse_ffn(&x, &w, FfnPath::Dense);
    assert_eq!(out.l1_sum.double_value(&[]), 2.0 + 12.0 + 0.5);
    assert_eq!(Vec::<i64>::try_from(&out.active_per_token).unwrap(), [1, 2]);
    assert_eq!(
        Vec::<i64>::try_from(&out.active_per_unit).unwrap(),
        [1, 1, 1]
    );
    assert_eq!(
        Vec::<f32>::try_from(out.y.reshape([-1])).unwrap(),
        [2.0, 2.0, -11.5, -11.5]
    );
}

/// Copies refreshed in place after the masters changed equal copies made anew, bit for bit,
/// at the addresses they had (bf16 copies of f32 masters, tied and untied heads).
#[test]
fn refreshed_compute_weights_equal_new_ones_in_place() {
    for tie in [false, true] {
        let cfg = ModelConfig {
            tie_embeddings: tie,
            ..ModelConfig::tiny()
        };
        let (_vs, mut model) = seeded_model(9, &cfg);
        model.compute = Kind::BFloat16;
        let w = model.compute_weights();
        let at = |w: &ComputeWeights| -> Vec<usize> {
            w.blocks
                .iter()
                .flat_map(|b| [&b.qkv, &b.o, &b.gate, &b.up, &b.down_t])
                .chain([&w.head])
                .map(|t| t.data_ptr() as usize)
                .collect()
        };
        let before = at(&w);
        // A deterministic change (no draws from the generator other tests seed).
        tch::no_grad(|| {
            for p in model.parameters() {
                let _ = p.shallow_clone().g_mul_scalar_(1.37).g_add_scalar_(0.01);
            }
        });
        model.refresh_compute_weights(&w);
        assert_eq!(at(&w), before, "the copies moved");
        let fresh = model.compute_weights();
        for (a, b) in w.blocks.iter().zip(&fresh.blocks) {
            for (x, y) in [
                (&a.qkv, &b.qkv),
                (&a.o, &b.o),
                (&a.gate, &b.gate),
                (&a.up, &b.up),
                (&a.down_t, &b.down_t),
            ] {
                assert!(x.equal(y), "a refreshed copy differs from a new one");
            }
        }
        assert!(w.head.equal(&fresh.head));
        assert_eq!(
            model.parameters().len(),
            if tie { 2 } else { 3 } + 9 * cfg.num_layers
        );
    }
}
