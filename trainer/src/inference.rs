//! Loading a trained model from a checkpoint for inference (`logits`, `generate`).
use crate::checkpointing::TrainerState;
use crate::config::Config;
use crate::model::Llama;
use anyhow::{Context, Result};
use sparse_checkpoints::Dtype;
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// A model restored from a checkpoint directory or a run directory (its latest).
pub struct LoadedModel {
    pub config: Config,
    pub model: Llama,
    pub vs: VarStore,
}

pub fn load(path: &Path, device: Device) -> Result<LoadedModel> {
    let ckpt =
        sparse_checkpoints::load(path).with_context(|| format!("loading {}", path.display()))?;
    let state: TrainerState = serde_json::from_value(ckpt.trainer_state.clone())
        .with_context(|| format!("{}: trainer_state.json", path.display()))?;
    let config = state.config;
    let mut vs = VarStore::new(device);
    let model = Llama::new(&vs, &config.model);
    let mut expected = Vec::new();
    for (name, t) in vs.variables() {
        let mut shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let hf = match name.strip_suffix(".weight_t") {
            Some(base) => {
                shape.reverse();
                format!("{base}.weight")
            }
            None => name.clone(),
        };
        expected.push((name, hf, shape));
    }
    let exp: Vec<sparse_checkpoints::ExpectedTensor> = expected
        .iter()
        .map(|(_, hf, s)| (hf.as_str(), Dtype::F32, s.as_slice()))
        .collect();
    sparse_checkpoints::check_tensors(&ckpt, &exp)
        .with_context(|| format!("loading {}", path.display()))?;
    let vars = vs.variables();
    tch::no_grad(|| {
        for (name, hf, _) in &expected {
            let raw = &ckpt.weights[hf];
            let shape: Vec<i64> = raw.shape.iter().map(|&d| d as i64).collect();
            let w = Tensor::from_data_size(&raw.data, &shape, Kind::Float).to_device(device);
            let w = if name.ends_with(".weight_t") {
                w.tr().contiguous()
            } else {
                w
            };
            let mut v = vars[name].shallow_clone();
            v.copy_(&w);
        }
    });
    vs.freeze();
    Ok(LoadedModel { config, model, vs })
}
