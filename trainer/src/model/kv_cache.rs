//! Keys and values of past positions, for incremental decoding with
//! [`Llama::forward_cached`](super::Llama::forward_cached).
use crate::config::ModelConfig;
use tch::{Device, Kind, Tensor};

/// Per layer, `k, v: [B, kv_heads, capacity, head_dim]`, preallocated; positions `0..len`
/// are filled.
pub struct KvCache {
    pub(super) layers: Vec<(Tensor, Tensor)>,
    pub(super) len: i64,
    capacity: i64,
}

impl KvCache {
    /// An empty cache for `batch` sequences of at most `capacity` positions, in `kind` on
    /// `device` (the dtype of the model's activations: bf16 for a bf16 model).
    pub fn new(
        cfg: &ModelConfig,
        batch: i64,
        capacity: i64,
        kind: Kind,
        device: Device,
    ) -> KvCache {
        let shape = [
            batch,
            cfg.kv_heads() as i64,
            capacity,
            cfg.head_dim() as i64,
        ];
        let layers = (0..cfg.num_layers)
            .map(|_| {
                (
                    Tensor::zeros(shape, (kind, device)),
                    Tensor::zeros(shape, (kind, device)),
                )
            })
            .collect();
        KvCache {
            layers,
            len: 0,
            capacity,
        }
    }

    /// Positions cached so far (the position of the next token).
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }
}
