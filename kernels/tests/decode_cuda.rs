//! The decode-time pieces on CUDA: RoPE writing k and v into the KV cache at a position read
//! on the device (`fused::rope::rope_qkv_into_cache`), CUDA graphs (`torch::cuda_graph`)
//! replaying a step that advances that position, decode attention, and the decode step's
//! products of a few token rows (`cuda::decode`: `x W^T` and the sparse FFN). GPU only: without
//! CUDA the tests skip with a printed reason, or fail under `SPARSE_TRAIN_REQUIRE_GPU=1`.
//!
//! References in f64 from the same bf16 values, every element; bf16 outputs of fp32
//! arithmetic: one rounding, bound 8e-3 of max |ref|. Caches are NaN-poisoned first: the
//! rows a call must write must hold no NaN, and every other row must still be NaN.
mod common;

use common::{gpu_or_skip, hf_rotate, rope_tables};
use sparse_kernels::cuda::decode::{
    decode_ffn, decode_ffn_into, decode_h_width, decode_linear_into, DECODE_DISPATCH_TOKENS,
};
use sparse_kernels::cuda::TwellStaticFfn;
use sparse_kernels::fused::attention::decode_attention;
use sparse_kernels::fused::linear::inference_linear;
use sparse_kernels::fused::rope::rope_qkv_into_cache;
use sparse_kernels::testing::{
    imposed_sparsity_layer, imposed_sparsity_layer_with_full_rows, relative_error,
};
use sparse_kernels::torch::cuda_graph::CudaGraph;
use sparse_kernels::{try_sparse_ffn, FfnPath, FfnWeights, SparseFfnConfig};
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

/// Every element of `got` within `rel * |want| + abs` of `want` (f64), no NaN; prints the
/// worst error relative to max |want|.
fn check_elements(label: &str, got: &Tensor, want: &Tensor, rel: f64, abs: f64) {
    let got = got.to_kind(Kind::Double);
    assert_eq!(nan_count(&got), 0, "{label}: NaN in the output");
    let err = (&got - want).abs();
    let slack = (err - want.abs() * rel - abs).max().double_value(&[]);
    println!(
        "  {label}: max|err|/max|ref| = {:.3e} (bound {rel:.1e} |ref| + {abs:.1e} each)",
        relative_error(&got, want)
    );
    assert!(
        slack <= 0.0,
        "{label}: an element is off by {slack:e} past its bound"
    );
}

/// `y = x W^T` of the decode kernel into a NaN-poisoned output, every element against f64:
/// one bf16 rounding of an f32 sum (2^-8 relative, plus f32 reassociation over D terms).
fn linear_case(name: &str, n: i64, d: i64, o: i64) {
    let Some((dev, _gpu)) = gpu_or_skip(name) else {
        return;
    };
    println!("{name}: N {n}, D {d}, O {o}");
    tch::manual_seed(n * 7 + d + o);
    let x = Tensor::randn([n, d], (Kind::Float, dev)).to_kind(Kind::BFloat16);
    let w = (Tensor::randn([o, d], (Kind::Float, dev)) / (d as f64).sqrt()).to_kind(Kind::BFloat16);
    let y = Tensor::full([n, o], f64::NAN, (Kind::BFloat16, dev));
    decode_linear_into(&x, &w, &y).unwrap();
    let want = x
        .to_kind(Kind::Double)
        .matmul(&w.to_kind(Kind::Double).tr());
    let scale = want.abs().max().double_value(&[]);
    check_elements("y", &y, &want, 2f64.powi(-8), 1e-5 * scale);
    // The inference entry point takes [.., D] rows and, at the rows it sends to the kernel,
    // gives the same values.
    if n <= DECODE_DISPATCH_TOKENS {
        let again = inference_linear(&x.view([n, 1, d]), &w).unwrap();
        assert!(
            again.view([n, o]).equal(&y),
            "inference_linear differs from the kernel"
        );
    }
}

#[test]
fn decode_linear_at_the_decode_shapes() {
    // 1.5b: q/k/v stacked, the output projection, the LM head; a decode batch of 8.
    linear_case("decode_linear_qkv", 1, 2048, 6144);
    linear_case("decode_linear_o", 1, 2048, 2048);
    linear_case("decode_linear_head", 1, 2048, 49152);
    linear_case("decode_linear_batch8", 8, 2048, 6144);
}

#[test]
fn decode_linear_hard_cases() {
    // Token counts between the entries (3, 5, 7), one output row, O not a multiple of the 8
    // rows a block takes, D not a multiple of the 256 columns a warp's pass covers, the
    // narrowest D, and a D past one pass (two loads rounds).
    linear_case("decode_linear_n3", 3, 1344, 1001);
    linear_case("decode_linear_n5", 5, 8, 33);
    linear_case("decode_linear_n7", 7, 2048, 1);
    linear_case("decode_linear_n2", 2, 768, 2304);
    linear_case("decode_linear_wide", 4, 8192, 4097);
}

/// More rows than the kernels take, or a width they cannot, go through matmul.
#[test]
fn inference_linear_falls_back_past_the_decode_sizes() {
    let Some((dev, _gpu)) = gpu_or_skip("inference_linear_falls_back") else {
        return;
    };
    tch::manual_seed(3);
    for (rows, d) in [(9, 2048), (3, 2048), (2, 1001)] {
        let x = Tensor::randn([rows, d], (Kind::Float, dev)).to_kind(Kind::BFloat16);
        let w = Tensor::randn([64, d], (Kind::Float, dev)).to_kind(Kind::BFloat16);
        let got = inference_linear(&x, &w).unwrap();
        assert!(
            got.equal(&x.matmul(&w.tr())),
            "{rows} x {d}: not the matmul"
        );
    }
}

/// The decode FFN into NaN-poisoned `h` and `y`, every element against f64 from the same
/// bf16 inputs with the gate rounded to bf16 as TwELL stores it: h's zero pattern may differ
/// only at gate values within rounding of 0 (another f32 order), h and y by one bf16 rounding
/// of the gate and of y; two calls are bit-identical, and y equals the TwELL forward's (at
/// the D TwELL takes, multiples of 64).
fn ffn_case(name: &str, n: i64, d: i64, h: i64, full_rows: i64) {
    let Some((dev, _gpu)) = gpu_or_skip(name) else {
        return;
    };
    println!("{name}: N {n}, D {d}, H {h}, {full_rows} rows firing on every unit");
    tch::manual_seed(n * 31 + d + h);
    let l = imposed_sparsity_layer_with_full_rows(n, d, h, 0.995, full_rows, dev).unwrap();
    let ldh = decode_h_width(h);
    let hs = Tensor::full([n, ldh], f64::NAN, (Kind::Float, dev));
    let y = Tensor::full([n, d], f64::NAN, (Kind::BFloat16, dev));
    decode_ffn_into(&l.x, [&l.wg, &l.wu, &l.wd], &hs, &y).unwrap();
    let f64_ = |t: &Tensor| t.to_kind(Kind::Double);
    let (x, wg, wu, wd) = (f64_(&l.x), f64_(&l.wg), f64_(&l.wu), f64_(&l.wd));
    let gate = x.matmul(&wg.tr());
    let gate_bf16 = gate.relu().to_kind(Kind::BFloat16).to_kind(Kind::Double);
    let h_ref = &gate_bf16 * x.matmul(&wu.tr());
    let y_ref = h_ref.matmul(&wd);
    let got_h = hs.narrow(1, 0, h);
    let fires = gate_bf16.gt(0.0);
    let total = fires.sum(Kind::Int64).int64_value(&[]);
    let flips = got_h
        .ne(0.0)
        .ne_tensor(&fires)
        .sum(Kind::Int64)
        .int64_value(&[]);
    println!("  units firing {total}, zero-pattern flips {flips}");
    assert!(flips <= total / 1000 + 2, "h fires on {flips} other units");
    let h_scale = h_ref.abs().max().double_value(&[]);
    // A flipped unit's gate is within f32 rounding of 0, so its h is tiny against the scale.
    check_elements("h", &got_h, &h_ref, 2f64.powi(-6), 1e-4 * h_scale);
    let y_scale = y_ref.abs().max().double_value(&[]);
    check_elements("y", &y, &y_ref, 2f64.powi(-7), 4e-3 * y_scale);
    let again = decode_ffn(&l.x, &l.wg, &l.wu, &l.wd).unwrap();
    assert!(again.equal(&y), "two calls differ");
    if d % 64 != 0 {
        return; // TwELL takes D in multiples of 64
    }
    let off = SparseFfnConfig {
        statistics: false,
        ..SparseFfnConfig::default()
    };
    let w = FfnWeights::new(&l.wg, &l.wu, &l.wd);
    let twell = tch::no_grad(|| try_sparse_ffn(&l.x, &w, FfnPath::Twell, &off)).unwrap();
    let e = relative_error(&y.to_kind(Kind::Double), &twell.y.to_kind(Kind::Double));
    println!("  against the TwELL forward: max|diff|/max|TwELL| = {e:.3e} (bound 1e-2)");
    assert!(e <= 1e-2, "decode FFN differs from TwELL by {e:e}");
}

#[test]
fn decode_ffn_at_the_decode_shapes() {
    // 1.5b at batch 1 and 8; 125m (D 768, H 2048).
    ffn_case("decode_ffn_1.5b_n1", 1, 2048, 5632, 0);
    ffn_case("decode_ffn_1.5b_n8", 8, 2048, 5632, 0);
    ffn_case("decode_ffn_125m_n1", 1, 768, 2048, 0);
}

#[test]
fn decode_ffn_hard_cases() {
    // A token firing on every unit (every up row read, every unit listed), H not a multiple
    // of 4 (the scratch's padding) nor of the 8 units a block takes, H past one listing
    // round of 6144 units (two and three rounds), D not a multiple of 256 (a partial block of
    // output granules), the narrowest D, and token counts between the entries.
    ffn_case("decode_ffn_full_row", 1, 2048, 5632, 1);
    ffn_case("decode_ffn_h1001", 3, 1344, 1001, 1);
    ffn_case("decode_ffn_two_rounds", 2, 1024, 7000, 1);
    ffn_case("decode_ffn_three_rounds", 5, 512, 13000, 2);
    ffn_case("decode_ffn_narrow", 7, 8, 300, 0);
    ffn_case("decode_ffn_n4_full", 4, 2048, 5632, 4);
}

/// Captured in a CUDA graph, the decode FFN replays on new inputs copied into its input
/// buffer exactly as eager calls compute them.
#[test]
fn decode_ffn_replays_in_a_cuda_graph() {
    let Some((dev, _gpu)) = gpu_or_skip("decode_ffn_replays_in_a_cuda_graph") else {
        return;
    };
    tch::manual_seed(5);
    let l = imposed_sparsity_layer(4, 2048, 5632, 0.995, dev).unwrap();
    let x = l.x.get(0).unsqueeze(0).copy();
    let out = Tensor::zeros([1, 2048], (Kind::BFloat16, dev));
    let ffn = TwellStaticFfn::new(1, 2048, 5632, dev).unwrap();
    let step = || -> Result<(), String> {
        let y = ffn
            .forward(&x, &l.wg, &l.wu, &l.wd)
            .map_err(|e| e.to_string())?;
        out.shallow_clone().copy_(&y);
        Ok(())
    };
    let graph = CudaGraph::capture(dev, step, step).unwrap();
    for i in 0..4 {
        x.shallow_clone().copy_(&l.x.get(i).unsqueeze(0));
        graph.replay().unwrap();
        let want = decode_ffn(&l.x.get(i).unsqueeze(0), &l.wg, &l.wu, &l.wd).unwrap();
        assert!(out.equal(&want), "replay {i} differs from the eager call");
    }
    println!("  4 replays on new tokens: bit-identical to eager");
}
