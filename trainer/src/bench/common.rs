//! What the end-to-end benches share: their arguments, the imposed sparsity of their model,
//! and the GPU's energy counter and clock (NVML).
//!
//! **Imposed sparsity.** A freshly initialised model is ~50 % sparse; the paper's trained
//! models are ~99.5 % (1.5B: 29 of 5632 units per token). The bench builds the model with
//! the config's init and then gives every layer's gate a calibrated negative shift through
//! a constant input direction, as the generator of shared/design/anchors.md §3 does on one
//! layer:
//! - residual channel `c = D - 1` is made constant: `embed[:, c] = init_std * sqrt(D)` and
//!   nothing writes to it (`o_proj` row c and `down_proj^T` column c are zeroed), so the
//!   FFN input carries `x̂_c = C / rms(x)` (a per-token value, as the anchors' `t_i`);
//! - `Wg[j, c] = -beta_l * (1 + 0.2 b_j)`, `b_j ~ N(0, 1)`: a per-layer shift `beta_l` and
//!   unequal unit popularity (±0.5 sigma of the gate at 99.5 %, the anchors' `b_j`);
//! - `beta_l` is found by bisection (all layers at once, 24 forwards on random tokens, dense
//!   path, the benchmark's precision) so each layer's mean active units per token is
//!   `(1 - sparsity) * H`. The other gate columns keep their random init.
//!
//! The tied LM head sees channel c as a constant logit offset (softmax-invariant). Inputs
//! are uniform random token ids (seed 0). Dense and sparse then run on identical weights
//! (training restores them from a host copy and starts a fresh AdamW before each path).
use crate::model::{LayerStats, Llama};
use sparse_kernels::FfnPath;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// Which end-to-end bench runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Infer,
    Generate,
}

/// Arguments of `sparse-train bench train|infer|generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchE2eArgs {
    /// Run config (YAML): the model shape, micro-batch, seq_len, optimizer and lambda.
    #[arg(long, required_unless_present = "checkpoint")]
    pub config: Option<PathBuf>,
    /// A trained checkpoint (or a run directory: its latest) instead of `--config`: its
    /// config and weights, with the sparsity it learned (nothing is imposed; `--sparsity` is
    /// ignored). Inputs come from `--data`, else the checkpoint's validation shards.
    #[arg(long, conflicts_with = "config")]
    pub checkpoint: Option<PathBuf>,
    /// Token shards to take the inputs (and generate's prompts) from, the first windows in
    /// the loader's seeded order, instead of uniform random ids.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Override a config value: `--set train.micro_batch_size=2` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Target fraction of inactive FFN units per token (mean), imposed on every layer.
    #[arg(long, default_value_t = 0.995)]
    pub sparsity: f64,
    /// Sequences per iteration (default: train.micro_batch_size for train, 64 for infer,
    /// the paper's 64 x 2048).
    #[arg(long)]
    pub batch: Option<usize>,
    /// train: micro-batches per step, accumulated before the one clip + AdamW update (as the
    /// trainer does, and as torch_anchor.py's 4 micro-batches of 4 at 1.5b).
    #[arg(long, default_value_t = 4)]
    pub accum: usize,
    /// Timed iterations per path.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Untimed warm-up iterations per path.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Paths to run, comma separated (default: dense and the mode's sparse path).
    #[arg(long, value_delimiter = ',')]
    pub paths: Vec<FfnPath>,
    /// Learning rate of the timed AdamW steps (train). Default 0: the optimizer does all its
    /// work (moments, decay, update) but the weights, and so the imposed sparsity, stay put;
    /// with a real lr the L1 term and Adam's sign-like first steps drive the random-token
    /// model far sparser within a few steps (measured: 28 -> ~1.5 actives/token in 10 steps
    /// at the config's warm-up lr), so the two paths would see different sparsity.
    #[arg(long, default_value_t = 0.0)]
    pub lr: f64,
    /// CUDA device index.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// generate: batch sizes to run (sequences decoded together), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub gen_batch: Vec<usize>,
    /// generate: prompt length in tokens (random ids).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// generate: new tokens per sequence (greedy, no early stop).
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Write a Chrome trace of one more iteration per path into this folder after the timed
    /// loop (`train-<path>.json`, `infer-<path>.json`; generate: one more generation per path
    /// and batch, `generate-<path>-b<batch>.json`, the kernels of the graph replays included).
    #[arg(long)]
    pub profile_dir: Option<PathBuf>,
}

/// Bytes per GiB, for the reports.
pub(super) const GIB: f64 = (1u64 << 30) as f64;

/// The GPU's counters read through NVML (absent without a driver: figures print as n/a).
pub(super) struct Energy {
    nvml: Option<nvml_wrapper::Nvml>,
    index: u32,
}

impl Energy {
    pub(super) fn new(index: u32) -> Energy {
        let nvml = match nvml_wrapper::Nvml::init() {
            Ok(n) => Some(n),
            Err(e) => {
                println!("NVML not available ({e}): no energy figures");
                None
            }
        };
        Energy { nvml, index }
    }

    /// Total energy since driver load, mJ.
    pub(super) fn total_mj(&self) -> Option<u64> {
        let d = self.nvml.as_ref()?.device_by_index(self.index).ok()?;
        d.total_energy_consumption().ok()
    }

    pub(super) fn used_bytes(&self) -> Option<u64> {
        let d = self.nvml.as_ref()?.device_by_index(self.index).ok()?;
        d.memory_info().ok().map(|m| m.used)
    }

    /// Current SM clock, MHz.
    pub(super) fn sm_clock(&self) -> Option<u32> {
        let d = self.nvml.as_ref()?.device_by_index(self.index).ok()?;
        d.clock_info(nvml_wrapper::enum_wrappers::device::Clock::SM)
            .ok()
    }

    /// Runs `f` while a thread samples the SM clock every 10 ms; returns `f`'s value and the
    /// mean clock (MHz) over the samples. Latency-bound work (many small kernels) can leave
    /// the GPU at a low clock, which this makes visible.
    pub(super) fn with_clock<T>(&self, f: impl FnOnce() -> T) -> (T, Option<f64>) {
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let mut v = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(c) = self.sm_clock() {
                        v.push(c as f64);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                v
            });
            let out = f();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let v = sampler.join().unwrap_or_default();
            (
                out,
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64),
            )
        })
    }

    pub(super) fn name(&self) -> Option<String> {
        let d = self.nvml.as_ref()?.device_by_index(self.index).ok()?;
        d.name().ok()
    }
}

/// Imposes `target` mean active units per token on every layer (see the module docs);
/// returns each layer's measured mean after calibration. `forward_stats` runs one forward
/// of the calibration tokens and returns the per-layer means.
pub fn impose_sparsity(
    model: &Llama,
    target: f64,
    iters: usize,
    mut forward_stats: impl FnMut() -> Vec<f64>,
) -> Vec<f64> {
    let d = model.cfg.hidden_size as i64;
    let c = d - 1;
    let device = model.embed.device();
    let big = model.cfg.init_std * (d as f64).sqrt();
    let layers = model.blocks.len();
    let mut popularity = Vec::with_capacity(layers);
    tch::no_grad(|| {
        let _ = model.embed.narrow(1, c, 1).fill_(big);
        for blk in &model.blocks {
            let _ = blk.o.narrow(0, c, 1).zero_();
            let _ = blk.down_t.narrow(1, c, 1).zero_();
            let h = blk.gate.size()[0];
            popularity.push(Tensor::randn([h, 1], (Kind::Float, device)) * 0.2 + 1.0);
        }
    });
    let set = |betas: &[f64]| {
        tch::no_grad(|| {
            for ((blk, pop), &beta) in model.blocks.iter().zip(&popularity).zip(betas) {
                let col = (pop * -beta).to_kind(blk.gate.kind());
                blk.gate.narrow(1, c, 1).copy_(&col);
            }
        })
    };
    // Geometric bisection on beta in [1e-6, 100]; more actives than wanted -> larger shift.
    let mut lo = vec![(1e-6f64).ln(); layers];
    let mut hi = vec![(100f64).ln(); layers];
    for _ in 0..iters {
        let mid: Vec<f64> = lo.iter().zip(&hi).map(|(a, b)| (a + b) / 2.0).collect();
        set(&mid.iter().map(|m| m.exp()).collect::<Vec<_>>());
        let got = forward_stats();
        for l in 0..layers {
            if got[l] > target {
                lo[l] = mid[l];
            } else {
                hi[l] = mid[l];
            }
        }
    }
    let fin: Vec<f64> = lo
        .iter()
        .zip(&hi)
        .map(|(a, b)| ((a + b) / 2.0).exp())
        .collect();
    set(&fin);
    forward_stats()
}

/// Mean active units per token of each layer of one forward.
pub(super) fn layer_means(layers: &[LayerStats]) -> Vec<f64> {
    let means: Vec<Tensor> = layers
        .iter()
        .map(|l| l.active_per_token.to_kind(Kind::Float).mean(Kind::Float))
        .collect();
    Vec::<f64>::try_from(
        Tensor::stack(&means, 0)
            .to_kind(Kind::Double)
            .to_device(Device::Cpu),
    )
    .expect("f64 stats")
}

/// `v`'s mean and range over layers, for a report line.
pub(super) fn summary(v: &[f64]) -> String {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("mean {mean:.1} (layers {min:.1} .. {max:.1})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::llama::seeded_model;

    /// The calibration reaches the target mean actives per token on every layer (CPU).
    #[test]
    fn imposed_sparsity_hits_the_target() {
        let cfg = ModelConfig::tiny_shaped(101, 64, 2048, 3, 128).tied_mha(4);
        let (_vs, model) = seeded_model(0, &cfg);
        let tokens = Tensor::randint(101, [4, 128], (Kind::Int64, Device::Cpu));
        let paths = [FfnPath::Dense; 3];
        let target = 0.01 * 2048.0;
        let got = impose_sparsity(&model, target, 24, || {
            tch::no_grad(|| layer_means(&model.forward(&tokens, &paths).layers))
        });
        for (l, g) in got.iter().enumerate() {
            assert!(
                (g - target).abs() < 0.1 * target,
                "layer {l}: {g} vs {target}"
            );
        }
    }
}
