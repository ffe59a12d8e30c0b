//! What the MPI and NCCL backends share: the element types both move natively, and the
//! checks and errors of a collective's tensors.
use tch::{Device, Tensor};

use crate::error::LaunchError;

/// Runs `$body` with `$T` bound to the Rust element type of `$kind` for the kinds MPI and
/// NCCL both move (f32, f64, i64, i32, u8, i8) and for the `kind => type` pairs a backend
/// adds after `$other`; evaluates `$other` for any other kind.
macro_rules! with_element_type {
    ($kind:expr, $T:ident => $body:expr, $other:expr $(, $extra:path => $t:ty)*) => {
        with_element_type!(@match $kind, $T, $body, $other;
            tch::Kind::Float => f32, tch::Kind::Double => f64, tch::Kind::Int64 => i64,
            tch::Kind::Int => i32, tch::Kind::Uint8 => u8, tch::Kind::Int8 => i8
            $(, $extra => $t)*)
    };
    (@match $kind:expr, $T:ident, $body:expr, $other:expr; $($k:path => $t:ty),*) => {
        match $kind {
            $($k => {
                type $T = $t;
                $body
            })*
            _ => $other,
        }
    };
}
pub(crate) use with_element_type;

/// A collective from one tensor into another, both contiguous and of one kind.
#[derive(Clone, Copy)]
pub(crate) enum Transfer {
    /// `output` (`numel = n`) gets block `rank` of the group-wide sum of `input`
    /// (`numel = n * size`).
    ReduceScatterSum,
    /// `output` (`numel = n * size`) gets every rank's `input` (`numel = n`) in rank order.
    AllGather,
}

impl Transfer {
    /// The collective's name in errors.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Transfer::ReduceScatterSum => "reduce_scatter_sum",
            Transfer::AllGather => "all_gather",
        }
    }
}

/// A collective that rewrites one contiguous tensor in place.
#[derive(Clone, Copy)]
pub(crate) enum InPlace {
    /// The tensor becomes its sum over the group.
    AllReduceSum,
    /// The tensor becomes group rank `root`'s copy.
    Broadcast {
        /// Group rank whose copy every rank gets.
        root: usize,
    },
}

impl InPlace {
    /// The collective's name in errors.
    pub(crate) fn name(self) -> &'static str {
        match self {
            InPlace::AllReduceSum => "all_reduce_sum",
            InPlace::Broadcast { .. } => "broadcast",
        }
    }
}

/// Fails with [`LaunchError::WrongDevice`] (naming `expected`, the devices the group uses)
/// unless every tensor is on `device`.
pub(crate) fn check_device(
    rank: usize,
    op: &'static str,
    tensors: &[&Tensor],
    device: Device,
    expected: impl FnOnce() -> String,
) -> Result<(), LaunchError> {
    if let Some(wrong) = tensors.iter().find(|t| t.device() != device) {
        return Err(LaunchError::WrongDevice {
            rank,
            op,
            got: wrong.device(),
            expected: expected(),
        });
    }
    debug_assert!(tensors.iter().all(|t| t.is_contiguous()));
    Ok(())
}

/// The error for a tensor whose element type the backend does not move.
pub(crate) fn unsupported(rank: usize, op: &'static str, tensor: &Tensor) -> LaunchError {
    LaunchError::UnsupportedKind {
        rank,
        op,
        kind: tensor.kind(),
        device: tensor.device(),
    }
}
