//! `sparse-train bench generate`: generation throughput at a config's shape, on the model
//! [`super::e2e`] built and calibrated (its arguments: [`BenchE2eArgs`]).
//!
//! **generate**: the captured static-cache [`Decoder`] (prefill of a random prompt, then
//! greedy decode steps replayed from one CUDA graph, LM head and sampling included, no early
//! stop) at each `--gen-batch`, bf16 weights; dense = `Dense`, sparse = `Twell`. Reported
//! per path and batch: prefill ms, decode ms/step (the median over `--steps` timed
//! generations), decode tokens/s, the share of the weight-bytes limit it reaches, energy per
//! decoded token, and how many greedy tokens agree with the dense path's (bf16 rounding can
//! flip near-ties).
use super::common::{BenchE2eArgs, Energy, GIB};
use crate::model::{rms_norm, synchronize, Decoder, Llama, Sampler};
use anyhow::{bail, Result};
use sparse_kernels::cuda_runtime;
use sparse_kernels::torch::profiler;
use sparse_kernels::FfnPath;
use std::time::Instant;
use tch::{Kind, Tensor};

/// The bytes one decode step must read at least: every weight it multiplies by once (for
/// TwELL the gate in full and, of up and down, the rows of units live in some token of the
/// batch), plus the keys and values attended to. The measured bandwidth over it bounds the
/// step from below.
fn step_bytes(model: &Llama, path: FfnPath, batch: f64, live_per_token: f64, keys: f64) -> f64 {
    let m = &model.cfg;
    let (d, h, l) = (
        m.hidden_size as f64,
        m.intermediate_size as f64,
        m.num_layers as f64,
    );
    let kv = (m.kv_heads() * m.head_dim()) as f64;
    let attn = (2.0 * d * d + 2.0 * d * kv) * 2.0;
    let ffn = match path {
        FfnPath::Dense => 3.0 * d * h * 2.0,
        // Units live in at least one of the batch's tokens, as independent draws.
        _ => d * h * 2.0 + 2.0 * d * 2.0 * h * (1.0 - (1.0 - live_per_token / h).powf(batch)),
    };
    let cache = 2.0 * batch * kv * keys * 2.0;
    l * (attn + ffn + cache) + m.vocab_size as f64 * d * 2.0
}

/// `bench generate`: each path at each batch size, on the calibrated model.
pub(super) fn run_generate(
    args: &BenchE2eArgs,
    model: &Llama,
    paths: &[FfnPath],
    energy: &Energy,
    tokens: &Tensor,
    live: f64,
) -> Result<()> {
    let m = &model.cfg;
    let device = model.embed.device();
    if args.prompt_len == 0 || args.new_tokens < 2 {
        bail!("--prompt-len must be >= 1 and --new-tokens >= 2");
    }
    if args.prompt_len + args.new_tokens > m.max_seq_len {
        bail!(
            "--prompt-len {} + --new-tokens {} exceeds the model's max_seq_len {}",
            args.prompt_len,
            args.new_tokens,
            m.max_seq_len
        );
    }
    if args.gen_batch.contains(&0) {
        bail!("--gen-batch: batch sizes must be >= 1");
    }
    if args.prompt_len as i64 > tokens.size()[1] {
        bail!(
            "--prompt-len {} exceeds the bench's windows of {} tokens (train.seq_len + 1)",
            args.prompt_len,
            tokens.size()[1]
        );
    }
    println!(
        "generate: prompt {} tokens (the bench's inputs), {} new tokens per sequence (greedy, no early stop), captured decode step (CUDA graph), {} warm-up + {} timed generations per path (median)",
        args.prompt_len, args.new_tokens, args.warmup.max(1), args.steps.max(1)
    );
    let capacity = (args.prompt_len + args.new_tokens) as i64;
    for &b in &args.gen_batch {
        let b = b as i64;
        let prompt = tokens
            .narrow(0, 0, b)
            .narrow(1, 0, args.prompt_len as i64)
            .contiguous();
        let mut dense_out: Option<(Tensor, f64)> = None;
        for &path in paths {
            let layer_paths = vec![path; m.num_layers];
            let mut decoder =
                Decoder::new(model, b, capacity, &layer_paths, Sampler::GREEDY, None)?;
            let mut generate = || decoder.generate(&prompt, args.new_tokens, 64, true, |_| {});
            for _ in 0..args.warmup.max(1) {
                generate()?;
            }
            synchronize(device);
            cuda_runtime::reset_peak(device);
            let e0 = energy.total_mj();
            let mut runs = Vec::new();
            let mut clock = None;
            for _ in 0..args.steps.max(1) {
                let (run, c) = energy.with_clock(&mut generate);
                runs.push(run?);
                clock = clock.or(c);
            }
            let e1 = energy.total_mj();
            // The same step op by op (the host issues every kernel): its time, and whether
            // the graph replays gave its tokens.
            let eager = decoder.generate(&prompt, args.new_tokens, 64, false, |_| {})?;
            if let Some(dir) = &args.profile_dir {
                std::fs::create_dir_all(dir)?;
                let trace = dir.join(format!("generate-{}-b{b}.json", path.name()));
                profiler::start(true)?;
                let profiled = decoder.generate(&prompt, args.new_tokens, 64, true, |_| {});
                synchronize(device);
                profiler::stop(&trace)?;
                profiled?;
                println!("           trace of one generation: {}", trace.display());
            }
            runs.sort_by(|a, z| a.decode_s.total_cmp(&z.decode_s));
            let run = &runs[runs.len() / 2];
            let steps = run.decode_steps.max(1) as f64;
            let step_s = run.decode_s / steps;
            let tps = b as f64 / step_s;
            let tokens = Tensor::from_slice2(&run.tokens);
            let agree = match &dense_out {
                None => String::new(),
                Some((d, _)) => {
                    let same = tokens.eq_tensor(d).to_kind(Kind::Float).mean(Kind::Float);
                    format!(
                        " | tokens equal to dense {:.1} %",
                        same.double_value(&[]) * 100.0
                    )
                }
            };
            let ratio = dense_out
                .as_ref()
                .map_or(String::from("1.000x"), |(_, d)| format!("{:.3}x", tps / d));
            let energy_s = e0.zip(e1).map_or(String::from("energy n/a"), |(a, z)| {
                // Prefill and decode together, per generated token, over the timed runs.
                let j = (z - a) as f64 / 1e3;
                let made = (b as usize * args.new_tokens * runs.len()) as f64;
                format!("{:.2} mJ/generated token (prefill incl.)", j * 1e3 / made)
            });
            let peak = cuda_runtime::peak_allocated_bytes(device)
                .map_or(String::from("peak n/a"), |p| {
                    format!("peak alloc {:.2} GiB", p as f64 / GIB)
                });
            let clock = clock.map_or(String::new(), |c| format!(" | SM clock {c:.0} MHz"));
            // Replays and eager steps run the same kernels; a GEMM may still pick another
            // algorithm (split-K) under capture, so near-tied greedy tokens can flip.
            let eager_same = Tensor::from_slice2(&eager.tokens)
                .eq_tensor(&tokens)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]);
            let eager_s = format!(
                " | eager steps {:.3} ms/step, tokens equal to the replays' {:.1} %",
                eager.decode_s * 1e3 / eager.decode_steps.max(1) as f64,
                eager_same * 100.0
            );
            // Keys attended: 0..=position, on average the prompt and half the new tokens.
            let keys = (args.prompt_len + args.new_tokens / 2) as f64;
            let bytes = step_bytes(model, path, b as f64, live, keys);
            println!(
                "batch {b:>3} {:>6}: prefill {:8.2} ms | decode {:7.3} ms/step = {:9.1} tokens/s | {ratio} vs dense | {:.2} GB/step read at least: {:.0} GB/s, {:.0} % of 4.3 TB/s | {peak} | {energy_s}{clock}{agree}{eager_s}",
                path.name(),
                run.prefill_s * 1e3,
                step_s * 1e3,
                tps,
                bytes / 1e9,
                bytes / step_s / 1e9,
                bytes / step_s / 4.3e12 * 100.0,
            );
            // Where a decode step goes: layer 0's FFN alone on b tokens (synchronised, median
            // of 50), times the layer count, against the whole step. Its input is the normed
            // embedding of the last prompt token (it carries an imposed sparsity's channel).
            let blk = &model.blocks[0];
            let x = tch::no_grad(|| {
                let e = Tensor::embedding(
                    &model.embed,
                    &prompt.narrow(1, args.prompt_len as i64 - 1, 1),
                    -1,
                    false,
                    false,
                );
                rms_norm(&e, &blk.post_norm, m.rms_norm_eps)
            });
            let mut times = Vec::with_capacity(50);
            tch::no_grad(|| {
                for i in 0..60 {
                    synchronize(device);
                    let t0 = Instant::now();
                    let _ = model.ffn(blk, &x, path, false, None);
                    synchronize(device);
                    if i >= 10 {
                        times.push(t0.elapsed().as_secs_f64() * 1e3);
                    }
                }
            });
            times.sort_by(f64::total_cmp);
            let ffn_ms = times[times.len() / 2];
            // The same FFN once per layer (each layer's weights), back to back as in a step:
            // host time to issue them, then until the GPU is done.
            let (issue_ms, done_ms) = tch::no_grad(|| {
                let mut best = (f64::INFINITY, f64::INFINITY);
                for _ in 0..5 {
                    synchronize(device);
                    let t0 = Instant::now();
                    for blk in &model.blocks {
                        let _ = model.ffn(blk, &x, path, false, None);
                    }
                    let issued = t0.elapsed().as_secs_f64() * 1e3;
                    synchronize(device);
                    let done = t0.elapsed().as_secs_f64() * 1e3;
                    if done < best.1 {
                        best = (issued, done);
                    }
                }
                best
            });
            println!(
                "           {} FFN calls (every layer) back to back: issued in {issue_ms:.2} ms, done in {done_ms:.2} ms",
                m.num_layers
            );
            println!(
                "           one FFN call on {b} token(s): {ffn_ms:.3} ms (synchronised); x {} layers = {:.2} ms of the {:.2} ms step",
                m.num_layers,
                ffn_ms * m.num_layers as f64,
                step_s * 1e3
            );
            if dense_out.is_none() {
                dense_out = Some((tokens, tps));
            }
        }
    }
    Ok(())
}
