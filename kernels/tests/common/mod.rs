//! Checks the GPU tests share (each test binary uses a part of them).
#![allow(dead_code)]
use sparse_kernels::testing::cuda_device_or_skip;
use sparse_kernels::{FfnOutput, FfnWeights};
use tch::{Device, Kind, Tensor};

/// Held by each GPU test for its whole run: the tests of a binary run in parallel threads,
/// and one at a time they keep their seeded inputs (tch's generator is global) and the
/// card to themselves.
pub fn gpu_lock() -> std::sync::MutexGuard<'static, ()> {
    static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());
    GPU.lock().unwrap_or_else(|e| e.into_inner())
}

/// The start of every GPU test: the device and [`gpu_lock`], or `None` to skip (see
/// `cuda_device_or_skip`: a panic instead under `SPARSE_TRAIN_REQUIRE_GPU=1`).
pub fn gpu_or_skip(test: &str) -> Option<(Device, std::sync::MutexGuard<'static, ()>)> {
    let dev = cuda_device_or_skip(test)?;
    Some((dev, gpu_lock()))
}

/// `sum |got - want|` of two int64 count tensors.
pub fn count_flips(got: &Tensor, want: &Tensor) -> i64 {
    (got - want).abs().sum(Kind::Int64).int64_value(&[])
}

/// Active counts of a bf16 kernel against fp32 `g > 0`: gate values within rounding of 0
/// may flip sign (another fp32 accumulation order), at most 0.1 % of the `total` actives + 2.
pub fn assert_counts_close(label: &str, got: &Tensor, want: &Tensor, total: i64) {
    let flips = count_flips(got, want);
    println!("  {label}: active-count flips {flips} of {total}");
    assert!(
        flips <= total / 1000 + 2,
        "{label}: active counts differ by {flips} of {total}"
    );
}

/// Runs `ffn` under autograd on fresh leaves copied from `inputs` (`[x, Wg, Wu, Wd^T]`) and
/// differentiates `loss` of its output; returns the output and the four gradients.
pub fn run_with_grads(
    inputs: &[Tensor; 4],
    ffn: impl Fn(&Tensor, &FfnWeights) -> FfnOutput,
    loss: impl Fn(&FfnOutput) -> Tensor,
) -> (FfnOutput, Vec<Tensor>) {
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.detach().copy().set_requires_grad(true))
        .collect();
    let w = FfnWeights::new(&leaves[1], &leaves[2], &leaves[3]);
    let out = ffn(&leaves[0], &w);
    loss(&out).backward();
    let grads = leaves.iter().map(|l| l.grad()).collect();
    (out, grads)
}

/// RoPE tables as the model builds them: cos over both halves, sin with its first half
/// negated (`[positions, hd]` f32), and HF's positive sine for the reference.
pub fn rope_tables(positions: i64, hd: i64, dev: Device) -> (Tensor, Tensor, Tensor) {
    let inv = (Tensor::arange_start_step(0, hd, 2, (Kind::Double, dev)) / hd as f64)
        .multiply_scalar(1e5f64.ln())
        .exp()
        .reciprocal();
    let ang = Tensor::arange(positions, (Kind::Double, dev)).outer(&inv);
    let emb = Tensor::cat(&[&ang, &ang], -1);
    let half = hd / 2;
    let sin = emb.sin();
    let signed = Tensor::cat(
        &[sin.narrow(-1, 0, half).neg(), sin.narrow(-1, half, half)],
        -1,
    );
    (
        emb.cos().to_kind(Kind::Float),
        signed.to_kind(Kind::Float),
        sin,
    )
}

/// HF's rotation in f64 of `x: [B, T, n, hd]` at rows `cos, sin_hf: [T, hd]`, head-major out.
pub fn hf_rotate(x: &Tensor, cos: &Tensor, sin_hf: &Tensor) -> Tensor {
    let hd = x.size()[3];
    let (x1, x2) = (x.narrow(-1, 0, hd / 2), x.narrow(-1, hd / 2, hd / 2));
    let rot = Tensor::cat(&[x2.neg(), x1], -1);
    let c = cos.to_kind(Kind::Double).unsqueeze(1);
    let s = sin_hf.unsqueeze(1);
    (x * c + rot * s).transpose(1, 2)
}
