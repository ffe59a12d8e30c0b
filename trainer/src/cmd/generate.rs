//! `sparse-train generate`: text generation from a checkpoint with a KV cache.
//!
//! The prompt is encoded with the checkpoint's tokenizer, replicated `--batch` times, run once
//! through the model (prefill, causal SDPA, keys/values stored in a
//! [`KvCache`](crate::model::KvCache)), then one token per step attends to the cache
//! (decode): [`generate_tokens`]. The FFN runs on `--ffn-path` (TwELL kernels on CUDA by
//! default, dense on CPU); on CUDA the weights are cast to bf16. Sampling: greedy at
//! temperature 0 (the default), else softmax(logits / T), optionally restricted to the top k.
use crate::checkpoint::load;
use crate::model::{generate_tokens, to_bf16, Sampler};
use anyhow::{bail, Result};
use sparse_kernels::FfnPath;
use std::path::PathBuf;
use tch::{Device, Tensor};

/// Arguments of `sparse-train generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// A checkpoint directory, or a run directory (its latest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The prompt text (encoded with the checkpoint's tokenizer).
    #[arg(long)]
    pub prompt: String,
    /// New tokens to generate (stops earlier once every sequence has emitted <|endoftext|>).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample only among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: i64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// FFN implementation: `dense` or `twell` (default: twell on CUDA, dense on CPU).
    #[arg(long)]
    pub ffn_path: Option<FfnPath>,
    /// Replicate the prompt B times (throughput measurement).
    #[arg(long, default_value_t = 1)]
    pub batch: i64,
    /// Run on the CPU even if CUDA is available.
    #[arg(long)]
    pub cpu: bool,
    /// Keep generating after <|endoftext|> (fixed-length throughput runs).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Untimed generations of the same length before the timed one (a process's first
    /// seconds of eager decoding on a GPU are measured to run several times slower).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
}

/// Runs `sparse-train generate`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    if args.batch < 1 {
        bail!("--batch must be >= 1");
    }
    if args.temperature < 0.0 || !args.temperature.is_finite() {
        bail!("--temperature must be >= 0");
    }
    let device = if !args.cpu && tch::Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let path = args.ffn_path.unwrap_or(if device.is_cuda() {
        FfnPath::Twell
    } else {
        FfnPath::Dense
    });
    if path == FfnPath::Hybrid {
        bail!("--ffn-path hybrid is the training format: use dense or twell");
    }
    let mut loaded = load::load(&args.checkpoint, device)?;
    if device.is_cuda() {
        to_bf16(&mut loaded.vs, &mut loaded.model);
    }
    let bpe = loaded.take_tokenizer()?;
    let eot = bpe.eot_id as i64;
    let cfg = &loaded.config.model;
    let ids: Vec<i64> = bpe
        .encode(&args.prompt)?
        .into_iter()
        .map(|t| t as i64)
        .collect();
    if ids.is_empty() {
        bail!("--prompt: empty after tokenization");
    }
    if let Some(bad) = ids.iter().find(|&&t| t >= cfg.vocab_size as i64) {
        bail!(
            "prompt token {bad} is outside the model's vocabulary ({}): the model was not trained with the {} tokenizer",
            cfg.vocab_size,
            bpe.name
        );
    }
    let total = ids.len() + args.max_tokens;
    if total > cfg.max_seq_len {
        bail!(
            "prompt ({} tokens) + --max-tokens {} exceeds the model's max_seq_len {}",
            ids.len(),
            args.max_tokens,
            cfg.max_seq_len
        );
    }
    let prompt = Tensor::from_slice(&ids)
        .view([1, -1])
        .repeat([args.batch, 1])
        .to_device(device);
    let paths = vec![path; cfg.num_layers];
    let sampler = Sampler {
        temperature: args.temperature,
        top_k: args.top_k,
    };
    let stop = (!args.ignore_eos).then_some(eot);
    let generate = || {
        generate_tokens(
            &loaded.model,
            &prompt,
            args.max_tokens,
            sampler,
            &paths,
            true,
            stop,
        )
    };
    for _ in 0..args.warmup {
        let _ = generate();
    }
    // Seeded after the warm-up: the timed run samples as it would without one (nothing
    // before it draws random numbers).
    tch::manual_seed(args.seed as i64);
    if device.is_cuda() {
        tch::Cuda::manual_seed_all(args.seed);
    }
    let (tokens, stats) = generate();
    let tokens = tokens.to_device(Device::Cpu);
    for row in 0..args.batch.min(if args.temperature > 0.0 { 4 } else { 1 }) {
        let mut ids: Vec<u32> = Vec::<i64>::try_from(tokens.get(row))?
            .into_iter()
            .map(|t| t as u32)
            .collect();
        if let Some(i) = ids.iter().position(|&t| t as i64 == eot) {
            ids.truncate(i + 1);
        }
        let text = bpe
            .decode(&ids)
            .unwrap_or_else(|e| format!("<undecodable: {e}>"));
        if args.batch > 1 {
            println!("--- sequence {row}");
        }
        println!("{}{}", args.prompt, text);
    }
    let b = args.batch as f64;
    let prefill_tokens = b * ids.len() as f64;
    let decode_tokens = b * stats.decode_steps as f64;
    println!(
        "prefill: {} x {} tokens in {:.1} ms = {:.0} tokens/s | decode: {} steps x {} in {:.1} ms = {:.1} tokens/s ({:.2} ms/step) | {} {} ffn {}",
        args.batch,
        ids.len(),
        stats.prefill_s * 1e3,
        prefill_tokens / stats.prefill_s,
        stats.decode_steps,
        args.batch,
        stats.decode_s * 1e3,
        if stats.decode_steps > 0 { decode_tokens / stats.decode_s } else { 0.0 },
        if stats.decode_steps > 0 { stats.decode_s * 1e3 / stats.decode_steps as f64 } else { 0.0 },
        if device.is_cuda() { "cuda" } else { "cpu" },
        if device.is_cuda() { "bf16" } else { "f32" },
        path.name()
    );
    Ok(())
}
