//! `sparse-train generate`: text generation from a checkpoint.
//!
//! The prompt is encoded with the checkpoint's tokenizer, replicated `--batch` times and
//! prefilled into a static KV cache; each decode step is then one replay of a captured CUDA
//! graph on CUDA (the [`Decoder`]: no host work or synchronisation per token; `--eager` runs
//! the same step op by op), and the text is printed as the tokens reach the host, every
//! `--stream-every` steps. The FFN runs on `--ffn-path` (TwELL kernels on CUDA by default,
//! dense on CPU); on CUDA the weights are cast to bf16. Sampling on the device: greedy at
//! temperature 0 (the default), else softmax(logits / T) within the top k and the top-p
//! nucleus, seeded by `--seed`.
use crate::checkpoint::load;
use crate::model::{to_bf16, Decoder, Sampler};
use anyhow::{bail, Result};
use sparse_kernels::FfnPath;
use std::io::Write;
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
    /// Sample only among the most likely tokens whose probability reaches p (1 = all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Print the text every this many decode steps (one device-to-host copy each).
    #[arg(long, default_value_t = 8)]
    pub stream_every: usize,
    /// Run each decode step op by op instead of replaying the captured CUDA graph.
    #[arg(long)]
    pub eager: bool,
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
    /// seconds of decoding on a GPU are measured to run several times slower).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
}

/// Runs `sparse-train generate`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    if args.batch < 1 {
        bail!("--batch must be >= 1");
    }
    let sampler = Sampler {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
    };
    sampler
        .validate()
        .map_err(|e| anyhow::anyhow!("--temperature/--top-k/--top-p: {e}"))?;
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
    let stop = (!args.ignore_eos).then_some(eot);
    let mut decoder = Decoder::new(
        &loaded.model,
        args.batch,
        total as i64,
        &paths,
        sampler,
        stop,
    )?;
    let capture = !args.eager;
    for _ in 0..args.warmup {
        decoder.generate(&prompt, args.max_tokens, args.stream_every, capture, |_| {})?;
    }
    // Seeded after the warm-up: the timed run samples as it would without one.
    tch::manual_seed(args.seed as i64);
    if device.is_cuda() {
        tch::Cuda::manual_seed_all(args.seed);
    }
    // Sequence 0 is printed as it comes (all but a trailing partial character: the text of
    // the tokens so far is decoded again each chunk); with a batch, the first few sequences
    // are printed whole at the end.
    let streamed = args.batch == 1;
    let mut so_far: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut out = std::io::stdout().lock();
    if streamed {
        write!(out, "{}", args.prompt)?;
        out.flush()?;
    }
    let run = decoder.generate(
        &prompt,
        args.max_tokens,
        args.stream_every,
        capture,
        |new| {
            if !streamed {
                return;
            }
            so_far.extend(new[0].iter().map(|&t| t as u32));
            if let Ok(text) = bpe.decode(&so_far) {
                let stable = text.trim_end_matches('\u{FFFD}');
                if stable.len() > printed && stable.is_char_boundary(printed) {
                    let _ = write!(out, "{}", &stable[printed..]);
                    let _ = out.flush();
                    printed = stable.len();
                }
            }
        },
    )?;
    if streamed {
        let text = bpe.decode(&so_far).unwrap_or_default();
        if text.len() > printed && text.is_char_boundary(printed) {
            write!(out, "{}", &text[printed..])?;
        }
        writeln!(out)?;
    } else {
        let shown = args.batch.min(if args.temperature > 0.0 { 4 } else { 1 });
        for (row, ids) in run.tokens.iter().take(shown as usize).enumerate() {
            let ids: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
            let text = bpe
                .decode(&ids)
                .unwrap_or_else(|e| format!("<undecodable: {e}>"));
            writeln!(out, "--- sequence {row}")?;
            writeln!(out, "{}{}", args.prompt, text)?;
        }
    }
    let b = args.batch as f64;
    let prefill_tokens = b * ids.len() as f64;
    let decode_tokens = b * run.decode_steps as f64;
    let steps = run.decode_steps.max(1) as f64;
    writeln!(
        out,
        "prefill: {} x {} tokens in {:.1} ms = {:.0} tokens/s | decode: {} steps x {} in {:.1} ms = {:.1} tokens/s ({:.2} ms/step, {}) | {} {} ffn {}",
        args.batch,
        ids.len(),
        run.prefill_s * 1e3,
        prefill_tokens / run.prefill_s,
        run.decode_steps,
        args.batch,
        run.decode_s * 1e3,
        if run.decode_steps > 0 { decode_tokens / run.decode_s } else { 0.0 },
        run.decode_s * 1e3 / steps,
        if run.captured { "CUDA graph" } else { "eager" },
        if device.is_cuda() { "cuda" } else { "cpu" },
        if device.is_cuda() { "bf16" } else { "f32" },
        path.name()
    )?;
    Ok(())
}
