//! Framework-free tensors: a dtype, a shape and little-endian bytes.

use std::collections::BTreeMap;

use crate::error::{CheckpointError, Result};

/// Element type of a [`RawTensor`]; the subset of safetensors dtypes a trainer produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 1-byte boolean.
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
}

impl Dtype {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }

    pub(crate) fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            Dtype::Bool => S::BOOL,
            Dtype::U8 => S::U8,
            Dtype::I8 => S::I8,
            Dtype::I16 => S::I16,
            Dtype::U16 => S::U16,
            Dtype::I32 => S::I32,
            Dtype::U32 => S::U32,
            Dtype::I64 => S::I64,
            Dtype::U64 => S::U64,
            Dtype::F16 => S::F16,
            Dtype::BF16 => S::BF16,
            Dtype::F32 => S::F32,
            Dtype::F64 => S::F64,
        }
    }

    pub(crate) fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        use safetensors::Dtype as S;
        Some(match dtype {
            S::BOOL => Dtype::Bool,
            S::U8 => Dtype::U8,
            S::I8 => Dtype::I8,
            S::I16 => Dtype::I16,
            S::U16 => Dtype::U16,
            S::I32 => Dtype::I32,
            S::U32 => Dtype::U32,
            S::I64 => Dtype::I64,
            S::U64 => Dtype::U64,
            S::F16 => Dtype::F16,
            S::BF16 => Dtype::BF16,
            S::F32 => Dtype::F32,
            S::F64 => Dtype::F64,
            _ => return None,
        })
    }
}

/// A tensor as bytes: `data` holds `shape.iter().product()` elements of `dtype`, little-endian,
/// row-major (what `tch::Tensor::copy_data_u8` produces for a contiguous CPU tensor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawTensor {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first; `[]` is a scalar.
    pub shape: Vec<usize>,
    /// The elements' bytes: `len() == shape.product() * dtype.size_bytes()`.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// The byte length `shape` and `dtype` call for.
    pub fn expected_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_bytes()
    }
}

/// Everything a training run needs to resume, as saved by [`crate::save`].
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Model weights under Hugging Face Llama names (`model.layers.0.mlp.gate_proj.weight`, ...);
    /// written to `model.safetensors`.
    pub weights: BTreeMap<String, RawTensor>,
    /// Optimizer state (`<param name>.exp_avg`, ...); written to `optimizer.safetensors`.
    pub optimizer: BTreeMap<String, RawTensor>,
    /// Step, tokens seen, data cursor, RNG, schedulers, FFN layout: whatever the trainer needs;
    /// written to `trainer_state.json` under the key `trainer_state`.
    pub trainer_state: serde_json::Value,
    /// The Hugging Face `config.json`, so the weights load in `transformers` as they are.
    pub hf_config: Option<serde_json::Value>,
    /// Other files kept verbatim beside the tensors, by plain file name (the tokenizer:
    /// `tokenizer.json`, `tokenizer_config.json`); listed and checked in `MANIFEST.json` like
    /// the rest.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// One tensor [`check_tensors`] expects: name, dtype and shape.
pub type ExpectedTensor<'a> = (&'a str, Dtype, &'a [usize]);

/// Checks that every `expected` tensor is in the checkpoint (weights first, then optimizer state)
/// with the expected dtype and shape; the error names the first missing or mismatched tensor,
/// with expected and found dtype and shape. Extra tensors in the checkpoint are allowed.
pub fn check_tensors(checkpoint: &Checkpoint, expected: &[ExpectedTensor<'_>]) -> Result<()> {
    for &(name, dtype, shape) in expected {
        let (file, found) = match (checkpoint.weights.get(name), checkpoint.optimizer.get(name)) {
            (Some(t), _) => (crate::MODEL_FILE, t),
            (None, Some(t)) => (crate::OPTIMIZER_FILE, t),
            (None, None) => {
                return Err(CheckpointError::MissingTensor {
                    name: name.to_string(),
                })
            }
        };
        if found.dtype != dtype || found.shape != shape {
            return Err(CheckpointError::TensorMismatch {
                file,
                name: name.to_string(),
                expected_dtype: dtype,
                expected_shape: shape.to_vec(),
                found_dtype: found.dtype,
                found_shape: found.shape.clone(),
            });
        }
    }
    Ok(())
}
