//! `sparse-train generate`: text generation from a checkpoint.
//!
//! The prompt is encoded with the GPT-2 tokenizer, replicated `--batch` times and prefilled
//! into a static KV cache; each decode step is then one replay of a captured CUDA graph on
//! CUDA (the [`Decoder`]: no host work or synchronisation per token; `--eager` runs the
//! same step op by op), and the text is printed as the tokens reach the host, every
//! `--stream-every` steps. The FFN runs on `--ffn-path` (TwELL kernels on CUDA by default,
//! dense on CPU); on CUDA the weights are cast to bf16. Sampling on the device: greedy at
//! temperature 0 (the default), else softmax(logits / T) within the top k and the top-p
//! nucleus, seeded by `--seed`.
use crate::checkpoint::load;
use crate::data::prepare::{gpt2, GPT2_EOT};
use crate::model::{to_bf16, Decoder, Sampler};
use anyhow::{bail, Result};
use sparse_kernels::FfnPath;
use std::io::Write;
use std::path::PathBuf;
use tch::{Device, Tensor};

/// GPT-2's `<|endoftext|>`, as a token id tensor value.
const EOT: i64 = GPT2_EOT as i64;

/// Arguments of `sparse-train generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// A checkpoint directory, or a run directory (its latest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The prompt text (GPT-2 tokenizer).
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
    let cfg = &loaded.config.model;
    let bpe = gpt2()?;
    let ids: Vec<i64> = bpe
        .encode_with_special_tokens(&args.prompt)
        .into_iter()
        .map(|t| t as i64)
        .collect();
    if ids.is_empty() {
        bail!("--prompt: empty after tokenization");
    }
    if let Some(bad) = ids.iter().find(|&&t| t >= cfg.vocab_size as i64) {
        bail!(
            "prompt token {bad} is outside the model's vocabulary ({}): the model was not trained with the GPT-2 tokenizer",
            cfg.vocab_size
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
    let stop = (!args.ignore_eos).then_some(EOT);
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
    // Sequence 0 is printed as it comes (the longest prefix that decodes to whole UTF-8
    // characters); with a batch, the first few sequences are printed whole at the end.
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
            if let Ok(bytes) = bpe.decode_bytes(&so_far) {
                let text = String::from_utf8_lossy(&bytes[printed.min(bytes.len())..]).into_owned();
                let whole = match std::str::from_utf8(&bytes[printed.min(bytes.len())..]) {
                    Ok(t) => t.len(),
                    Err(e) => e.valid_up_to(),
                };
                let _ = write!(out, "{}", &text[..whole.min(text.len())]);
                let _ = out.flush();
                printed += whole;
            }
        },
    )?;
    if streamed {
        // Whatever did not decode to whole characters, replaced.
        if let Ok(bytes) = bpe.decode_bytes(&so_far) {
            write!(
                out,
                "{}",
                String::from_utf8_lossy(&bytes[printed.min(bytes.len())..])
            )?;
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
