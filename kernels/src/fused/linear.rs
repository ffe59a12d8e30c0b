//! `x W^T` for inference: a decode step's few rows on CUDA go through the decode kernel
//! (`kernels/cuda/decode.cu`, the weights streamed once at the card's bandwidth, where the
//! GEMM for one row reaches a fraction of it); everything else through `matmul`.
use tch::{Device, Kind, Tensor};

use super::FusedError;
use crate::cuda::decode::{decode_dispatch, decode_linear};

/// `x W^T` of `x: [.., D]` and `w: [O, D]`, shaped `[.., O]`, for inference: the result of
/// the decode kernel carries no gradient (call it under `no_grad`).
pub fn inference_linear(x: &Tensor, w: &Tensor) -> Result<Tensor, FusedError> {
    let size = x.size();
    let d = *size.last().unwrap_or(&0);
    let rows: i64 = size[..size.len().saturating_sub(1)].iter().product();
    let decode_sized = matches!(x.device(), Device::Cuda(_))
        && x.kind() == Kind::BFloat16
        && w.kind() == Kind::BFloat16
        && w.dim() == 2
        && w.size()[1] == d
        && decode_dispatch(rows, d);
    if !decode_sized {
        return Ok(x.matmul(&w.tr()));
    }
    let mut out = size.clone();
    *out.last_mut().expect("x has a last dimension") = w.size()[0];
    let y = decode_linear(&x.reshape([rows, d]).contiguous(), &w.contiguous())
        .map_err(|e| FusedError(format!("inference_linear: {e}")))?;
    Ok(y.view(out.as_slice()))
}
