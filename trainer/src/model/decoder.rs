//! Generation with a static KV cache, each decode step captured once as a CUDA graph.
//!
//! [`Decoder::new`] allocates everything a generation touches: the KV cache at its full
//! length, the step's input token `[B, 1]`, the position (an int64 scalar on the device),
//! the token of every position `[B, capacity]` and the stop flags. The prompt is prefilled
//! once; a decode step then embeds the token, runs the blocks (the residual add fused with
//! RMSNorm, one GEMM for q, k and v, RoPE writing k and v straight into the cache at the
//! device's position, attention over keys `0..=position` read on the device, the FFN on its
//! path), the final norm, the LM head and the
//! [`Sampler`], and writes its token back into the input and into the sequence. A step
//! reads nothing from the host and allocates nothing outside the graph's pool, so on CUDA
//! one capture serves every position: [`Decoder::generate`] replays it and copies the
//! tokens to the host every `stream_every` steps (one synchronisation per chunk, not per
//! token). On the CPU the same step runs eagerly, which is how the tests check it against
//! the growing-cache loop of [`super::generate`].
//!
//! The residual stream is f32 (the norms' weights are kept in f32 for the fused kernel);
//! matrix products, the KV cache and attention run in the model's compute dtype.
use super::attention::attend_rotated;
use super::inference::{InferenceBlock, InferenceWeights};
use super::kv_cache::KvCache;
use super::llama::Llama;
use super::sampler::Sampler;
use anyhow::{bail, Context, Result};
use sparse_kernels::cuda::TwellStaticFfn;
use sparse_kernels::fused::attention::decode_attention;
use sparse_kernels::fused::rope::rope_qkv_into_cache;
use sparse_kernels::torch::cuda_graph::CudaGraph;
use sparse_kernels::{try_sparse_ffn, FfnPath, SparseFfnConfig};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// What one [`Decoder::generate`] did, and how long it took.
#[derive(Clone, Debug, Default)]
pub struct DecodeRun {
    /// `[B, n]` int64 on the CPU: the generated tokens (n <= max_new: fewer when every
    /// sequence stopped early).
    pub tokens: Vec<Vec<i64>>,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Decode steps run after the prefill (each produces one token per sequence).
    pub decode_steps: usize,
    /// Whether the steps were replays of a captured CUDA graph.
    pub captured: bool,
}

/// A generator for `batch` sequences of up to `capacity` positions (prompt and new tokens).
pub struct Decoder<'m> {
    model: &'m Llama,
    weights: InferenceWeights,
    paths: Vec<FfnPath>,
    sampler: Sampler,
    stop: Option<i64>,
    batch: i64,
    capacity: i64,
    cache: KvCache,
    /// The token the next step embeds `[B, 1]`; the step overwrites it with its output.
    token: Tensor,
    /// The position of `token` (int64 scalar).
    pos: Tensor,
    /// Every position's token `[B, capacity]`: the prompt's and the generated ones.
    sequence: Tensor,
    /// Whether each sequence has emitted the stop token `[B, 1]`.
    done: Tensor,
    twell: Option<TwellStaticFfn>,
    graph: Option<CudaGraph>,
}

impl<'m> Decoder<'m> {
    /// A decoder over `model` (not tensor-parallel), its buffers on the model's device.
    /// `paths[l]`: layer l's FFN (dense or twell); `stop`: the token that ends a sequence.
    pub fn new(
        model: &'m Llama,
        batch: i64,
        capacity: i64,
        paths: &[FfnPath],
        sampler: Sampler,
        stop: Option<i64>,
    ) -> Result<Decoder<'m>> {
        let cfg = &model.cfg;
        if model.tp.as_ref().is_some_and(|tp| tp.size > 1) {
            bail!("the decoder runs the whole model in one process (no tensor parallelism)");
        }
        if batch < 1 || capacity < 2 {
            bail!("decoder: batch {batch} and capacity {capacity} must be >= 1 and >= 2");
        }
        if capacity > cfg.max_seq_len as i64 {
            bail!(
                "decoder: {capacity} positions exceed the model's max_seq_len {}",
                cfg.max_seq_len
            );
        }
        if paths.len() != model.blocks.len() {
            bail!(
                "decoder: {} FFN paths for {} layers",
                paths.len(),
                model.blocks.len()
            );
        }
        if let Some(p) = paths.iter().find(|p| **p == FfnPath::Hybrid) {
            bail!(
                "decoder: FFN path {} is the training format: use dense or twell",
                p.name()
            );
        }
        sampler.validate()?;
        let device = model.embed.device();
        let compute = model.compute;
        let cache = KvCache::new(cfg, batch, capacity, compute, device);
        let sparse_on_cuda = device.is_cuda() && paths.contains(&FfnPath::Twell);
        let twell = if sparse_on_cuda {
            let (d, h) = (cfg.hidden_size as i64, cfg.intermediate_size as i64);
            Some(TwellStaticFfn::new(batch, d, h, device).context("TwELL decode workspace")?)
        } else {
            None
        };
        let long = (Kind::Int64, device);
        Ok(Decoder {
            model,
            weights: InferenceWeights::new(model),
            paths: paths.to_vec(),
            sampler,
            stop,
            batch,
            capacity,
            cache,
            token: Tensor::zeros([batch, 1], long),
            pos: Tensor::zeros([], long),
            sequence: Tensor::zeros([batch, capacity], long),
            done: Tensor::zeros([batch, 1], (Kind::Bool, device)),
            twell,
            graph: None,
        })
    }

    /// Generates up to `max_new` tokens after `prompt: [B, T]` (int64, on the model's
    /// device), calling `emit` with each chunk of new tokens (per sequence, in order) as it
    /// reaches the host, every `stream_every` steps. Stops early once every sequence has
    /// emitted the stop token. On CUDA the decode step is captured on the first call and
    /// replayed (pass `capture: false` for the eager step everywhere).
    pub fn generate(
        &mut self,
        prompt: &Tensor,
        max_new: usize,
        stream_every: usize,
        capture: bool,
        mut emit: impl FnMut(&[Vec<i64>]),
    ) -> Result<DecodeRun> {
        let (b, t) = prompt.size2().context("prompt must be [B, T]")?;
        let device = self.model.embed.device();
        if b != self.batch || t < 1 {
            bail!(
                "prompt {:?}: the decoder was made for batch {}",
                prompt.size(),
                self.batch
            );
        }
        if t + max_new as i64 > self.capacity {
            bail!(
                "prompt {t} + {max_new} new tokens exceed the decoder's {} positions",
                self.capacity
            );
        }
        let mut run = DecodeRun {
            tokens: vec![Vec::new(); b as usize],
            ..DecodeRun::default()
        };
        if max_new == 0 {
            return Ok(run);
        }
        let _no_grad = tch::no_grad_guard();
        super::generate::synchronize(device);
        let t0 = Instant::now();
        let _ = self.prefill(&prompt.to_device(device))?;
        let first = self.sequence.narrow(1, t, 1).to_device(Device::Cpu);
        run.prefill_s = t0.elapsed().as_secs_f64();
        let mut emitted = self.take(&first, &mut run.tokens, &mut emit);
        let t1 = Instant::now();
        let use_graph = capture && device.is_cuda();
        if use_graph && self.graph.is_none() && max_new > 1 {
            self.capture()?;
        }
        run.captured = use_graph;
        let (mut made, mut stopped) = (1usize, self.all_done()?);
        while made < max_new && !stopped {
            match (&self.graph, use_graph) {
                (Some(g), true) => g.replay()?,
                _ => drop(self.step()?),
            }
            made += 1;
            if made == max_new || made % stream_every.max(1) == 0 {
                let chunk = self
                    .sequence
                    .narrow(1, t + emitted as i64, (made - emitted) as i64)
                    .to_device(Device::Cpu);
                emitted += self.take(&chunk, &mut run.tokens, &mut emit);
                stopped = self.all_done()?;
            }
        }
        super::generate::synchronize(device);
        run.decode_s = t1.elapsed().as_secs_f64();
        run.decode_steps = made - 1;
        Ok(run)
    }

    /// Appends `chunk: [B, n]` (on the CPU) to each sequence, stopping each at its stop
    /// token, hands the new tokens to `emit` and returns n.
    fn take(
        &self,
        chunk: &Tensor,
        tokens: &mut [Vec<i64>],
        emit: &mut impl FnMut(&[Vec<i64>]),
    ) -> usize {
        let n = chunk.size()[1] as usize;
        let mut fresh = vec![Vec::new(); tokens.len()];
        for (row, (seq, new)) in tokens.iter_mut().zip(&mut fresh).enumerate() {
            let ids = Vec::<i64>::try_from(chunk.get(row as i64)).unwrap_or_default();
            for id in ids {
                if self.stop.is_some() && seq.last().copied() == self.stop {
                    break;
                }
                seq.push(id);
                new.push(id);
            }
        }
        emit(&fresh);
        n
    }

    fn all_done(&self) -> Result<bool> {
        Ok(self.stop.is_some() && self.done.all().f_int64_value(&[])? != 0)
    }

    /// Runs the prompt through the model from position 0, filling the cache, and samples
    /// the first token into `token` and `sequence`; `pos` ends at the prompt's length.
    /// Returns the last position's logits.
    fn prefill(&mut self, prompt: &Tensor) -> Result<Tensor> {
        let t = prompt.size()[1];
        let _ = self.pos.zero_();
        let _ = self.done.zero_();
        self.sequence.narrow(1, 0, t).copy_(prompt);
        let logits = self.forward(prompt, true)?;
        let _ = self.pos.fill_(t - 1);
        self.finish_step(&logits);
        Ok(logits)
    }

    /// One decode step at the device's position: `token` in, the next token out. Returns
    /// the step's logits.
    fn step(&self) -> Result<Tensor> {
        let logits = self.forward(&self.token, false)?;
        self.finish_step(&logits);
        Ok(logits)
    }

    /// Samples from `logits: [B, V]`, writes the token into `token` and at position
    /// `pos + 1` of `sequence`, updates the stop flags and advances `pos`: all on the device.
    fn finish_step(&self, logits: &Tensor) {
        let next = self.sampler.sample(logits);
        let at = (&self.pos + 1).view([1]);
        let _ = self.sequence.shallow_clone().index_copy_(1, &at, &next);
        self.token.shallow_clone().copy_(&next);
        if let Some(s) = self.stop {
            let _ = self.done.shallow_clone().logical_or_(&next.eq(s));
        }
        let mut pos = self.pos.shallow_clone();
        pos += 1;
    }

    /// Records the decode step as a CUDA graph, after two eager steps on the graph's stream
    /// (whose effects on the position, token, sequence and stop flags are undone; the cache
    /// rows they wrote are rewritten by the real steps at those positions).
    fn capture(&mut self) -> Result<()> {
        let state = || [&self.pos, &self.token, &self.sequence, &self.done];
        let saved = state().map(|t| t.copy());
        let warmup = || -> Result<()> {
            for _ in 0..2 {
                let _ = self.step()?;
            }
            for (t, s) in state().into_iter().zip(&saved) {
                t.shallow_clone().copy_(s);
            }
            Ok(())
        };
        let step = || self.step().map(drop);
        let graph = CudaGraph::capture(self.model.embed.device(), warmup, step)?;
        self.graph = Some(graph);
        Ok(())
    }

    /// Logits `[B, V]` (f32) of the last position of `tokens: [B, T]`, placed at the
    /// device's position `pos` (prefill: a whole prompt from position 0, causal).
    fn forward(&self, tokens: &Tensor, prefill: bool) -> Result<Tensor> {
        let m = self.model;
        let (b, t) = tokens.size2()?;
        let hd = m.cfg.head_dim() as i64;
        let (nh, nkv) = m.local_heads();
        let attend = |l: usize, qkv: &Tensor| -> Result<Tensor> {
            let (kc, vc) = &self.cache.layers[l];
            let q = rope_qkv_into_cache(qkv, (&m.cos, &m.sin), nh, nkv, &self.pos, (kc, vc))?;
            if !prefill {
                return Ok(decode_attention(&q, (kc, vc), &self.pos)?.view([b, 1, nh * hd]));
            }
            // The prompt from position 0: causal attention over the keys just written.
            let y = attend_rotated(&q, &kc.narrow(2, 0, t), &vc.narrow(2, 0, t), 0, None);
            Ok(y.transpose(1, 2).reshape([b, t, nh * hd]))
        };
        let ffn = |l: usize, blk: &InferenceBlock, x: &Tensor| self.ffn(blk, x, self.paths[l]);
        let last = self.weights.blocks_forward(m, tokens, attend, ffn)?;
        let h = last.narrow(1, t - 1, 1).squeeze_dim(1);
        // The head through cuBLAS: at 201 MB (1.5b) its GEMM reads at 3.9 TB/s already.
        Ok(h.matmul(&self.weights.head.tr()).to_kind(Kind::Float))
    }

    /// The FFN of `x: [N, D]`: TwELL through the decoder's own workspace when N is the
    /// decode batch on CUDA (a captured step needs fixed buffers), else the one dispatch.
    fn ffn(&self, blk: &InferenceBlock, x: &Tensor, path: FfnPath) -> Result<Tensor> {
        if let (FfnPath::Twell, Some(tw)) = (path, &self.twell) {
            if x.size()[0] == self.batch {
                return Ok(tw.forward(x, &blk.gate, &blk.up, &blk.down_t)?);
            }
        }
        let config = SparseFfnConfig {
            statistics: false,
            ..SparseFfnConfig::default()
        };
        Ok(try_sparse_ffn(x, &blk.ffn_weights(), path, &config)?.y)
    }
}

#[cfg(test)]
mod tests {
    use super::super::generate::generate_tokens;
    use super::super::llama::{seeded_model, CachedOutput};
    use super::*;
    use crate::config::ModelConfig;
    use tch::nn::VarStore;

    fn model(kv_heads: usize) -> (VarStore, Llama) {
        let cfg = ModelConfig {
            num_kv_heads: Some(kv_heads),
            init_std: 0.3,
            ..ModelConfig::tiny_shaped(97, 32, 64, 3, 40)
        };
        seeded_model(7, &cfg)
    }

    fn max_err(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// The static cache (attention over keys 0..=position read on the device, RoPE at the
    /// device's position, k and v written in place) gives the growing cache's logits at the
    /// prefill and at every decode step, GQA and MHA.
    #[test]
    fn static_cache_logits_equal_the_growing_cache() {
        for kv in [2, 4] {
            let (_vs, m) = model(kv);
            let paths = [FfnPath::Dense; 3];
            let prompt = Tensor::randint(97, [2, 7], (Kind::Int64, Device::Cpu));
            let mut dec = Decoder::new(&m, 2, 20, &paths, Sampler::GREEDY, None).unwrap();
            let mut cache = KvCache::new(&m.cfg, 2, 20, Kind::Float, Device::Cpu);
            tch::no_grad(|| {
                let got = dec.prefill(&prompt).unwrap();
                let want =
                    m.forward_cached(&prompt, Some(&mut cache), &paths, CachedOutput::LastLogits);
                assert!(
                    max_err(&got, &want.squeeze_dim(1)) < 1e-4,
                    "prefill, kv {kv}"
                );
                for step in 0..12 {
                    let token = dec.token.copy();
                    let got = dec.step().unwrap();
                    let want = m.forward_cached(
                        &token,
                        Some(&mut cache),
                        &paths,
                        CachedOutput::LastLogits,
                    );
                    let err = max_err(&got, &want.squeeze_dim(1));
                    assert!(err < 1e-4, "step {step}, kv {kv}: max |err| {err:e}");
                }
            });
        }
    }

    /// Greedy tokens of the decoder equal the eager growing-cache loop's, dense and the CPU
    /// TwELL reference, batch 2; the streamed chunks add up to the tokens.
    #[test]
    fn greedy_tokens_equal_the_eager_loop_and_stream_in_chunks() {
        for path in [FfnPath::Dense, FfnPath::Twell] {
            let (_vs, m) = model(2);
            let paths = [path; 3];
            let prompt = Tensor::randint(97, [2, 5], (Kind::Int64, Device::Cpu));
            let (want, _) = generate_tokens(&m, &prompt, 21, Sampler::GREEDY, &paths, true, None);
            let mut dec = Decoder::new(&m, 2, 26, &paths, Sampler::GREEDY, None).unwrap();
            let mut chunks: Vec<Vec<Vec<i64>>> = Vec::new();
            let run = dec
                .generate(&prompt, 21, 4, true, |c| chunks.push(c.to_vec()))
                .unwrap();
            assert!(!run.captured, "the CPU steps eagerly");
            assert_eq!(run.decode_steps, 20);
            for row in 0..2 {
                let w = Vec::<i64>::try_from(want.get(row as i64)).unwrap();
                assert_eq!(run.tokens[row], w, "{path:?} row {row}");
                let streamed: Vec<i64> = chunks.iter().flat_map(|c| c[row].clone()).collect();
                assert_eq!(streamed, w, "streamed, row {row}");
            }
            // The prefill's token, then chunks of 4 steps, then the remainder.
            let sizes: Vec<usize> = chunks.iter().map(|c| c[0].len()).collect();
            assert_eq!(sizes, [1, 3, 4, 4, 4, 4, 1]);
            // A second generation on the same decoder starts afresh.
            let again = dec.generate(&prompt, 21, 8, true, |_| {}).unwrap();
            assert_eq!(again.tokens, run.tokens);
        }
    }

    /// A sequence ends at its stop token; the run ends once every sequence has stopped.
    #[test]
    fn stop_token_ends_each_sequence() {
        let (_vs, m) = model(2);
        let paths = [FfnPath::Dense; 3];
        let prompt = Tensor::randint(97, [2, 5], (Kind::Int64, Device::Cpu));
        let mut free = Decoder::new(&m, 2, 40, &paths, Sampler::GREEDY, None).unwrap();
        let full = free.generate(&prompt, 30, 4, true, |_| {}).unwrap().tokens;
        let stop = full[0][3];
        let mut dec = Decoder::new(&m, 2, 40, &paths, Sampler::GREEDY, Some(stop)).unwrap();
        let run = dec.generate(&prompt, 30, 4, true, |_| {}).unwrap();
        let first = full[0].iter().position(|&t| t == stop).unwrap();
        assert_eq!(run.tokens[0], full[0][..=first]);
        match full[1].iter().position(|&t| t == stop) {
            Some(i) => {
                assert_eq!(run.tokens[1], full[1][..=i]);
                assert!(run.decode_steps < 29, "stopped early");
            }
            None => assert_eq!(run.tokens[1], full[1]),
        }
    }

    #[test]
    fn bad_requests_are_named_errors() {
        let (_vs, m) = model(2);
        let paths = [FfnPath::Dense; 3];
        let err = |r: Result<Decoder>| r.err().unwrap().to_string();
        assert!(err(Decoder::new(&m, 1, 41, &paths, Sampler::GREEDY, None)).contains("max_seq_len"));
        assert!(
            err(Decoder::new(&m, 1, 8, &paths[..2], Sampler::GREEDY, None)).contains("3 layers")
        );
        assert!(err(Decoder::new(
            &m,
            1,
            8,
            &[FfnPath::Hybrid; 3],
            Sampler::GREEDY,
            None
        ))
        .contains("training format"));
        let mut dec = Decoder::new(&m, 1, 8, &paths, Sampler::GREEDY, None).unwrap();
        let prompt = Tensor::zeros([1, 5], (Kind::Int64, Device::Cpu));
        let e = dec
            .generate(&prompt, 4, 1, true, |_| {})
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("exceed"), "{e}");
    }
}
