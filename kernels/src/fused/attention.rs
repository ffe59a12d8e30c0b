//! Decode attention: one new token per sequence attends to keys `0..=pos` of the KV cache,
//! `pos` an int64 scalar on the device, so a captured decode step serves every position.
//! [`decode_attention`] is one kernel on CUDA bf16 (`kernels/cuda/attention.cu`, reading only
//! the keys that exist); elsewhere SDPA over the whole cache under the mask `key <= pos`.
use tch::{Device, Kind, Tensor};

use super::FusedError;
use crate::cuda::attention::{decode_attention_into, decode_attention_supports};

/// `[B, heads * hd]`, token-major (the output projection's input): softmax(q k^T / sqrt(hd)) v
/// of `q: [B, heads, 1, hd]` over `k_cache, v_cache: [B, kv_heads, capacity, hd]` at keys
/// `0..=pos` (grouped heads share their key/value head). No gradient.
pub fn decode_attention(
    q: &Tensor,
    (k_cache, v_cache): (&Tensor, &Tensor),
    pos: &Tensor,
) -> Result<Tensor, FusedError> {
    let qs = q.size();
    let ks = k_cache.size();
    if qs.len() != 4
        || ks.len() != 4
        || qs[2] != 1
        || qs[3] != ks[3]
        || ks[1] == 0
        || qs[1] % ks[1] != 0
    {
        return Err(FusedError(format!(
            "decode_attention: q {qs:?} must be [B, heads, 1, hd] over caches {ks:?} [B, kv_heads, capacity, hd]"
        )));
    }
    let (b, nh, hd) = (qs[0], qs[1], qs[3]);
    let _no_grad = tch::no_grad_guard();
    let cuda_bf16 =
        |t: &Tensor| matches!(t.device(), Device::Cuda(_)) && t.kind() == Kind::BFloat16;
    if cuda_bf16(q) && cuda_bf16(k_cache) && decode_attention_supports(hd, nh, ks[1]) {
        let out = Tensor::empty([b, nh * hd], (Kind::BFloat16, q.device()));
        decode_attention_into(
            &q.contiguous(),
            (k_cache, v_cache),
            pos,
            1.0 / (hd as f64).sqrt(),
            &out,
        )
        .map_err(|e| FusedError(format!("decode_attention: {e}")))?;
        return Ok(out);
    }
    let keys = Tensor::arange(ks[2], (Kind::Int64, q.device()));
    let mask = keys.le_tensor(pos).view([1, 1, 1, -1]);
    let a = Tensor::scaled_dot_product_attention(
        q,
        k_cache,
        v_cache,
        Some(&mask),
        0.0,
        false,
        None,
        nh != ks[1],
    );
    Ok(a.transpose(1, 2).reshape([b, nh * hd]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The masked form equals SDPA over the cache's first pos + 1 keys, grouped and not.
    #[test]
    fn masked_cache_equals_attention_over_the_live_keys() {
        tch::manual_seed(2);
        let opts = (Kind::Float, Device::Cpu);
        for (nh, nkv) in [(4, 4), (4, 2)] {
            let q = Tensor::randn([3, nh, 1, 8], opts);
            let kc = Tensor::randn([3, nkv, 10, 8], opts);
            let vc = Tensor::randn([3, nkv, 10, 8], opts);
            for pos in [0i64, 4, 9] {
                let got = decode_attention(&q, (&kc, &vc), &Tensor::from(pos)).unwrap();
                let (k, v) = (kc.narrow(2, 0, pos + 1), vc.narrow(2, 0, pos + 1));
                let want = Tensor::scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    None::<&Tensor>,
                    0.0,
                    false,
                    None,
                    nh != nkv,
                )
                .transpose(1, 2)
                .reshape([3, nh * 8]);
                let err = (&got - &want).abs().max().double_value(&[]);
                assert!(err < 1e-5, "heads {nh}/{nkv} pos {pos}: {err:e}");
            }
        }
        let q = Tensor::randn([1, 3, 1, 8], opts);
        let kc = Tensor::randn([1, 2, 10, 8], opts);
        assert!(decode_attention(&q, (&kc, &kc), &Tensor::from(0i64)).is_err());
    }
}
