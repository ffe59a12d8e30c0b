//! Loading a trained model from a checkpoint for inference (`logits`, `generate`).
use super::state::{from_raw, hf_name, TrainerState};
use crate::config::Config;
use crate::data::tokenizer::Tokenizer;
use crate::model::Llama;
use anyhow::{Context, Result};
use sparse_checkpoints::Dtype;
use std::path::Path;
use tch::{nn::VarStore, Device};

/// A model restored from a checkpoint directory or a run directory (its latest).
pub struct LoadedModel {
    pub config: Config,
    pub model: Llama,
    pub vs: VarStore,
    /// The tokenizer the checkpoint carries (`tokenizer.json`); `None` in checkpoints of
    /// synthetic data or of shards without a manifest.
    pub tokenizer: Option<Tokenizer>,
}

impl LoadedModel {
    /// Takes the checkpoint's tokenizer; GPT-2's (said on stderr) when it carries none.
    pub fn take_tokenizer(&mut self) -> Result<Tokenizer> {
        match self.tokenizer.take() {
            Some(t) => Ok(t),
            None => {
                eprintln!("note: the checkpoint carries no tokenizer.json: using GPT-2's");
                Tokenizer::gpt2()
            }
        }
    }
}

pub fn load(path: &Path, device: Device) -> Result<LoadedModel> {
    let ckpt =
        sparse_checkpoints::load(path).with_context(|| format!("loading {}", path.display()))?;
    let state: TrainerState = serde_json::from_value(ckpt.trainer_state.clone())
        .with_context(|| format!("{}: trainer_state.json", path.display()))?;
    let config = state.config;
    let files = ckpt
        .files
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let tokenizer = Tokenizer::from_checkpoint_files(&files)
        .with_context(|| format!("loading {}", path.display()))?;
    let mut vs = VarStore::new(device);
    let model = Llama::new(&vs, &config.model);
    let mut expected = Vec::new();
    for (name, t) in vs.variables() {
        let mut shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let (hf, transposed) = hf_name(&name);
        if transposed {
            shape.reverse();
        }
        expected.push((name, hf, transposed, shape));
    }
    let exp: Vec<sparse_checkpoints::ExpectedTensor> = expected
        .iter()
        .map(|(_, hf, _, s)| (hf.as_str(), Dtype::F32, s.as_slice()))
        .collect();
    sparse_checkpoints::check_tensors(&ckpt, &exp)
        .with_context(|| format!("loading {}", path.display()))?;
    let vars = vs.variables();
    tch::no_grad(|| -> Result<()> {
        for (name, hf, transposed, _) in &expected {
            let w = from_raw(hf, &ckpt.weights[hf], device)?;
            let w = if *transposed { w.tr().contiguous() } else { w };
            vars[name].shallow_clone().copy_(&w);
        }
        Ok(())
    })?;
    vs.freeze();
    Ok(LoadedModel {
        config,
        model,
        vs,
        tokenizer,
    })
}
