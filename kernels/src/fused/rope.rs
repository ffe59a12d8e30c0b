//! Rotary embeddings (HF's rotate-half layout) fused with the head split of the stacked q/k/v
//! projection: [`rope_qkv`] turns the one GEMM's `qkv: [B, T, (heads + 2 kv_heads) hd]` into
//! `q, k, v: [B, heads, T, hd]` (views of token-major tensors) with q and k rotated, in one kernel pass forward
//! and one backward on CUDA bf16 (`kernels/cuda/rope.cu`; the unfused form, head views and
//! [`rotate`], costs six strided elementwise passes, the views' backward a zero fill and a
//! strided copy each). Elsewhere (CPU, f32) the same function from ATen ops.
//!
//! Tables (see `sparse_train::model::attention::rope_tables`): `cos, sin: [positions, hd]`
//! f32, cos over both halves, sin with its first half negated, so that
//! `rotate_half(x) * sin_hf = roll(x, hd / 2) * sin`.
use tch::{Device, Kind, Tensor};

use super::FusedError;
use crate::cuda::rope::{
    rope_qkv_backward_into, rope_qkv_cache_into, rope_qkv_forward_into, RopeShape,
};
use crate::torch::function::{apply_function, BackwardFn};

/// `x: [..., T, hd]` rotated by the table rows `cos, sin: [T, hd]` of its positions:
/// `x * cos + roll(x, hd / 2) * sin`, in x's dtype (the unfused form).
pub fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let hd = *x.size().last().expect("x has a head dimension");
    let kind = x.kind();
    (x * cos.to_kind(kind)).addcmul(&x.roll([hd / 2], [-1]), &sin.to_kind(kind))
}

/// `[q, k, v]`, head-major `[B, heads, T, hd]` (k and v with `kv_heads`), q and k rotated at
/// positions `pos0..pos0 + T`, from `qkv: [B, T, (heads + 2 kv_heads) hd]`. Differentiable.
pub fn rope_qkv(
    qkv: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    heads: i64,
    kv_heads: i64,
    pos0: i64,
) -> Result<[Tensor; 3], FusedError> {
    let size = qkv.size();
    let hd = *cos.size().last().unwrap_or(&0);
    if size.len() != 3 || hd == 0 || size[2] != (heads + 2 * kv_heads) * hd {
        return Err(FusedError(format!(
            "rope_qkv: qkv {size:?} must be [B, T, ({heads} + 2 x {kv_heads}) x {hd}]"
        )));
    }
    let shape = RopeShape {
        batch: size[0],
        t_len: size[1],
        heads,
        kv_heads,
        head_dim: hd,
        pos0,
    };
    if matches!(qkv.device(), Device::Cuda(_)) && qkv.kind() == Kind::BFloat16 && hd % 2 == 0 {
        return fused(qkv, (cos, sin), shape);
    }
    Ok(unfused(qkv, (cos, sin), &shape))
}

/// The inference form of [`rope_qkv`] (no gradient): returns q `[B, heads, T, hd]` rotated,
/// and writes k rotated and v into the KV cache `k_cache, v_cache: [B, kv_heads, capacity,
/// hd]` at positions `pos..pos + T`, where `pos` is an int64 scalar tensor on the model's
/// device: the position is read on the device, so a captured decode step serves every
/// position. One kernel on CUDA bf16; ATen ops elsewhere. The caller keeps `pos + T` within
/// the cache and the tables (on CUDA, rows past them are not written).
pub fn rope_qkv_into_cache(
    qkv: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    heads: i64,
    kv_heads: i64,
    pos: &Tensor,
    (k_cache, v_cache): (&Tensor, &Tensor),
) -> Result<Tensor, FusedError> {
    let size = qkv.size();
    let hd = *cos.size().last().unwrap_or(&0);
    if size.len() != 3 || hd == 0 || size[2] != (heads + 2 * kv_heads) * hd {
        return Err(FusedError(format!(
            "rope_qkv_into_cache: qkv {size:?} must be [B, T, ({heads} + 2 x {kv_heads}) x {hd}]"
        )));
    }
    let (b, t) = (size[0], size[1]);
    let _no_grad = tch::no_grad_guard();
    let shape = RopeShape {
        batch: b,
        t_len: t,
        heads,
        kv_heads,
        head_dim: hd,
        pos0: 0,
    };
    let on_cuda_bf16 =
        |x: &Tensor| matches!(x.device(), Device::Cuda(_)) && x.kind() == Kind::BFloat16;
    if on_cuda_bf16(qkv) && on_cuda_bf16(k_cache) && hd % 2 == 0 {
        let q = Tensor::empty([b, heads, t, hd], (Kind::BFloat16, qkv.device()));
        rope_qkv_cache_into(
            &qkv.contiguous(),
            (&cos.contiguous(), &sin.contiguous()),
            &shape,
            pos,
            &q,
            [k_cache, v_cache],
        )
        .map_err(|e| FusedError(format!("rope_qkv_into_cache: {e}")))?;
        return Ok(q);
    }
    let at = Tensor::arange(t, (Kind::Int64, qkv.device())) + pos;
    let (c, sn) = (cos.index_select(0, &at), sin.index_select(0, &at));
    let parts = qkv.split_with_sizes([heads * hd, kv_heads * hd, kv_heads * hd], -1);
    let split = |y: &Tensor, n: i64| y.view([b, t, n, hd]).transpose(1, 2);
    let k = rotate(&split(&parts[1], kv_heads), &c, &sn);
    let mut kc = k_cache.shallow_clone();
    let mut vc = v_cache.shallow_clone();
    let _ = kc.index_copy_(2, &at, &k.to_kind(kc.kind()));
    let _ = vc.index_copy_(2, &at, &split(&parts[2], kv_heads).to_kind(vc.kind()));
    Ok(rotate(&split(&parts[0], heads), &c, &sn))
}

/// The ATen form: head views of the stacked rows, then [`rotate`].
fn unfused(qkv: &Tensor, (cos, sin): (&Tensor, &Tensor), s: &RopeShape) -> [Tensor; 3] {
    let (b, t, hd) = (s.batch, s.t_len, s.head_dim);
    let parts = qkv.split_with_sizes([s.heads * hd, s.kv_heads * hd, s.kv_heads * hd], -1);
    let heads = |y: &Tensor, n: i64| y.view([b, t, n, hd]).transpose(1, 2);
    let (c, sn) = (cos.narrow(0, s.pos0, t), sin.narrow(0, s.pos0, t));
    [
        rotate(&heads(&parts[0], s.heads), &c, &sn),
        rotate(&heads(&parts[1], s.kv_heads), &c, &sn),
        heads(&parts[2], s.kv_heads),
    ]
}

fn fused(
    qkv: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    s: RopeShape,
) -> Result<[Tensor; 3], FusedError> {
    let (cos, sin) = (cos.contiguous(), sin.contiguous());
    let forward = |inputs: &[Tensor]| -> Result<(Vec<Tensor>, BackwardFn), String> {
        let qkv = inputs[0].contiguous();
        let opts = (Kind::BFloat16, qkv.device());
        let (b, t, hd) = (s.batch, s.t_len, s.head_dim);
        // Token-major (see `token_major_heads`).
        let q = Tensor::empty([b, t, s.heads, hd], opts);
        let k = Tensor::empty([b, t, s.kv_heads, hd], opts);
        let v = Tensor::empty([b, t, s.kv_heads, hd], opts);
        rope_qkv_forward_into(&qkv, (&cos, &sin), &s, [&q, &k, &v]).map_err(|e| e.to_string())?;
        let (cos, sin) = (cos.shallow_clone(), sin.shallow_clone());
        let backward: BackwardFn = Box::new(move |grads: &[Option<Tensor>]| {
            let g: Vec<Tensor> = grads
                .iter()
                .zip([s.heads, s.kv_heads, s.kv_heads])
                .map(|(g, n)| match g {
                    Some(g) => g.to_kind(Kind::BFloat16).contiguous(),
                    None => Tensor::zeros([b, t, n, hd], opts),
                })
                .collect();
            let dqkv = Tensor::empty([b, t, (s.heads + 2 * s.kv_heads) * hd], opts);
            rope_qkv_backward_into([&g[0], &g[1], &g[2]], (&cos, &sin), &s, &dqkv)
                .map_err(|e| e.to_string())?;
            Ok(vec![Some(dqkv)])
        });
        Ok((vec![q, k, v], backward))
    };
    let out =
        apply_function(&[qkv], 3, &forward).map_err(|e| FusedError(format!("rope_qkv: {e}")))?;
    let mut it = out.into_iter();
    Ok(std::array::from_fn(|_| {
        token_major_heads(&it.next().expect("three outputs"))
    }))
}

/// `[B, heads, T, hd]` views of token-major `[B, T, heads, hd]` tensors. Attention takes them
/// as they are; cuDNN's attention allocates its output (and the gradients of q, k, v) in its
/// query's layout, so the output projection then reads the output token-major without a
/// copy, and the backward's gradients arrive token-major for the inverse rotation. Head-major
/// tensors cost a strided copy of the attention output a layer each way.
fn token_major_heads(t: &Tensor) -> Tensor {
    t.transpose(1, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU form equals HF's `x * cos + rotate_half(x) * sin` per head in f64, values and
    /// the gradient of qkv, with grouped heads and an offset position.
    #[test]
    fn unfused_equals_hf_rotate_half_per_head() {
        tch::manual_seed(8);
        let (b, t, nh, nkv, hd, pos0) = (2i64, 5i64, 4i64, 2i64, 6i64, 3i64);
        let opts = (Kind::Float, Device::Cpu);
        let inv: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / 1e4f64.powf(2.0 * i as f64 / hd as f64))
            .collect();
        let ang = |p: i64, j: i64| (p as f64) * inv[(j % (hd / 2)) as usize];
        let tab = |f: &dyn Fn(i64, i64) -> f64| {
            let v: Vec<f32> = (0..12)
                .flat_map(|p| (0..hd).map(move |j| (p, j)))
                .map(|(p, j)| f(p, j) as f32)
                .collect();
            Tensor::from_slice(&v).view([12, hd])
        };
        let cos = tab(&|p, j| ang(p, j).cos());
        let sin = tab(&|p, j| {
            if j < hd / 2 {
                -ang(p, j).sin()
            } else {
                ang(p, j).sin()
            }
        });
        let sin_hf = tab(&|p, j| ang(p, j).sin());
        let qkv = Tensor::randn([b, t, (nh + 2 * nkv) * hd], opts).set_requires_grad(true);
        let [q, k, v] = rope_qkv(&qkv, (&cos, &sin), nh, nkv, pos0).unwrap();
        assert_eq!(q.size(), [b, nh, t, hd]);
        assert_eq!(v.size(), [b, nkv, t, hd]);
        let dq = Tensor::randn(q.size(), opts);
        let dk = Tensor::randn(k.size(), opts);
        let dv = Tensor::randn(v.size(), opts);
        ((&q * &dq).sum(Kind::Float) + (&k * &dk).sum(Kind::Float) + (&v * &dv).sum(Kind::Float))
            .backward();

        let x = qkv.detach().to_kind(Kind::Double).set_requires_grad(true);
        let head = |h: i64| x.narrow(-1, h * hd, hd); // [B, T, hd]
        let hf = |xh: &Tensor| {
            let (x1, x2) = (xh.narrow(-1, 0, hd / 2), xh.narrow(-1, hd / 2, hd / 2));
            let rot = Tensor::cat(&[x2.neg(), x1], -1);
            let c = cos.narrow(0, pos0, t).to_kind(Kind::Double);
            xh * c + rot * sin_hf.narrow(0, pos0, t).to_kind(Kind::Double)
        };
        let want_q = Tensor::stack(&(0..nh).map(|h| hf(&head(h))).collect::<Vec<_>>(), 1);
        let want_k = Tensor::stack(&(nh..nh + nkv).map(|h| hf(&head(h))).collect::<Vec<_>>(), 1);
        let want_v = Tensor::stack(&(nh + nkv..nh + 2 * nkv).map(&head).collect::<Vec<_>>(), 1);
        let f64d = |t: &Tensor| t.to_kind(Kind::Double);
        ((&want_q * f64d(&dq)).sum(Kind::Double)
            + (&want_k * f64d(&dk)).sum(Kind::Double)
            + (&want_v * f64d(&dv)).sum(Kind::Double))
        .backward();
        for (name, got, want) in [("q", &q, &want_q), ("k", &k, &want_k), ("v", &v, &want_v)] {
            let err = (f64d(got) - want).abs().max().double_value(&[]);
            assert!(err < 1e-5, "{name}: {err:e}");
        }
        let err = (f64d(&qkv.grad()) - x.grad()).abs().max().double_value(&[]);
        assert!(err < 1e-5, "dqkv: {err:e}");
        assert!(rope_qkv(&qkv, (&cos, &sin), nh, nkv + 1, 0).is_err());
    }
}
