//! `sparse-train bench generate`: generation throughput at a config's shape, on the model
//! [`super::e2e`] built and calibrated (its arguments: [`BenchE2eArgs`]).
//!
//! **generate**: `generate_tokens` (prefill of a random prompt, then greedy decoding of one
//! token per step against the KV cache, LM head included, no early stop) at each
//! `--gen-batch`, bf16 weights; dense = `Dense`, sparse = `Twell`. Reported per path and
//! batch: prefill ms, decode ms/step, decode tokens/s, energy per decoded token, and how
//! many greedy tokens agree with the dense path's (bf16 rounding can flip near-ties).
use super::common::{BenchE2eArgs, Energy, GIB};
use crate::model::{generate_tokens, rms_norm, synchronize, Llama, Sampler};
use anyhow::{bail, Result};
use sparse_kernels::cuda_runtime;
use sparse_kernels::FfnPath;
use std::time::Instant;
use tch::{Kind, Tensor};

/// `bench generate`: each path at each batch size, on the calibrated model.
pub(super) fn run_generate(
    args: &BenchE2eArgs,
    model: &Llama,
    paths: &[FfnPath],
    energy: &Energy,
) -> Result<()> {
    let m = &model.cfg;
    let device = model.embed.device();
    if args.prompt_len == 0 || args.new_tokens == 0 {
        bail!("--prompt-len and --new-tokens must be >= 1");
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
    println!(
        "generate: prompt {} random tokens, {} new tokens per sequence (greedy, no early stop), warm-up {} untimed run(s) of the same length per path",
        args.prompt_len, args.new_tokens, args.warmup.max(1)
    );
    for &b in &args.gen_batch {
        let b = b as i64;
        tch::manual_seed(1);
        let prompt = Tensor::randint(
            m.vocab_size as i64,
            [b, args.prompt_len as i64],
            (Kind::Int64, device),
        );
        let mut dense_out: Option<(Tensor, f64)> = None;
        for &path in paths {
            let layer_paths = vec![path; m.num_layers];
            // Untimed full-length runs first: measured, the first path of a process decodes
            // ~6x slower for its first ~10 s (93 vs 16 ms per step at 1.5b, batch 1, the same
            // whichever path goes first), so a short warm-up is not enough.
            let generate = || {
                generate_tokens(
                    model,
                    &prompt,
                    args.new_tokens,
                    Sampler::GREEDY,
                    &layer_paths,
                    true,
                    None,
                )
            };
            for _ in 0..args.warmup.max(1) {
                let _ = generate();
            }
            synchronize(device);
            cuda_runtime::reset_peak(device);
            let e0 = energy.total_mj();
            let ((tokens, stats), clock) = energy.with_clock(generate);
            let e1 = energy.total_mj();
            let decoded = (b as usize * stats.decode_steps) as f64;
            let tps = decoded / stats.decode_s;
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
                // Prefill and decode together, per generated token.
                let j = (z - a) as f64 / 1e3;
                format!(
                    "{:.2} mJ/generated token (prefill incl.)",
                    j * 1e3 / (b as f64 * args.new_tokens as f64)
                )
            });
            let peak = cuda_runtime::peak_allocated_bytes(device)
                .map_or(String::from("peak n/a"), |p| {
                    format!("peak alloc {:.2} GiB", p as f64 / GIB)
                });
            let clock = clock.map_or(String::new(), |c| format!(" | SM clock {c:.0} MHz"));
            println!(
                "batch {b:>3} {:>6}: prefill {:8.2} ms | decode {:7.3} ms/step = {:9.1} tokens/s | {ratio} vs dense | {peak} | {energy_s}{clock}{agree}",
                path.name(),
                stats.prefill_s * 1e3,
                stats.decode_s * 1e3 / stats.decode_steps.max(1) as f64,
                tps,
            );
            // Where a decode step goes: layer 0's FFN alone on b tokens (synchronised, median
            // of 50), times the layer count, against the whole step. Its input is the normed
            // embedding of the last prompt token (it carries the imposed-sparsity channel).
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
                stats.decode_s * 1e3 / stats.decode_steps.max(1) as f64
            );
            if dense_out.is_none() {
                dense_out = Some((tokens, tps));
            }
        }
    }
    Ok(())
}
