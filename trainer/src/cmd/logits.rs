//! `sparse-train logits`: a checkpoint's logits for one token sequence, as JSON, for checks
//! against other runtimes (fp32 on the CPU, dense FFN path).
use crate::checkpoint::load;
use anyhow::{bail, Result};
use sparse_kernels::FfnPath;
use std::path::PathBuf;
use tch::{Device, Tensor};

/// Arguments of `sparse-train logits`.
#[derive(clap::Args, Debug, Clone)]
pub struct LogitsArgs {
    /// A checkpoint directory, or a run directory (its latest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tokens: Vec<i64>,
}

/// Prints `[[f32; vocab]; tokens]`.
pub fn run(args: &LogitsArgs) -> Result<()> {
    let loaded = load::load(&args.checkpoint, Device::Cpu)?;
    let vocab = loaded.config.model.vocab_size as i64;
    if let Some(bad) = args.tokens.iter().find(|&&t| t < 0 || t >= vocab) {
        bail!("--tokens: id {bad} is outside the vocabulary (0..{vocab})");
    }
    let n = args.tokens.len();
    let input = Tensor::from_slice(&args.tokens).view([1, n as i64]);
    let paths = vec![FfnPath::Dense; loaded.config.model.num_layers];
    let logits = tch::no_grad(|| loaded.model.forward(&input, &paths).logits);
    let rows: Vec<Vec<f32>> = (0..n as i64)
        .map(|i| Vec::<f32>::try_from(logits.get(0).get(i)).expect("f32 logits"))
        .collect();
    println!("{}", serde_json::to_string(&rows)?);
    Ok(())
}
