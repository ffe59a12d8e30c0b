//! What the GPU tests and the FFN benchmarks share: the sparse layer inputs of
//! `shared/design/anchors.md` §3 (one generator, so bench numbers and test inputs compare),
//! and the one place a GPU test decides to run, skip or fail for want of a GPU.
//!
//! The generator builds the gate pre-activation `g_ij = z_ij + t_i + b_j` exactly:
//! `Wg` rows are unit-norm random over the first `D - 3` columns (so `z ~ N(0, 1)` for
//! `x ~ N(0, 1)`), column `D - 3` carries the per-token shift `t_i` in x against 1 in `Wg`,
//! column `D - 2` carries 1 in x against the per-unit bias `b_j ~ N(0, 0.5^2)` in `Wg`
//! (unequal unit popularity), column `D - 1` is zero. The target actives per token are
//! `k_i = (1 - s) H w_i`, with `w_i = 10` for a random 1 % of tokens and lognormal(0, 0.5)
//! for the rest, normalised to mean 1; `t_i` is solved by bisection so that
//! `sum_j Phi(t_i + b_j) = k_i`. `Wu ~ N(0, 1/D)`, `Wd ~ N(0, 1/H)`. Every draw comes from
//! tch's generator in a fixed order (seed it with `tch::manual_seed`), so one seed gives the
//! same layer in every caller.
use tch::{Device, Kind, Tensor};
use thiserror::Error;

/// Set to `1` (the GPU suite does) to make GPU tests fail instead of skipping without CUDA.
pub const REQUIRE_GPU_ENV: &str = "SPARSE_TRAIN_REQUIRE_GPU";

/// The CUDA device a GPU test runs on: `Some(cuda:0)` when tch sees a CUDA device. Without
/// one it prints that `test` is skipped and returns `None`, or panics when
/// `SPARSE_TRAIN_REQUIRE_GPU=1`, so a GPU run cannot pass by skipping.
pub fn cuda_device_or_skip(test: &str) -> Option<Device> {
    if tch::Cuda::is_available() {
        return Some(Device::Cuda(0));
    }
    if std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: {REQUIRE_GPU_ENV}=1 but tch sees no CUDA device");
    }
    println!("{test}: skipped, no CUDA device (set {REQUIRE_GPU_ENV}=1 to fail instead)");
    None
}

/// One layer's inputs, bf16 contiguous: `x: [N, D]`, `Wg, Wu, Wd^T: [H, D]`.
pub struct Layer {
    pub x: Tensor,
    pub wg: Tensor,
    pub wu: Tensor,
    pub wd: Tensor,
}

impl Layer {
    /// The four tensors in f32 (the bf16 values exactly): `[x, Wg, Wu, Wd^T]`.
    pub fn to_f32(&self) -> [Tensor; 4] {
        [&self.x, &self.wg, &self.wu, &self.wd].map(|t| t.to_kind(Kind::Float))
    }
}

/// Errors of the generator.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum GeneratorError {
    #[error("D = {d}: the generator needs D >= 8")]
    TooNarrow { d: i64 },
}

fn normal_cdf(z: &Tensor) -> Tensor {
    ((z / std::f64::consts::SQRT_2).erf() + 1.0) * 0.5
}

/// The anchors §3 layer with mean sparsity `sparsity` (fraction of inactive units) on
/// `device` (see the module docs).
pub fn imposed_sparsity_layer(
    n: i64,
    d: i64,
    h: i64,
    sparsity: f64,
    device: Device,
) -> Result<Layer, GeneratorError> {
    imposed_sparsity_layer_with_full_rows(n, d, h, sparsity, 0, device)
}

/// [`imposed_sparsity_layer`] whose first `full_rows` tokens fire on every unit (shift 12):
/// rows that fill every tile and exercise the kernels' spill paths. The same draws in the
/// same order, so `full_rows = 0` is [`imposed_sparsity_layer`].
pub fn imposed_sparsity_layer_with_full_rows(
    n: i64,
    d: i64,
    h: i64,
    sparsity: f64,
    full_rows: i64,
    device: Device,
) -> Result<Layer, GeneratorError> {
    if d < 8 {
        return Err(GeneratorError::TooNarrow { d });
    }
    let f32o = (Kind::Float, device);
    let dz = d - 3;
    let wz = Tensor::randn([h, dz], f32o);
    let wz = &wz / wz.norm_scalaropt_dim(2, [1], true);
    let b = Tensor::randn([h], f32o) * 0.5;
    // Heavy-tailed targets.
    let heavy = Tensor::rand([n], f32o).lt(0.01);
    let logn = (Tensor::randn([n], f32o) * 0.5).exp();
    let w = logn.where_self(&heavy.logical_not(), &Tensor::full([], 10.0, f32o));
    let w = &w / w.mean(Kind::Float);
    let k = (w * ((1.0 - sparsity) * h as f64)).clamp(1e-3, h as f64 - 0.5);
    // Bisection on t: sum_j Phi(t + b_j) is increasing in t.
    let mut lo = Tensor::full([n], -20.0, f32o);
    let mut hi = Tensor::full([n], 20.0, f32o);
    for _ in 0..60 {
        let mid = (&lo + &hi) * 0.5;
        let s =
            normal_cdf(&(mid.unsqueeze(1) + b.unsqueeze(0))).sum_dim_intlist(1, false, Kind::Float);
        let below = s.lt_tensor(&k);
        lo = mid.where_self(&below, &lo);
        hi = hi.where_self(&below, &mid);
    }
    let t = (lo + hi) * 0.5;
    if full_rows > 0 {
        let _ = t.narrow(0, 0, full_rows.min(n)).fill_(12.0);
    }
    let x = Tensor::cat(
        &[
            Tensor::randn([n, dz], f32o),
            t.unsqueeze(1),
            Tensor::ones([n, 1], f32o),
            Tensor::zeros([n, 1], f32o),
        ],
        1,
    );
    let wg = Tensor::cat(
        &[
            wz,
            Tensor::ones([h, 1], f32o),
            b.unsqueeze(1),
            Tensor::zeros([h, 1], f32o),
        ],
        1,
    );
    let wu = Tensor::randn([h, d], f32o) / (d as f64).sqrt();
    let wd = Tensor::randn([h, d], f32o) / (h as f64).sqrt();
    let bf = |t: Tensor| t.to_kind(Kind::BFloat16).contiguous();
    Ok(Layer {
        x: bf(x),
        wg: bf(wg),
        wu: bf(wu),
        wd: bf(wd),
    })
}

/// `max |got - want| / max |want|` (the anchors' correctness measure), `got` widened to f32.
pub fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    let err = (got.to_kind(Kind::Float) - want.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[]);
    err / want.abs().max().double_value(&[]).max(1e-30)
}

/// One AdamW update (decoupled weight decay, bias-corrected) written out in f64 on
/// `[param, exp_avg, exp_avg_sq]`, in place: the reference of the fused optimizer's tests.
/// `g` is the gradient as the update reads it (already divided by any clipping factor).
pub fn adamw_reference_step(
    state: &mut [Tensor; 3],
    g: &Tensor,
    h: &crate::fused::adamw::AdamWStep,
) {
    let [p, m, v] = state;
    let step = h.step as i32;
    *p = &*p * (1.0 - h.lr * h.weight_decay);
    *m = &*m * h.beta1 + g * (1.0 - h.beta1);
    *v = &*v * h.beta2 + g * g * (1.0 - h.beta2);
    let denom = (&*v / (1.0 - h.beta2.powi(step))).sqrt() + h.eps;
    *p = &*p - (&*m / &denom) * (h.lr / (1.0 - h.beta1.powi(step)));
}

/// Held by the unit tests that seed tch's global generator and then draw from it, so that
/// tests running in parallel threads do not interleave their draws.
#[cfg(test)]
pub(crate) static TCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
pub(crate) fn lock_tch_rng() -> std::sync::MutexGuard<'static, ()> {
    TCH_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Active units per token of `relu(x Wg^T) > 0` in f32.
    fn actives_per_token(l: &Layer) -> Tensor {
        let [x, wg, _, _] = l.to_f32();
        x.matmul(&wg.tr())
            .gt(0.0)
            .sum_dim_intlist(-1, false, Kind::Int64)
    }

    /// The generator hits the requested mean actives per token (CPU, small shape).
    #[test]
    fn generator_hits_target_sparsity() {
        let _rng = lock_tch_rng();
        tch::manual_seed(3);
        let (n, d, h) = (2000, 64, 2048);
        let l = imposed_sparsity_layer(n, d, h, 0.99, Device::Cpu).unwrap();
        let mean = actives_per_token(&l)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        let target = 0.01 * h as f64;
        assert!(
            (mean - target).abs() < 0.15 * target,
            "mean actives {mean} vs {target}"
        );
    }

    #[test]
    fn full_rows_fire_on_every_unit_and_keep_the_draws() {
        let (n, d, h) = (50, 16, 300);
        let _rng = lock_tch_rng();
        tch::manual_seed(8);
        let full = imposed_sparsity_layer_with_full_rows(n, d, h, 0.99, 3, Device::Cpu).unwrap();
        tch::manual_seed(8);
        let plain = imposed_sparsity_layer(n, d, h, 0.99, Device::Cpu).unwrap();
        let apt = actives_per_token(&full);
        assert_eq!(Vec::<i64>::try_from(apt.narrow(0, 0, 3)).unwrap(), [h; 3]);
        assert!(full.wg.equal(&plain.wg) && full.wu.equal(&plain.wu));
        assert!(full
            .x
            .narrow(0, 3, n - 3)
            .equal(&plain.x.narrow(0, 3, n - 3)));
    }

    #[test]
    fn narrow_layers_are_refused() {
        assert_eq!(
            imposed_sparsity_layer(4, 7, 16, 0.9, Device::Cpu).err(),
            Some(GeneratorError::TooNarrow { d: 7 })
        );
    }
}
