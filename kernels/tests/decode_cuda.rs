//! The decode-time pieces on CUDA: RoPE writing k and v into the KV cache at a position read
//! on the device (`fused::rope::rope_qkv_into_cache`), and CUDA graphs
//! (`torch::cuda_graph`) replaying a step that advances that position. GPU only: without
//! CUDA the tests skip with a printed reason, or fail under `SPARSE_TRAIN_REQUIRE_GPU=1`.
//!
//! References in f64 from the same bf16 values, every element; bf16 outputs of fp32
//! arithmetic: one rounding, bound 8e-3 of max |ref|. Caches are NaN-poisoned first: the
//! rows a call must write must hold no NaN, and every other row must still be NaN.
mod common;

use common::{gpu_or_skip, hf_rotate, rope_tables};
use sparse_kernels::fused::attention::decode_attention;
use sparse_kernels::fused::rope::rope_qkv_into_cache;
use sparse_kernels::testing::relative_error;
use sparse_kernels::torch::cuda_graph::CudaGraph;
use tch::{Kind, Tensor};

fn check(label: &str, got: &Tensor, want: &Tensor) {
    let e = relative_error(&got.to_kind(Kind::Double), want);
    println!("  {label}: max|err|/max|ref| = {e:.3e} (bound 8e-3)");
    assert!(e <= 8e-3, "{label}: {e:e}");
}

fn nan_count(t: &Tensor) -> i64 {
    t.isnan().sum(Kind::Int64).int64_value(&[])
}

/// One call at position `pos` of T tokens into a cache of `cap` positions.
fn cache_case(
    name: &str,
    (b, t): (i64, i64),
    (nh, nkv, hd): (i64, i64, i64),
    (pos, cap): (i64, i64),
) {
    let Some((dev, _gpu)) = gpu_or_skip(name) else {
        return;
    };
    println!("{name}: B {b}, T {t}, heads {nh}/{nkv}, hd {hd}, pos {pos}, capacity {cap}");
    tch::manual_seed(b * 100 + t + pos);
    let (cos, sin, sin_hf) = rope_tables(cap + 4, hd, dev);
    let w = (nh + 2 * nkv) * hd;
    let qkv = Tensor::randn([b, t, w], (Kind::Float, dev)).to_kind(Kind::BFloat16);
    let nan = |shape: &[i64]| Tensor::full(shape, f64::NAN, (Kind::BFloat16, dev));
    let (kc, vc) = (nan(&[b, nkv, cap, hd]), nan(&[b, nkv, cap, hd]));
    let at = Tensor::from(pos).to_device(dev);
    let q = rope_qkv_into_cache(&qkv, (&cos, &sin), nh, nkv, &at, (&kc, &vc)).unwrap();
    let x = qkv.to_kind(Kind::Double).view([b, t, nh + 2 * nkv, hd]);
    // The rows that fit in the cache are written; the rest are not.
    let fit = (cap - pos).clamp(0, t);
    let (c, s) = (cos.narrow(0, pos, t), sin_hf.narrow(0, pos, t));
    let want_q = hf_rotate(&x.narrow(2, 0, nh), &c, &s);
    let want_k = hf_rotate(&x.narrow(2, nh, nkv), &c, &s);
    let want_v = x.narrow(2, nh + nkv, nkv).transpose(1, 2);
    if fit > 0 {
        let written = |cache: &Tensor| cache.narrow(2, pos, fit);
        assert_eq!(
            nan_count(&written(&kc)) + nan_count(&written(&vc)),
            0,
            "unwritten rows"
        );
        check("k in cache", &written(&kc), &want_k.narrow(2, 0, fit));
        check("v in cache", &written(&vc), &want_v.narrow(2, 0, fit));
        check("q", &q.narrow(2, 0, fit), &want_q.narrow(2, 0, fit));
    }
    let untouched = b * nkv * (cap - fit) * hd;
    assert_eq!(
        nan_count(&kc),
        untouched,
        "k rows outside pos..pos + T were written"
    );
    assert_eq!(
        nan_count(&vc),
        untouched,
        "v rows outside pos..pos + T were written"
    );
    // The ATen form of the same op (what the CPU runs) agrees on the written rows.
    if fit == t {
        let (kf, vf) = (
            nan(&[b, nkv, cap, hd]).to_kind(Kind::Float),
            nan(&[b, nkv, cap, hd]).to_kind(Kind::Float),
        );
        let qf = rope_qkv_into_cache(
            &qkv.to_kind(Kind::Float),
            (&cos, &sin),
            nh,
            nkv,
            &at,
            (&kf, &vf),
        )
        .unwrap();
        check("ATen form q", &q, &qf.to_kind(Kind::Double));
        check(
            "ATen form k",
            &kc.narrow(2, pos, t),
            &kf.narrow(2, pos, t).to_kind(Kind::Double),
        );
    }
}

#[test]
fn rope_into_cache_at_the_decode_shape() {
    cache_case("rope_into_cache_decode", (1, 1), (32, 32, 64), (128, 256));
    cache_case(
        "rope_into_cache_decode_batch",
        (32, 1),
        (32, 32, 64),
        (200, 256),
    );
}

#[test]
fn rope_into_cache_hard_cases() {
    // A prefill from 0; grouped heads at an odd offset; the last position; rows past the
    // cache (not written); a wide head.
    cache_case("rope_into_cache_prefill", (2, 37), (8, 2, 64), (0, 64));
    cache_case("rope_into_cache_grouped", (3, 5), (8, 2, 32), (17, 40));
    cache_case("rope_into_cache_last", (2, 1), (4, 4, 64), (39, 40));
    cache_case("rope_into_cache_overflow", (2, 6), (4, 2, 64), (36, 40));
    cache_case("rope_into_cache_wide", (1, 3), (4, 4, 128), (9, 16));
}

/// A captured step (embedding-free: rope into the cache, then `pos += 1`) replayed 20
/// times writes positions p..p+20 exactly as 20 eager calls do, and leaves the rest alone.
#[test]
fn cuda_graph_replays_a_step_that_advances_the_position() {
    let Some((dev, _gpu)) = gpu_or_skip("cuda_graph_replays") else {
        return;
    };
    let (b, nh, nkv, hd, cap, p0, steps) = (2i64, 4i64, 2i64, 64i64, 48i64, 5i64, 20i64);
    tch::manual_seed(9);
    let (cos, sin, _) = rope_tables(cap, hd, dev);
    let w = (nh + 2 * nkv) * hd;
    let inputs = Tensor::randn([steps, b, 1, w], (Kind::Float, dev)).to_kind(Kind::BFloat16);
    let nan = || Tensor::full([b, nkv, cap, hd], f64::NAN, (Kind::BFloat16, dev));
    // Eager reference.
    let (ke, ve) = (nan(), nan());
    for i in 0..steps {
        let at = Tensor::from(p0 + i).to_device(dev);
        let _ =
            rope_qkv_into_cache(&inputs.get(i), (&cos, &sin), nh, nkv, &at, (&ke, &ve)).unwrap();
    }
    // Captured: the step reads a static input row chosen by the device position.
    let (kg, vg) = (nan(), nan());
    let pos = Tensor::from(p0).to_device(dev);
    let qkv = Tensor::zeros([b, 1, w], (Kind::BFloat16, dev));
    let q_out = Tensor::zeros([b, nh, 1, hd], (Kind::BFloat16, dev));
    let step = || -> Result<(), String> {
        let row = (&pos - p0).view([1]);
        qkv.shallow_clone()
            .copy_(&inputs.index_select(0, &row).squeeze_dim(0));
        let q = rope_qkv_into_cache(&qkv, (&cos, &sin), nh, nkv, &pos, (&kg, &vg))
            .map_err(|e| e.to_string())?;
        q_out.shallow_clone().copy_(&q);
        let mut p = pos.shallow_clone();
        p += 1;
        Ok(())
    };
    let warmup = || -> Result<(), String> {
        step()?;
        let _ = pos.shallow_clone().fill_(p0);
        Ok(())
    };
    let graph = CudaGraph::capture(dev, warmup, step).unwrap();
    // The warm-up wrote position p0 once; poison it again so the replays must write it.
    let _ = kg.narrow(2, p0, 1).fill_(f64::NAN);
    let _ = vg.narrow(2, p0, 1).fill_(f64::NAN);
    for _ in 0..steps {
        graph.replay().unwrap();
    }
    tch::Cuda::synchronize(0);
    assert_eq!(
        pos.int64_value(&[]),
        p0 + steps,
        "the position advanced once per replay"
    );
    let written = |t: &Tensor| t.narrow(2, p0, steps);
    assert_eq!(nan_count(&written(&kg)) + nan_count(&written(&vg)), 0);
    assert!(
        written(&kg).equal(&written(&ke)),
        "replayed k differs from eager k"
    );
    assert!(
        written(&vg).equal(&written(&ve)),
        "replayed v differs from eager v"
    );
    let rest = b * nkv * (cap - steps) * hd;
    assert_eq!(
        nan_count(&kg),
        rest,
        "rows outside the replayed positions were written"
    );
    println!(
        "  20 replays: positions {p0}..{} written bit-identical to eager",
        p0 + steps
    );
}

/// The decode attention kernel into its output, every element against softmax attention in
/// f64 over keys 0..=pos of the same bf16 cache, for positions at the start, the middle and
/// the end of the cache, grouped heads and head widths 32 to 256 (256: the SDPA form).
fn attention_case(name: &str, b: i64, nh: i64, nkv: i64, hd: i64, cap: i64, positions: &[i64]) {
    let Some((dev, _gpu)) = gpu_or_skip(name) else {
        return;
    };
    println!("{name}: B {b}, heads {nh}/{nkv}, hd {hd}, capacity {cap}");
    tch::manual_seed(b + nh + hd + cap);
    let bf = |shape: &[i64], scale: f64| {
        (Tensor::randn(shape, (Kind::Float, dev)) * scale).to_kind(Kind::BFloat16)
    };
    let q = bf(&[b, nh, 1, hd], 1.0);
    // Sharp attention in some heads (large keys), flat in others.
    let kc = bf(&[b, nkv, cap, hd], 2.0);
    let vc = bf(&[b, nkv, cap, hd], 1.0);
    // Past the live keys the cache holds garbage the kernel must not read.
    for &pos in positions {
        let k_live = kc.copy();
        let _ = k_live.narrow(2, pos + 1, cap - pos - 1).fill_(1e4);
        let got = decode_attention(&q, (&k_live, &vc), &Tensor::from(pos).to_device(dev)).unwrap();
        assert_eq!(got.size(), [b, nh * hd]);
        let group = nh / nkv;
        let k64 = kc
            .narrow(2, 0, pos + 1)
            .to_kind(Kind::Double)
            .repeat_interleave_self_int(group, 1, None);
        let v64 = vc
            .narrow(2, 0, pos + 1)
            .to_kind(Kind::Double)
            .repeat_interleave_self_int(group, 1, None);
        let q64 = q.to_kind(Kind::Double);
        let s = q64.matmul(&k64.transpose(2, 3)) / (hd as f64).sqrt();
        let want = s
            .softmax(-1, Kind::Double)
            .matmul(&v64)
            .transpose(1, 2)
            .reshape([b, nh * hd]);
        assert_eq!(
            got.isnan().sum(Kind::Int64).int64_value(&[]),
            0,
            "pos {pos}: NaN"
        );
        let e = relative_error(&got.to_kind(Kind::Double), &want);
        println!("  pos {pos}: max|err|/max|ref| = {e:.3e} (bound 8e-3)");
        assert!(e <= 8e-3, "pos {pos}: {e:e}");
    }
}

#[test]
fn decode_attention_at_the_decode_shapes() {
    attention_case("decode_attention_b1", 1, 32, 32, 64, 256, &[0, 128, 255]);
    attention_case(
        "decode_attention_b32",
        32,
        32,
        32,
        64,
        2048,
        &[7, 1500, 2047],
    );
}

#[test]
fn decode_attention_hard_cases() {
    // Grouped heads; the narrowest and widest heads the kernel takes; a head it does not
    // take (the masked SDPA form); one key; a capacity of one.
    attention_case("decode_attention_grouped", 3, 8, 2, 64, 40, &[0, 17, 39]);
    attention_case("decode_attention_hd32", 2, 4, 4, 32, 9, &[3, 8]);
    attention_case("decode_attention_hd128", 2, 4, 1, 128, 70, &[0, 33, 69]);
    attention_case("decode_attention_hd256_sdpa", 2, 4, 1, 256, 33, &[0, 32]);
    attention_case("decode_attention_capacity_one", 2, 2, 2, 64, 1, &[0]);
}
