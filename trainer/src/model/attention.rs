//! The attention core shared by training and decoding: rotary embeddings, the KV-cache
//! append, the causal mask and scaled dot-product attention. The projections around it live
//! with the model's weights in [`super::llama`].
use crate::config::ModelConfig;
use sparse_kernels::fused::rope::rotate;
use tch::{Device, Kind, Tensor};

/// RoPE tables `[max_seq_len, head_dim]` for HF's rotate-half layout: `cos`, and `sin` with
/// its first half negated, so that `rotate_half(x) * sin = [-x2, x1] * [sin1, sin2]` is
/// `roll(x, hd / 2) * [-sin1, sin2]` (see `sparse_kernels::fused::rope::rotate`).
pub(super) fn rope_tables(cfg: &ModelConfig, device: Device) -> (Tensor, Tensor) {
    let hd = cfg.head_dim() as i64;
    let inv_freq = (Tensor::arange_start_step(0, hd, 2, (Kind::Float, device)) / hd as f64)
        .multiply_scalar(cfg.rope_theta.ln())
        .exp()
        .reciprocal();
    let pos = Tensor::arange(cfg.max_seq_len as i64, (Kind::Float, device));
    let freqs = pos.outer(&inv_freq);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    let sin = emb.sin();
    let half = hd / 2;
    let signed_sin = Tensor::cat(
        &[sin.narrow(-1, 0, half).neg(), sin.narrow(-1, half, half)],
        -1,
    );
    (emb.cos(), signed_sin)
}

/// Attention of `q: [B, heads, T, hd]` over `k, v: [B, kv_heads, T, hd]` placed at positions
/// `pos..pos + T`, RoPE applied here by `rotate` with the table rows of those positions (three
/// elementwise kernels each way; the training forward fuses it with the head split instead,
/// `sparse_kernels::fused::rope`). See [`attend_rotated`].
pub(super) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    pos: i64,
    kv: Option<&mut (Tensor, Tensor)>,
) -> Tensor {
    let t = q.size()[2];
    let cos = cos.narrow(0, pos, t);
    let sin = sin.narrow(0, pos, t);
    let q = rotate(q, &cos, &sin);
    let k = rotate(k, &cos, &sin);
    attend_rotated(&q, &k, v, pos, kv)
}

/// Attention of already rotated `q: [B, heads, T, hd]` over `k, v: [B, kv_heads, T, hd]` at
/// positions `pos..pos + T`. With `kv`, the new keys and values are written into the cache
/// tensors at those positions and the queries attend to positions `0..pos + T`. Causal SDPA
/// from position 0, no mask for one new token, an explicit mask otherwise. Returns
/// `[B, heads, T, hd]`.
pub(super) fn attend_rotated(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pos: i64,
    kv: Option<&mut (Tensor, Tensor)>,
) -> Tensor {
    let t = q.size()[2];
    let (k, v) = match kv {
        None => (k.shallow_clone(), v.shallow_clone()),
        Some((kc, vc)) => {
            kc.narrow(2, pos, t).copy_(k);
            vc.narrow(2, pos, t).copy_(v);
            (kc.narrow(2, 0, pos + t), vc.narrow(2, 0, pos + t))
        }
    };
    // Query i (position pos + i) sees keys 0..=pos + i.
    let mask = (pos > 0 && t > 1).then(|| {
        let dev = q.device();
        let qi = Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(1) + pos;
        let kj = Tensor::arange(pos + t, (Kind::Int64, dev)).unsqueeze(0);
        kj.le_tensor(&qi)
    });
    let grouped = q.size()[1] != k.size()[1];
    Tensor::scaled_dot_product_attention(
        q,
        &k,
        &v,
        mask.as_ref(),
        0.0,
        pos == 0 && t > 1,
        None,
        grouped,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    /// HF's formula, `x * cos + rotate_half(x) * sin` with `rotate_half(x) = [-x2, x1]`, in
    /// f64: the reference the three-kernel form must equal to f32 rounding, values and
    /// gradients.
    #[test]
    fn rope_equals_hf_rotate_half_values_and_gradients() {
        let cfg = ModelConfig::tiny(); // head_dim 8, 12 positions
        let hd = cfg.head_dim() as i64;
        let (cos, signed_sin) = rope_tables(&cfg, Device::Cpu);
        tch::manual_seed(7);
        let x = Tensor::randn([2, 3, 12, hd], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let dy = Tensor::randn([2, 3, 12, hd], (Kind::Float, Device::Cpu));
        let got = rotate(&x, &cos, &signed_sin);
        let dx_got = Tensor::run_backward(&[(&got * &dy).sum(Kind::Float)], &[&x], false, false);

        let x64 = x.detach().to_kind(Kind::Double).set_requires_grad(true);
        let half = hd / 2;
        let sin = signed_sin
            .narrow(-1, half, half)
            .repeat([1, 2])
            .to_kind(Kind::Double);
        let rotated = Tensor::cat(
            &[x64.narrow(-1, half, half).neg(), x64.narrow(-1, 0, half)],
            -1,
        );
        let want = &x64 * cos.to_kind(Kind::Double) + rotated * sin;
        let dx_want = Tensor::run_backward(
            &[(&want * dy.to_kind(Kind::Double)).sum(Kind::Double)],
            &[&x64],
            false,
            false,
        );
        // Each element is a rounded two-term sum with |cos|, |sin| <= 1: within
        // 3 u (|a| + |b|) <= 6 u max|input| of exact (u = 2^-24); 8 epsilon is 16 u.
        let max = |t: &Tensor| t.abs().max().double_value(&[]);
        for (name, g, w, input) in [
            ("y", &got, &want, max(&x)),
            ("dx", &dx_got[0], &dx_want[0], max(&dy)),
        ] {
            let err = (g.to_kind(Kind::Double) - w).abs().max().double_value(&[]);
            let bound = 8.0 * f32::EPSILON as f64 * input;
            assert!(err <= bound, "{name}: max error {err:e} > {bound:e}");
        }
    }
}
