//! The generation loop: prefill a prompt once, then decode one token per step against the
//! KV cache (or, as the reference the cache is checked against, recompute the whole
//! sequence each step), eagerly: one host call per op. The captured form, which `generate`
//! runs on CUDA, is [`super::decoder`]; this loop is the reference it is tested against.
use super::kv_cache::KvCache;
use super::llama::{CachedOutput, Llama};
use super::sampler::Sampler;
use sparse_kernels::FfnPath;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Timings of one [`generate_tokens`] call.
#[derive(Clone, Copy, Debug, Default)]
pub struct GenStats {
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Decode steps run (each produces one token per sequence).
    pub decode_steps: usize,
}

/// Waits for the device's queued work (timings of GPU work end here); no-op on the CPU.
pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Generates up to `max_new` tokens after `prompt: [B, T]` (int64, on the model's device)
/// and returns them as `[B, n]`. With `use_cache` the prompt is prefilled once and each step
/// feeds one token against the KV cache; without it every step recomputes the full forward
/// over the whole sequence (the reference the cache is tested against). `stop` ends the
/// loop once every sequence has produced that token.
pub fn generate_tokens(
    model: &Llama,
    prompt: &Tensor,
    max_new: usize,
    sampler: Sampler,
    paths: &[FfnPath],
    use_cache: bool,
    stop: Option<i64>,
) -> (Tensor, GenStats) {
    tch::no_grad(|| {
        let (b, t) = prompt.size2().expect("prompt must be [B, T]");
        let device = prompt.device();
        let mut stats = GenStats::default();
        if max_new == 0 {
            return (Tensor::zeros([b, 0], (Kind::Int64, device)), stats);
        }
        let kind = model.embed.kind();
        let mut cache =
            use_cache.then(|| KvCache::new(&model.cfg, b, t + max_new as i64, kind, device));
        let mut done = Tensor::zeros([b, 1], (Kind::Bool, device));
        let mut out: Vec<Tensor> = Vec::with_capacity(max_new);
        let mut seq = prompt.shallow_clone();
        synchronize(device);
        let t0 = Instant::now();
        let logits = model.forward_cached(prompt, cache.as_mut(), paths, CachedOutput::LastLogits);
        let mut next = sampler.sample(&logits.squeeze_dim(1));
        synchronize(device);
        stats.prefill_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        loop {
            out.push(next.shallow_clone());
            if let Some(s) = stop {
                done = done.logical_or(&next.eq(s));
                if done.all().int64_value(&[]) != 0 {
                    break;
                }
            }
            if out.len() == max_new {
                break;
            }
            let logits = match cache.as_mut() {
                Some(c) => model.forward_cached(&next, Some(c), paths, CachedOutput::LastLogits),
                None => {
                    seq = Tensor::cat(&[&seq, &next], 1);
                    model.forward_cached(&seq, None, paths, CachedOutput::LastLogits)
                }
            };
            next = sampler.sample(&logits.squeeze_dim(1));
            stats.decode_steps += 1;
        }
        synchronize(device);
        stats.decode_s = t1.elapsed().as_secs_f64();
        (Tensor::cat(&out, 1), stats)
    })
}

#[cfg(test)]
mod tests {
    use super::super::llama::{seeded_model, to_bf16};
    use super::*;
    use crate::config::ModelConfig;
    use tch::nn::VarStore;

    fn model(init_std: f64, kv_heads: usize) -> (VarStore, Llama) {
        let cfg = ModelConfig {
            num_kv_heads: Some(kv_heads),
            init_std,
            ..ModelConfig::tiny_shaped(97, 32, 64, 3, 40)
        };
        seeded_model(7, &cfg)
    }

    /// Greedy decoding with the KV cache emits exactly the tokens of recomputing the full
    /// forward at every step (GQA and MHA, dense and TwELL-reference FFN, batch 2).
    #[test]
    fn kv_cache_greedy_matches_full_recompute() {
        for (kv, path) in [
            (2, FfnPath::Dense),
            (4, FfnPath::Dense),
            (2, FfnPath::Twell),
        ] {
            let (_vs, m) = model(0.3, kv);
            let prompt = Tensor::randint(97, [2, 7], (Kind::Int64, Device::Cpu));
            let paths = [path; 3];
            let (cached, s) = generate_tokens(&m, &prompt, 25, Sampler::GREEDY, &paths, true, None);
            let (full, _) = generate_tokens(&m, &prompt, 25, Sampler::GREEDY, &paths, false, None);
            assert_eq!(cached.size(), [2, 25]);
            assert_eq!(s.decode_steps, 24);
            assert_eq!(
                Vec::<i64>::try_from(cached.reshape([-1])).unwrap(),
                Vec::<i64>::try_from(full.reshape([-1])).unwrap(),
                "kv {kv} path {path:?}"
            );
            // Not a degenerate sequence: the test would be vacuous on one repeated token.
            let distinct = cached.get(0).unique_dim(0, false, false, false).0.size()[0];
            assert!(distinct > 3, "only {distinct} distinct tokens");
        }
    }

    /// Logits at every position agree between `forward`, a cache-free `forward_cached`, and
    /// a cache filled in uneven chunks (prefill, a 3-token chunk with a mask, single tokens).
    #[test]
    fn chunked_cache_logits_match_forward() {
        let (_vs, m) = model(0.3, 2);
        let tokens = Tensor::randint(97, [2, 12], (Kind::Int64, Device::Cpu));
        let paths = [FfnPath::Dense; 3];
        tch::no_grad(|| {
            let want = m.forward(&tokens, &paths).logits;
            let plain = m.forward_cached(&tokens, None, &paths, CachedOutput::AllLogits);
            assert!(plain.allclose(&want, 1e-5, 1e-5, false));
            let mut cache = KvCache::new(&m.cfg, 2, 12, Kind::Float, Device::Cpu);
            let mut got = Vec::new();
            for (start, len) in [(0, 5), (5, 3), (8, 1), (9, 1), (10, 2)] {
                let chunk = tokens.narrow(1, start, len);
                got.push(m.forward_cached(
                    &chunk,
                    Some(&mut cache),
                    &paths,
                    CachedOutput::AllLogits,
                ));
            }
            assert_eq!(cache.len(), 12);
            let got = Tensor::cat(&got, 1);
            let err = (&got - &want).abs().max().double_value(&[]);
            assert!(err < 1e-4, "max |err| {err}");
        });
    }

    /// A bf16 model (as `generate` makes one on CUDA) decodes with its KV cache: bf16
    /// queries, keys and values throughout, the same tokens as without the cache.
    #[test]
    fn bf16_model_generates_with_the_cache() {
        let (mut vs, mut m) = model(0.5, 2);
        to_bf16(&mut vs, &mut m);
        let prompt = Tensor::from_slice(&[3i64, 9, 4, 1, 7, 2]).view([2, 3]);
        let paths = vec![FfnPath::Dense; m.cfg.num_layers];
        let (cached, _) = generate_tokens(&m, &prompt, 5, Sampler::GREEDY, &paths, true, None);
        let (plain, _) = generate_tokens(&m, &prompt, 5, Sampler::GREEDY, &paths, false, None);
        assert_eq!(cached.size(), [2, 5]);
        assert!(cached.equal(&plain), "{cached} vs {plain}");
    }
}
