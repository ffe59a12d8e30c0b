//! The fused inference forward: the model's weights as inference multiplies by them (q, k and
//! v stacked for one GEMM, the norms in f32 for the fused residual add + RMSNorm kernel, every
//! matrix in the compute dtype, made once) and the one block loop over them that both the
//! captured decoder ([`super::decoder`]) and the plain forward of a batch from position 0
//! ([`InferenceWeights::hidden`], what `bench infer` times) run.
//!
//! Per block: the residual add fused with RMSNorm, one GEMM for q, k and v, the caller's
//! attention (RoPE fused with the head split, then SDPA or the decoder's cache kernels), the
//! output GEMM, add + RMSNorm, the FFN on its path. The residual stream is f32.
use super::attention::attend_rotated;
use super::llama::Llama;
use anyhow::Result;
use sparse_kernels::fused::linear::inference_linear;
use sparse_kernels::fused::norm::add_rms_norm;
use sparse_kernels::fused::rope::rope_qkv;
use sparse_kernels::{try_sparse_ffn, FfnPath, FfnWeights, SparseFfnConfig};
use tch::{Kind, Tensor};

/// One block's weights as inference multiplies by them.
pub struct InferenceBlock {
    pub input_norm: Tensor,
    /// q, k and v stacked `[(heads + 2 kv_heads) hd, D]`.
    pub qkv: Tensor,
    pub o: Tensor,
    pub post_norm: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub down_t: Tensor,
}

impl InferenceBlock {
    pub fn ffn_weights(&self) -> FfnWeights<'_> {
        FfnWeights::new(&self.gate, &self.up, &self.down_t)
    }
}

/// Every weight of a model (not tensor-parallel) for inference, made once from its masters.
pub struct InferenceWeights {
    pub blocks: Vec<InferenceBlock>,
    /// The final norm's weight (f32).
    pub norm: Tensor,
    /// The LM head (compute dtype).
    pub head: Tensor,
}

impl InferenceWeights {
    pub fn new(model: &Llama) -> InferenceWeights {
        let compute = model.compute;
        tch::no_grad(|| {
            let c = |t: &Tensor| t.to_kind(compute);
            let f = |t: &Tensor| t.to_kind(Kind::Float);
            InferenceWeights {
                blocks: model
                    .blocks
                    .iter()
                    .map(|b| InferenceBlock {
                        input_norm: f(&b.input_norm),
                        qkv: Tensor::cat(&[&b.q, &b.k, &b.v], 0).to_kind(compute),
                        o: c(&b.o),
                        post_norm: f(&b.post_norm),
                        gate: c(&b.gate),
                        up: c(&b.up),
                        down_t: c(&b.down_t),
                    })
                    .collect(),
                norm: f(&model.norm),
                head: c(model.head()),
            }
        })
    }

    /// The blocks and the final norm over `tokens: [B, T]`: the normed last hidden states
    /// `[B, T, D]` in the compute dtype. `attend(l, qkv)` turns layer l's stacked q/k/v rows
    /// `[B, T, (heads + 2 kv_heads) hd]` into the attention output `[B, T, heads hd]`;
    /// `ffn(l, block, x)` is layer l's FFN of `x: [B T, D]`.
    pub fn blocks_forward(
        &self,
        model: &Llama,
        tokens: &Tensor,
        mut attend: impl FnMut(usize, &Tensor) -> Result<Tensor>,
        mut ffn: impl FnMut(usize, &InferenceBlock, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let cfg = &model.cfg;
        let (b, t) = tokens.size2()?;
        let d = cfg.hidden_size as i64;
        let eps = cfg.rms_norm_eps;
        let compute = model.compute;
        let mut x = Tensor::embedding(&model.embed, tokens, -1, false, false).to_kind(Kind::Float);
        let mut pending: Option<Tensor> = None;
        for (l, blk) in self.blocks.iter().enumerate() {
            let normed = add_rms_norm(&x, pending.as_ref(), &blk.input_norm, eps, compute)?;
            let qkv = inference_linear(&normed.normed, &blk.qkv)?;
            let a = inference_linear(&attend(l, &qkv)?, &blk.o)?;
            let normed = add_rms_norm(&normed.residual, Some(&a), &blk.post_norm, eps, compute)?;
            let y = ffn(l, blk, &normed.normed.view([b * t, d]))?;
            x = normed.residual;
            pending = Some(y.view([b, t, d]));
        }
        Ok(add_rms_norm(&x, pending.as_ref(), &self.norm, eps, compute)?.normed)
    }

    /// The normed last hidden states `[B, T, D]` of `tokens: [B, T]` from position 0
    /// (causal, no cache), each layer's FFN on `paths[l]` without statistics: the decoder
    /// body as `bench infer` measures it (the LM head excluded).
    pub fn hidden(&self, model: &Llama, tokens: &Tensor, paths: &[FfnPath]) -> Result<Tensor> {
        let (b, t) = tokens.size2()?;
        let (nh, nkv) = model.local_heads();
        let hd = model.cfg.head_dim() as i64;
        let attend = |_: usize, qkv: &Tensor| -> Result<Tensor> {
            let [q, k, v] = rope_qkv(qkv, (&model.cos, &model.sin), nh, nkv, 0)?;
            let y = attend_rotated(&q, &k, &v, 0, None);
            Ok(y.transpose(1, 2).reshape([b, t, nh * hd]))
        };
        let config = SparseFfnConfig {
            statistics: false,
            ..SparseFfnConfig::default()
        };
        let ffn = |l: usize, blk: &InferenceBlock, x: &Tensor| -> Result<Tensor> {
            Ok(try_sparse_ffn(x, &blk.ffn_weights(), paths[l], &config)?.y)
        };
        tch::no_grad(|| self.blocks_forward(model, tokens, attend, ffn))
    }
}

#[cfg(test)]
mod tests {
    use super::super::llama::{seeded_model, CachedOutput};
    use super::*;
    use crate::config::ModelConfig;

    /// The fused forward equals the model's own causal forward (`forward_cached` without a
    /// cache, unfused ops), on the dense FFN path and on TwELL's, GQA and MHA. On the CPU
    /// both run in f32, so the bound is f32 reassociation.
    #[test]
    fn hidden_equals_the_unfused_forward() {
        for kv_heads in [1, 4] {
            let cfg = ModelConfig {
                num_kv_heads: Some(kv_heads),
                init_std: 0.3,
                ..ModelConfig::tiny_shaped(97, 32, 64, 3, 40)
            };
            let (_vs, model) = seeded_model(11, &cfg);
            let tokens = Tensor::randint(97, [2, 9], (Kind::Int64, tch::Device::Cpu));
            let weights = InferenceWeights::new(&model);
            for path in [FfnPath::Dense, FfnPath::Twell] {
                let paths = vec![path; 3];
                let got = weights.hidden(&model, &tokens, &paths).unwrap();
                let want = tch::no_grad(|| {
                    model.forward_cached(&tokens, None, &paths, CachedOutput::Hidden)
                });
                assert_eq!(got.size(), want.size());
                let err = (&got - &want).abs().max().double_value(&[]);
                let scale = want.abs().max().double_value(&[]);
                assert!(
                    err <= 1e-5 * scale,
                    "kv_heads {kv_heads}, {}: {err:e} of {scale:e}",
                    path.name()
                );
            }
        }
    }
}
