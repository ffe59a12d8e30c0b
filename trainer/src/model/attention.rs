//! The attention core shared by training and decoding: rotary embeddings, the KV-cache
//! append, the causal mask and scaled dot-product attention. The projections around it live
//! with the model's weights in [`super::llama`].
use crate::config::ModelConfig;
use tch::{Device, Kind, Tensor};

/// cos/sin tables `[max_seq_len, head_dim]` in HF's rotate-half layout.
pub(super) fn rope_tables(cfg: &ModelConfig, device: Device) -> (Tensor, Tensor) {
    let hd = cfg.head_dim() as i64;
    let inv_freq = (Tensor::arange_start_step(0, hd, 2, (Kind::Float, device)) / hd as f64)
        .multiply_scalar(cfg.rope_theta.ln())
        .exp()
        .reciprocal();
    let pos = Tensor::arange(cfg.max_seq_len as i64, (Kind::Float, device));
    let freqs = pos.outer(&inv_freq);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos(), emb.sin())
}

/// `x: [B, heads, T, hd]` rotated by the table rows of its positions (`cos, sin: [T, hd]`).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let hd = x.size()[3];
    let x1 = x.narrow(-1, 0, hd / 2);
    let x2 = x.narrow(-1, hd / 2, hd / 2);
    let rotated = Tensor::cat(&[&x2.neg(), &x1], -1);
    let kind = x.kind();
    (x * cos.to_kind(kind)) + rotated * sin.to_kind(kind)
}

/// Attention of `q: [B, heads, T, hd]` over `k, v: [B, kv_heads, T, hd]` placed at positions
/// `pos..pos + T` (RoPE applied here). With `kv`, the new keys and values are written into the
/// cache tensors at those positions and the queries attend to positions `0..pos + T`.
/// Causal SDPA from position 0, no mask for one new token, an explicit mask otherwise.
/// Returns `[B, heads, T, hd]`.
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
    let q = apply_rope(q, &cos, &sin);
    let k = apply_rope(k, &cos, &sin);
    let (k, v) = match kv {
        None => (k, v.shallow_clone()),
        Some((kc, vc)) => {
            kc.narrow(2, pos, t).copy_(&k);
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
        &q,
        &k,
        &v,
        mask.as_ref(),
        0.0,
        pos == 0 && t > 1,
        None,
        grouped,
    )
}
