//! GPU: training steps whose micro-batches replay a captured CUDA graph equal the same steps
//! run eagerly. Three copies of one model train side by side on the same tokens: eager,
//! captured, and eager again (the second eager copy measures the run-to-run noise of the
//! GPU's own reductions: SDPA's backward accumulates with atomics). Every gradient of every
//! step and every loss term must be as close to the eager run's as the eager runs are to each
//! other (bit-equal where they are). The learning rate is large enough that a graph
//! replaying stale weights, a stale lambda or the first micro-batch's tokens would be far off.
//! Hybrid and dense layers both, a path change (a second capture), GQA.
use sparse_kernels::cuda::DeferredChecks;
use sparse_kernels::testing::cuda_device_or_skip;
use sparse_kernels::FfnPath;
use sparse_train::config::{ModelConfig, TrainConfig};
use sparse_train::model::Llama;
use sparse_train::optim::AdamW;
use sparse_train::train::micro_batch::MicroBatchRunner;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

struct Arm {
    _vs: VarStore,
    model: Llama,
    opt: AdamW,
    runner: MicroBatchRunner,
}

fn arm(device: Device, cfg: &ModelConfig, train: &TrainConfig, graphs: bool) -> Arm {
    tch::manual_seed(11);
    let vs = VarStore::new(device);
    let mut model = Llama::new(&vs, cfg);
    model.compute = Kind::BFloat16;
    let opt = AdamW::new(vs.variables().into_iter().collect(), train);
    Arm {
        _vs: vs,
        model,
        opt,
        runner: MicroBatchRunner::new(graphs),
    }
}

/// One optimizer step's micro-batches (re-run on a hybrid pool overflow, as the trainer
/// does); returns each micro-batch's `[CE sum, L1 sum, active units summed over layers]`.
fn micro_batches(
    a: &mut Arm,
    batches: &[Tensor],
    paths: &[FfnPath],
    lambda: f64,
    step_tokens: u64,
) -> Vec<[f64; 3]> {
    let device = a.model.embed.device();
    loop {
        let checks = DeferredChecks::begin(device).unwrap();
        a.runner.begin_step(&a.model, lambda);
        let sums: Vec<[f64; 3]> = batches
            .iter()
            .map(|b| {
                let out = a.runner.run(&a.model, b, paths, step_tokens).unwrap();
                let active: i64 = out
                    .layers
                    .iter()
                    .map(|s| s.active_per_token.sum(Kind::Int64).int64_value(&[]))
                    .sum();
                [
                    out.ce_sum.double_value(&[]),
                    out.l1_sum.double_value(&[]),
                    active as f64,
                ]
            })
            .collect();
        if !checks.finish().unwrap().overflowed {
            return sums;
        }
        a.opt.zero_grad();
    }
}

/// Largest |a - b| over the largest |b|, over every parameter's gradient.
fn grad_gap(a: &Arm, b: &Arm) -> f64 {
    let pa = a.model.parameters();
    let pb = b.model.parameters();
    pa.iter()
        .zip(&pb)
        .map(|(x, y)| {
            let (gx, gy) = (
                x.grad().to_kind(Kind::Double),
                y.grad().to_kind(Kind::Double),
            );
            let scale = gy.abs().max().double_value(&[]).max(1e-30);
            (gx - &gy).abs().max().double_value(&[]) / scale
        })
        .fold(0.0, f64::max)
}

#[test]
fn captured_micro_batches_train_as_eager_ones() {
    let Some(device) = cuda_device_or_skip("captured_micro_batches_train_as_eager_ones") else {
        return;
    };
    let cfg = ModelConfig {
        vocab_size: 1000,
        hidden_size: 256,
        intermediate_size: 1024,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: Some(2),
        max_seq_len: 256,
        rope_theta: 1e4,
        rms_norm_eps: 1e-5,
        tie_embeddings: true,
        init_std: 0.02,
    };
    let train = TrainConfig::default();
    let (micro, seq, accum) = (4i64, 128i64, 3usize);
    let step_tokens = (micro * seq) as u64 * accum as u64;
    let lambda = 2e-3;
    let mut eager = arm(device, &cfg, &train, false);
    let mut graph = arm(device, &cfg, &train, true);
    let mut again = arm(device, &cfg, &train, false);
    let mixed = [
        FfnPath::Dense,
        FfnPath::Hybrid,
        FfnPath::Hybrid,
        FfnPath::Dense,
    ];
    let dense = [FfnPath::Dense; 4];
    tch::manual_seed(3);
    for step in 0..4 {
        let paths: &[FfnPath] = if step < 3 { &mixed } else { &dense };
        let batches: Vec<Tensor> = (0..accum)
            .map(|_| {
                Tensor::randint(
                    cfg.vocab_size as i64,
                    [micro, seq + 1],
                    (Kind::Int64, Device::Cpu),
                )
            })
            .collect();
        let want = micro_batches(&mut eager, &batches, paths, lambda, step_tokens);
        let got = micro_batches(&mut graph, &batches, paths, lambda, step_tokens);
        let noise = micro_batches(&mut again, &batches, paths, lambda, step_tokens);
        let (gap, floor) = (grad_gap(&graph, &eager), grad_gap(&again, &eager));
        println!("step {step}: gradients graph vs eager {gap:.3e}, eager vs eager {floor:.3e}; sums {got:?} / {want:?}");
        assert!(
            gap <= 2.0 * floor,
            "step {step}: captured gradients {gap:.3e} off the eager ones, eager runs {floor:.3e} apart"
        );
        for ((g, w), n) in got.iter().zip(&want).zip(&noise) {
            for k in 0..3 {
                let floor = (n[k] - w[k]).abs();
                assert!(
                    (g[k] - w[k]).abs() <= 2.0 * floor + 1e-9 * w[k].abs(),
                    "step {step}: sum {k} {} captured, {} eager ({} again)",
                    g[k],
                    w[k],
                    n[k]
                );
            }
        }
        for a in [&mut eager, &mut graph, &mut again] {
            let gn = a.opt.grad_norm().double_value(&[]);
            a.opt.clip_and_step(1e-2, gn, 1.0).unwrap();
            a.opt.zero_grad();
        }
    }
    // The first step captured the mixed paths, the last step the dense ones.
    assert!(
        graph.runner.captures() >= 2,
        "{} captures",
        graph.runner.captures()
    );
}
