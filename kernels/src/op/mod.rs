//! `SparseFfn`: the gated FFN as one op with one dispatch.
//!
//! [`try_sparse_ffn`] validates the inputs and picks the arm that runs the call, once, in
//! `choose_arm`; nothing downstream branches on the path or the device again:
//!
//! | path   | device | gradient needed | arm                                                  |
//! |--------|--------|-----------------|------------------------------------------------------|
//! | dense  | CUDA   | yes             | `SparseFfn`, cuBLAS products around the gating kernels (`cuda::dense_forward`) when the products run in bf16 and H is a multiple of 8, else as below |
//! | dense  | any    | any             | tch ops and tch autograd ([`dense::dense_ffn`]); without statistics and gradient the lean [`dense::dense_ffn_inference`] |
//! | twell  | CPU    | any             | `SparseFfn` autograd function, `cpu` reference on TwELL |
//! | hybrid | CPU    | any             | `SparseFfn`, `cpu` reference on the ELL + tail format |
//! | twell  | CUDA   | no              | TwELL inference kernels (`cuda::twell_forward`), no autograd node; formats the kernels do not take run the dense fallback |
//! | twell  | CUDA   | yes             | `SparseFfn`, the exact dense fallback (`dense::forward`) |
//! | hybrid | CUDA   | any             | `SparseFfn`, hybrid training kernels (`cuda::hybrid_forward`); shapes the kernels do not take run the dense fallback |
//!
//! The autograd function is C++ (`bridge/sparse_ffn.cpp`: tch has no custom functions); its
//! forward and backward call back into `bridge`, which runs the chosen `Kernel` and keeps
//! what the backward needs in a `Saved` value owned by the autograd context.
//!
//! Dtypes: the CPU arms and the dense fallback compute in f32 and return `y` and the
//! gradients in their input's dtype; the CUDA kernels compute in bf16 (inputs cast) and
//! return `y` in x's dtype (the hybrid kernels under autocast: in autocast's dtype, as the
//! dense matmuls would) and the gradients in their input's dtype. `l1_sum` is f32 everywhere, NaN where the TwELL
//! inference kernels run (they never form `|h|`).
use tch::{Device, Kind, Tensor};

use crate::cuda::gating::gating_supports;
use crate::cuda::HybridKernels;
use crate::fused::master_weights::cached_weight;
use crate::types::{FfnError, FfnOutput, FfnPath, FfnWeights, SparseFfnConfig};

mod bridge;
mod cpu;
mod cuda;
pub mod dense;

/// Which packed format the CPU reference runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CpuFormat {
    Twell,
    EllTail,
}

/// What runs inside the `SparseFfn` autograd function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Cpu(CpuFormat),
    CudaHybrid,
    /// The dense FFN on CUDA with the gating kernels between its products (training).
    CudaDense,
    DenseFallback,
}

/// The arm that runs one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arm {
    DenseOracle,
    DenseInference,
    /// TwELL kernels with this many words per 256-column tile.
    CudaTwell {
        words_per_tile: i64,
    },
    Autograd(Kernel),
}

/// Runs the gated FFN on `x: [N, D]` with the default format parameters.
///
/// # Panics
/// On the errors of [`try_sparse_ffn`] (bad shapes or dtypes, unsupported device, an `H`
/// beyond TwELL's 16-bit column indices).
pub fn sparse_ffn(x: &Tensor, w: &FfnWeights, path: FfnPath) -> FfnOutput {
    try_sparse_ffn(x, w, path, &SparseFfnConfig::default())
        .unwrap_or_else(|e| panic!("{} FFN failed: {e}", path.name()))
}

/// Runs the gated FFN on `x: [N, D]` with `Wg, Wu, Wd^T: [H, D]` on `path`, with the
/// formats of `config` (see the module docs for what runs where).
pub fn try_sparse_ffn(
    x: &Tensor,
    w: &FfnWeights,
    path: FfnPath,
    config: &SparseFfnConfig,
) -> Result<FfnOutput, FfnError> {
    match choose_arm(x, w, path, config)? {
        Arm::DenseOracle => match w.masters {
            // tch autograd: the masters' gradients through stand-ins for the copies.
            Some([mg, mu, md]) => {
                let stand_in = |m: &Tensor, c: &Tensor| {
                    cached_weight(m, c).map_err(|e| FfnError::Bridge(e.to_string()))
                };
                let (g, u, d) = (
                    stand_in(mg, w.gate)?,
                    stand_in(mu, w.up)?,
                    stand_in(md, w.down_t)?,
                );
                Ok(dense::dense_ffn(x, &FfnWeights::new(&g, &u, &d)))
            }
            None => Ok(dense::dense_ffn(x, w)),
        },
        Arm::DenseInference => Ok(dense::dense_ffn_inference(x, w)),
        Arm::CudaTwell { words_per_tile } => {
            cuda::twell_forward(words_per_tile, config.statistics, x, w).map(FfnOutput::from_array)
        }
        Arm::Autograd(kernel) => bridge::apply(x, w, kernel, config),
    }
}

/// The one place the path, the device and the need for a gradient decide what runs.
fn choose_arm(
    x: &Tensor,
    w: &FfnWeights,
    path: FfnPath,
    config: &SparseFfnConfig,
) -> Result<Arm, FfnError> {
    if path == FfnPath::Dense {
        if grad_needed(x, w)
            && x.device().is_cuda()
            && gating_supports(w.gate.size()[0])
            && computes_in_bf16(x, w)
        {
            validate(x, w)?;
            return Ok(Arm::Autograd(Kernel::CudaDense));
        }
        return Ok(if config.statistics || grad_needed(x, w) {
            Arm::DenseOracle
        } else {
            Arm::DenseInference
        });
    }
    validate(x, w)?;
    Ok(match (x.device(), path) {
        (Device::Cpu, FfnPath::Twell) => Arm::Autograd(Kernel::Cpu(CpuFormat::Twell)),
        (Device::Cpu, _) => Arm::Autograd(Kernel::Cpu(CpuFormat::EllTail)),
        (_, FfnPath::Twell) => match cuda::twell_words_per_tile(&config.twell) {
            Some(words_per_tile) if !grad_needed(x, w) => Arm::CudaTwell { words_per_tile },
            _ => Arm::Autograd(Kernel::DenseFallback),
        },
        (device, _) => {
            let (n, d) = x.size2()?;
            let h = w.gate.size()[0];
            if HybridKernels::for_device(device)?.supports(n, d, h) {
                Arm::Autograd(Kernel::CudaHybrid)
            } else {
                Arm::Autograd(Kernel::DenseFallback)
            }
        }
    })
}

/// Whether the output of this call will be differentiated.
fn grad_needed(x: &Tensor, w: &FfnWeights) -> bool {
    [x, w.gate, w.up, w.down_t]
        .into_iter()
        .chain(w.masters.into_iter().flatten())
        .any(|t| t.requires_grad())
        && crate::torch::cuda_runtime::grad_mode_enabled()
}

/// Whether the dense FFN's products run in bf16 anyway (bf16 operands, or bf16 autocast), so
/// that the bf16 gating kernels change no precision (f32 stays on the f32 tch ops).
fn computes_in_bf16(x: &Tensor, w: &FfnWeights) -> bool {
    crate::torch::cuda_runtime::cuda_autocast_kind() == Some(Kind::BFloat16)
        || [x, w.gate, w.up, w.down_t]
            .iter()
            .all(|t| t.kind() == Kind::BFloat16)
}

fn check_kind(name: &'static str, t: &Tensor) -> Result<(), FfnError> {
    match t.kind() {
        Kind::Float | Kind::BFloat16 => Ok(()),
        kind => Err(FfnError::Dtype { name, kind }),
    }
}

fn validate(x: &Tensor, w: &FfnWeights) -> Result<(), FfnError> {
    let xs = x.size();
    if xs.len() != 2 {
        return Err(FfnError::InputShape { shape: xs });
    }
    check_kind("x", x)?;
    let d = xs[1];
    let h = w.gate.size().first().copied().unwrap_or(-1);
    let weights = [("Wg", w.gate), ("Wu", w.up), ("Wd^T", w.down_t)];
    let masters = MASTER_NAMES
        .into_iter()
        .zip(w.masters.into_iter().flatten());
    for (name, t) in weights.into_iter().chain(masters) {
        let shape = t.size();
        if shape != [h, d] {
            return Err(FfnError::WeightShape { name, shape, h, d });
        }
        if t.device() != x.device() {
            return Err(FfnError::Device {
                name,
                device: t.device(),
                x_device: x.device(),
            });
        }
        check_kind(name, t)?;
    }
    match x.device() {
        Device::Cpu | Device::Cuda(_) => Ok(()),
        device => Err(FfnError::UnsupportedDevice { device }),
    }
}

/// How errors name the masters of `Wg, Wu, Wd^T`.
const MASTER_NAMES: [&str; 3] = ["the master of Wg", "the master of Wu", "the master of Wd^T"];

/// `x, Wg, Wu, Wd^T` as one arm receives them.
struct Inputs<'a> {
    x: &'a Tensor,
    gate: &'a Tensor,
    up: &'a Tensor,
    down_t: &'a Tensor,
}

impl<'a> Inputs<'a> {
    /// The first four of `tensors`: `x, Wg, Wu, Wd^T`.
    fn of(tensors: &'a [Tensor]) -> Self {
        Inputs {
            x: &tensors[0],
            gate: &tensors[1],
            up: &tensors[2],
            down_t: &tensors[3],
        }
    }

    /// `(N, D, H)`.
    fn dims(&self) -> Result<(i64, i64, i64), FfnError> {
        let (n, d) = self.x.size2()?;
        Ok((n, d, self.gate.size()[0]))
    }
}

/// What the forward keeps for the backward (besides x and the weights, which the autograd
/// context saves as tensors).
enum Saved {
    Cpu {
        config: SparseFfnConfig,
        pattern: Box<cpu::Pattern>,
    },
    Dense,
    /// The hybrid kernels' packed actives (CSR + transpose).
    CudaHybrid(Box<crate::cuda::HybridState>),
    /// The dense arm's pre-activations.
    CudaDense(cuda::DenseState),
}

/// The forward of `kernel` inside the autograd function: `[y, l1_sum, active_per_token,
/// active_per_unit, overflow_rows]` and the state for the backward.
fn forward(
    kernel: Kernel,
    config: &SparseFfnConfig,
    t: &Inputs,
) -> Result<([Tensor; 5], Saved), FfnError> {
    match kernel {
        Kernel::Cpu(format) => {
            let (outs, pattern) = cpu::forward(format, config, t)?;
            let saved = Saved::Cpu {
                config: *config,
                pattern: Box::new(pattern),
            };
            Ok((outs, saved))
        }
        Kernel::CudaHybrid => {
            let (outs, state) = cuda::hybrid_forward(t)?;
            Ok((outs, Saved::CudaHybrid(Box::new(state))))
        }
        Kernel::CudaDense => {
            let (outs, state) = cuda::dense_forward(t)?;
            Ok((outs, Saved::CudaDense(state)))
        }
        Kernel::DenseFallback => Ok((dense::forward(t), Saved::Dense)),
    }
}

/// The gradient buffers of the masters (`.grad` of `Wg, Wu, Wd^T`'s masters), which the
/// backward adds the weight gradients into.
type GradsInto<'a> = Option<[&'a Tensor; 3]>;

/// The backward on what the forward saved: `[dx, dWg, dWu, dWd^T]`; with `into`, the weight
/// gradients are added there instead and the last three are undefined (no gradient).
fn backward(
    saved: &Saved,
    t: &Inputs,
    dy: &Tensor,
    dl1: &Tensor,
    into: GradsInto,
) -> Result<[Tensor; 4], FfnError> {
    let grads = match saved {
        Saved::CudaHybrid(state) => return cuda::hybrid_backward(state, t, dy, dl1, into),
        Saved::CudaDense(state) => return cuda::dense_backward(state, t, dy, dl1, into),
        Saved::Cpu { config, pattern } => cpu::backward(config, pattern, t, dy, dl1)?,
        Saved::Dense => dense::backward(t, dy, dl1),
    };
    add_weight_grads(grads, into)
}

/// With `into`, adds the weight gradients of `[dx, dWg, dWu, dWd^T]` there and returns
/// `[dx, undefined x 3]`; without, `grads` as they are.
fn add_weight_grads(grads: [Tensor; 4], into: GradsInto) -> Result<[Tensor; 4], FfnError> {
    let Some(into) = into else {
        return Ok(grads);
    };
    let [dx, dwg, dwu, dwd] = grads;
    for (g, dw) in into.into_iter().zip([dwg, dwu, dwd]) {
        let _ = g.shallow_clone().f_add_(&dw)?;
    }
    Ok([dx, Tensor::new(), Tensor::new(), Tensor::new()])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dense CUDA arm takes only products that run in bf16 anyway: all four operands
    /// bf16 (or bf16 autocast, off here); an f32 operand keeps the f32 tch ops.
    #[test]
    fn the_gating_arm_takes_only_bf16_products() {
        let t = |kind| Tensor::zeros([4, 8], (kind, Device::Cpu));
        let (b, f) = (t(Kind::BFloat16), t(Kind::Float));
        let w = |gate, up, down_t| FfnWeights::new(gate, up, down_t);
        assert!(computes_in_bf16(&b, &w(&b, &b, &b)));
        assert!(!computes_in_bf16(&f, &w(&f, &f, &f)));
        assert!(!computes_in_bf16(&b, &w(&b, &f, &b)));
        assert!(!computes_in_bf16(&f, &w(&b, &b, &b)));
    }
}
