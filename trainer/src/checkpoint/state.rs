//! The trainer's side of checkpoints: what goes in one (weights under HF Llama names, AdamW
//! moments, trainer state), and the exact restore of a run from one.
//!
//! Nothing random happens after initialisation (no dropout; the data order is a function of
//! the seed and the cursor), so the seed and the data cursor are the whole RNG state.
use crate::config::Config;
use crate::optim::AdamW;
use crate::sparsity::activity::IntervalActivity;
use crate::sparsity::paths::PathScheduler;
use crate::sparsity::repack;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sparse_checkpoints::{Checkpoint, Dtype, RawTensor};
use sparse_kernels::FfnPath;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Trainer state saved as JSON beside the tensors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Sequences of the data stream consumed.
    pub cursor: u64,
    pub tokens_seen: u64,
    pub skipped_total: usize,
    /// Seed of the run: with the cursor, the whole random state.
    pub seed: u64,
    /// lambda at the last completed step (a function of the step; saved for inspection).
    pub l1_coeff: f64,
    /// FFN path of each layer and the step of the next path decision.
    pub ffn_paths: Vec<String>,
    pub next_path_decision: usize,
    /// Data-parallel ranks of the run that wrote it.
    pub world_size: usize,
    /// The run's config.
    pub config: Config,
    /// Statistics of the unfinished log interval (the path scheduler decides from them).
    #[serde(default)]
    pub interval: IntervalActivity,
    /// After a physical repack: per layer, the original indices of the FFN units kept
    /// (empty: no repack, every unit present).
    #[serde(default)]
    pub ffn_layout: Vec<Vec<i64>>,
}

impl TrainerState {
    /// Kept units of `layer` when it was repacked to fewer than `hidden` units.
    fn repacked(&self, layer: usize, hidden: usize) -> Option<&[i64]> {
        self.ffn_layout
            .get(layer)
            .map(Vec::as_slice)
            .filter(|k| k.len() < hidden)
    }
}

/// HF name of an internal parameter name, and whether the tensor is stored transposed.
pub(crate) fn hf_name(name: &str) -> (String, bool) {
    match name.strip_suffix(".weight_t") {
        Some(base) => (format!("{base}.weight"), true),
        None => (name.to_string(), false),
    }
}

fn to_raw(t: &Tensor) -> RawTensor {
    let t = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let mut data = vec![0u8; t.numel() * 4];
    t.copy_data_u8(&mut data, t.numel());
    RawTensor {
        dtype: Dtype::F32,
        shape,
        data,
    }
}

pub(crate) fn from_raw(name: &str, raw: &RawTensor, device: Device) -> Result<Tensor> {
    if raw.dtype != Dtype::F32 {
        bail!("tensor `{name}`: dtype {:?}, expected F32", raw.dtype);
    }
    let shape: Vec<i64> = raw.shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_data_size(&raw.data, &shape, Kind::Float).to_device(device))
}

/// HF `LlamaConfig` for the model (`hidden_act: relu`: HF's Llama MLP computes
/// `down(act(gate(x)) * up(x))`, which with ReLU is exactly this FFN).
pub fn hf_config(cfg: &Config) -> serde_json::Value {
    let m = &cfg.model;
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.kv_heads(),
        "head_dim": m.head_dim(),
        "max_position_embeddings": m.max_seq_len,
        "rope_theta": m.rope_theta,
        "rms_norm_eps": m.rms_norm_eps,
        "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "relu",
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32",
    })
}

/// Copies the run's state to host memory (the slow disk write can then run elsewhere).
/// Refuses non-finite weights: a checkpoint is always a state worth resuming.
pub fn snapshot(
    cfg: &Config,
    opt: &AdamW,
    state: &TrainerState,
    dead_clocks: &[Tensor],
) -> Result<Checkpoint> {
    let finite = tch::no_grad(|| {
        let flags: Vec<Tensor> = opt
            .params
            .iter()
            .map(|p| p.param.isfinite().all())
            .collect();
        Tensor::stack(&flags, 0).all().int64_value(&[]) == 1
    });
    if !finite {
        bail!(
            "weights hold NaN or Inf at step {}: not writing a checkpoint",
            state.step
        );
    }
    let mut weights = BTreeMap::new();
    let mut optimizer = BTreeMap::new();
    let hidden = cfg.model.intermediate_size;
    for p in &opt.params {
        let (hf, transposed) = hf_name(&p.name);
        let mut w = p.param.shallow_clone();
        if let Some(kept) = repack::ffn_layer(&p.name).and_then(|l| state.repacked(l, hidden)) {
            // Back to the full H with zero rows for removed units (a zero row never fires).
            let full = w.new_zeros([hidden as i64, w.size()[1]], (w.kind(), w.device()));
            w = full.index_copy(0, &Tensor::from_slice(kept).to_device(w.device()), &w);
        }
        let w = if transposed { w.tr() } else { w };
        weights.insert(hf, to_raw(&w));
        optimizer.insert(format!("exp_avg.{}", p.name), to_raw(&p.exp_avg));
        optimizer.insert(format!("exp_avg_sq.{}", p.name), to_raw(&p.exp_avg_sq));
    }
    optimizer.insert(
        "adam_step".into(),
        RawTensor {
            dtype: Dtype::I64,
            shape: vec![],
            data: (opt.step as i64).to_le_bytes().to_vec(),
        },
    );
    for (l, t) in dead_clocks.iter().enumerate() {
        let c = t.to_device(Device::Cpu).to_kind(Kind::Int64).contiguous();
        let mut data = vec![0u8; c.numel() * 8];
        c.copy_data_u8(&mut data, c.numel());
        optimizer.insert(
            format!("tokens_since_fired.{l}"),
            RawTensor {
                dtype: Dtype::I64,
                shape: vec![c.numel()],
                data,
            },
        );
    }
    Ok(Checkpoint {
        weights,
        optimizer,
        trainer_state: serde_json::to_value(state)?,
        hf_config: Some(hf_config(cfg)),
        files: BTreeMap::new(),
    })
}

/// Where `--resume` points: a checkpoint directory or a run directory (its latest).
/// Fails, naming the directory, when there is no checkpoint there to resume.
pub fn resolve(resume: Option<&Path>, out_dir: &Path) -> Result<PathBuf> {
    let path = resume.map_or_else(|| out_dir.to_path_buf(), Path::to_path_buf);
    let is_step_dir = |p: &Path| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("step_"))
    };
    // A checkpoint directory, even a damaged one: the load names what is wrong with it.
    if path.join(sparse_checkpoints::MANIFEST_FILE).exists() || is_step_dir(&path) {
        return Ok(path);
    }
    let checkpoints = path.join(sparse_checkpoints::CHECKPOINTS_DIR);
    let has_latest = checkpoints.join(sparse_checkpoints::LATEST_FILE).exists();
    let has_step_dir = std::fs::read_dir(&checkpoints)
        .is_ok_and(|entries| entries.flatten().any(|e| is_step_dir(&e.path())));
    if !has_latest && !has_step_dir {
        bail!(
            "no checkpoint to resume in {} (no `latest` and no step_* directory): train without --resume to start",
            path.display()
        );
    }
    Ok(path)
}

/// A checkpoint read and checked against this run's model and optimizer: every check of a
/// restore has passed, nothing is changed yet ([`Verified::apply`] changes it).
pub struct Verified {
    path: PathBuf,
    ckpt: Checkpoint,
    pub state: TrainerState,
    paths: Vec<FfnPath>,
    adam_step: u64,
}

/// Reads the checkpoint at `path` and checks it fits this run: the model config, the FFN
/// layout, every tensor's name, dtype and shape (`opt` as it is before the restore: full
/// size), the per-layer FFN paths and the optimizer step.
pub fn verify(path: &Path, cfg: &Config, opt: &AdamW) -> Result<Verified> {
    let ckpt = sparse_checkpoints::load(path)
        .with_context(|| format!("resuming from {}", path.display()))?;
    let state: TrainerState =
        serde_json::from_value(ckpt.trainer_state.clone()).with_context(|| {
            format!(
                "{}: trainer_state.json does not match this version",
                path.display()
            )
        })?;
    if state.config.model != cfg.model {
        let (a, b) = (
            serde_json::to_value(&state.config.model)?,
            serde_json::to_value(&cfg.model)?,
        );
        let field = a
            .as_object()
            .and_then(|a| {
                a.iter()
                    .find(|(k, v)| b.get(k.as_str()) != Some(v))
                    .map(|(k, _)| k.clone())
            })
            .unwrap_or_default();
        bail!(
            "{}: checkpoint model differs from the config at model.{field} ({} in the checkpoint, {} in the config)",
            path.display(),
            a[&field],
            b[&field]
        );
    }
    let hidden = cfg.model.intermediate_size;
    let fits = |k: &Vec<i64>| {
        !k.is_empty() && k.len() <= hidden && k.iter().all(|&i| (0..hidden as i64).contains(&i))
    };
    if state.ffn_layout.len() > cfg.model.num_layers || !state.ffn_layout.iter().all(fits) {
        bail!(
            "{}: ffn_layout does not fit model.intermediate_size = {hidden}",
            path.display()
        );
    }
    let mut expected: Vec<(String, Vec<usize>)> = Vec::new();
    for p in &opt.params {
        let mut shape: Vec<usize> = p.param.size().iter().map(|&d| d as usize).collect();
        let (hf, transposed) = hf_name(&p.name);
        let mut moment_shape = shape.clone();
        if let Some(layer) = repack::ffn_layer(&p.name) {
            // Weights are stored at the full H; moments at the repacked one.
            shape[0] = hidden;
            if let Some(kept) = state.repacked(layer, hidden) {
                moment_shape[0] = kept.len();
            }
        }
        if transposed {
            shape.reverse();
        }
        expected.push((hf, shape));
        expected.push((format!("exp_avg.{}", p.name), moment_shape.clone()));
        expected.push((format!("exp_avg_sq.{}", p.name), moment_shape));
    }
    let exp: Vec<sparse_checkpoints::ExpectedTensor> = expected
        .iter()
        .map(|(n, s)| (n.as_str(), Dtype::F32, s.as_slice()))
        .collect();
    sparse_checkpoints::check_tensors(&ckpt, &exp)
        .with_context(|| format!("resuming from {}", path.display()))?;
    let paths: Vec<FfnPath> = state
        .ffn_paths
        .iter()
        .map(|p| p.parse().map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    if paths.len() != cfg.model.num_layers {
        bail!(
            "{}: ffn_paths has {} layers, the model {}",
            path.display(),
            paths.len(),
            cfg.model.num_layers
        );
    }
    let adam_step = ckpt
        .optimizer
        .get("adam_step")
        .and_then(|r| r.data.get(..8))
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .with_context(|| format!("{}: optimizer state has no `adam_step`", path.display()))?;
    Ok(Verified {
        path: path.to_path_buf(),
        ckpt,
        state,
        paths,
        adam_step: adam_step as u64,
    })
}

impl Verified {
    /// Restores parameters (repacked to the saved FFN layout), AdamW state, dead-unit clocks
    /// and scheduler from the checked checkpoint: with [`verify`], the exact restore of a run
    /// that changes nothing unless every check passes. `opt` and `dead_clocks` must be the ones
    /// [`verify`] checked against.
    pub fn apply(
        self,
        opt: &mut AdamW,
        sched: &mut PathScheduler,
        dead_clocks: &mut [Tensor],
    ) -> TrainerState {
        let Verified {
            path,
            ckpt,
            state,
            paths,
            adam_step,
        } = self;
        let hidden = state.config.model.intermediate_size;
        let device = opt.params[0].param.device();
        for (l, clock) in dead_clocks.iter_mut().enumerate() {
            if let Some(kept) = state.repacked(l, hidden) {
                let keep = Tensor::from_slice(kept).to_device(device);
                repack::apply_keep(opt, l, &keep);
                *clock = clock.index_select(0, &keep);
            }
        }
        // Names, dtypes and shapes were checked by `verify`.
        let read = |name: &str, raw: &RawTensor| {
            from_raw(name, raw, device)
                .unwrap_or_else(|e| panic!("{}: {e} after the checks", path.display()))
        };
        tch::no_grad(|| {
            for p in &mut opt.params {
                let (hf, transposed) = hf_name(&p.name);
                let w = read(&hf, &ckpt.weights[&hf]);
                let mut w = if transposed { w.tr().contiguous() } else { w };
                if let Some(kept) =
                    repack::ffn_layer(&p.name).and_then(|l| state.repacked(l, hidden))
                {
                    w = w.index_select(0, &Tensor::from_slice(kept).to_device(device));
                }
                p.param.copy_(&w);
                p.exp_avg.copy_(&read(
                    &p.name,
                    &ckpt.optimizer[&format!("exp_avg.{}", p.name)],
                ));
                p.exp_avg_sq.copy_(&read(
                    &p.name,
                    &ckpt.optimizer[&format!("exp_avg_sq.{}", p.name)],
                ));
            }
        });
        for (l, clock) in dead_clocks.iter_mut().enumerate() {
            if let Some(raw) = ckpt.optimizer.get(&format!("tokens_since_fired.{l}")) {
                let v: Vec<i64> = raw
                    .data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                if v.len() as i64 == clock.size()[0] {
                    *clock = Tensor::from_slice(&v).to_device(device);
                }
            }
        }
        opt.step = adam_step;
        sched.set_paths(paths, state.next_path_decision);
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--resume` where the run directory holds no checkpoint names the directory.
    #[test]
    fn resolve_names_a_directory_without_checkpoints() {
        let run = tempfile::tempdir().unwrap();
        let err = resolve(None, run.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "no checkpoint to resume in {}",
                run.path().display()
            )),
            "{err}"
        );
        std::fs::create_dir_all(run.path().join("checkpoints/step_00000004")).unwrap();
        assert_eq!(resolve(None, run.path()).unwrap(), run.path());
    }
}
