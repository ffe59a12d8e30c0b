//! How large the hybrid forward's active pool and gate spill buffer are, per shape, and when
//! their status is checked.
//!
//! A forward of a shape seen for the first time reads its status word on the host (one sync)
//! and grows and reruns until it fits, as `hybrid_forward` always did; the sizes that sufficed
//! (with headroom) are kept per (device, N, D, H). While a [`DeferredChecks`] is open on a
//! device, later forwards of a known shape do not synchronise: each folds its status word
//! into a per-shape accumulator on the device, and the owner of the checks reads one flag
//! after the step. On an overflow the step's results are wrong (the kernels leave their
//! outputs unwritten past the status, never writing out of bounds): the owner discards the
//! step, [`DeferredChecks::settle`] grows the sizes to what the kernels asked for, and the
//! step runs again. A training step thus waits on the host once, not once per layer.
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};

use tch::{Device, Kind, Tensor};

use super::consts::{HC_GSPILL, HC_NNZ, HC_STATUS, ST_GATE_SPILL, ST_NNZ_OVER};
use super::launch::cuda_ordinal;
use super::Result;

// The accumulators copy the first three control words in this order.
const _: () = assert!(HC_STATUS == 0 && HC_NNZ == 1 && HC_GSPILL == 2);

/// (device ordinal, N, D, H).
pub(super) type SizeKey = (usize, i64, i64, i64);

/// Pool entries and spill slots of one shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct PoolSizes {
    pub cap: i64,
    pub spill_cap: i64,
}

impl PoolSizes {
    /// The first guess for a shape: 64 actives per token, one spill slot per 64 tiles.
    pub fn initial(n: i64, ntiles: i64) -> PoolSizes {
        PoolSizes {
            cap: (n * 64).max(1024),
            spill_cap: (n * ntiles / 64).max(64),
        }
    }

    /// Grown to what a forward with status `st` asked for (`nnz` actives, `gspill` spill
    /// slots), with headroom; `max_spill` bounds the spill slots (one per token tile).
    pub fn grown(self, st: i64, nnz: i64, gspill: i64, max_spill: i64) -> PoolSizes {
        let mut s = self;
        if st & ST_NNZ_OVER != 0 {
            s.cap = s.cap.max(nnz + nnz / 4 + 1024);
        }
        if st & ST_GATE_SPILL != 0 {
            s.spill_cap = (gspill + gspill / 4 + 64).min(max_spill).max(s.spill_cap);
        }
        s
    }
}

#[derive(Default)]
struct Registry {
    sizes: HashMap<SizeKey, (PoolSizes, i64)>,
    /// Per device with open checks: per shape, `[status OR, nnz max, spill max]` int32.
    deferred: HashMap<usize, HashMap<SizeKey, Tensor>>,
}

fn registry() -> MutexGuard<'static, Registry> {
    static REG: OnceLock<Mutex<Registry>> = OnceLock::new();
    REG.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// The sizes that sufficed for `key` last time, if any.
pub(super) fn known_sizes(key: SizeKey) -> Option<PoolSizes> {
    registry().sizes.get(&key).map(|(s, _)| *s)
}

/// Keeps `sizes` for `key` (`max_spill`: the bound on its spill slots).
pub(super) fn keep_sizes(key: SizeKey, sizes: PoolSizes, max_spill: i64) {
    registry().sizes.insert(key, (sizes, max_spill));
}

/// Whether forwards of `key` may skip their host read: checks are open on its device and
/// its sizes are known.
pub(super) fn defers(key: SizeKey) -> bool {
    let reg = registry();
    reg.deferred.contains_key(&key.0) && reg.sizes.contains_key(&key)
}

/// Folds a forward's control words `hctrl` into the open checks of its shape (device ops,
/// no sync).
pub(super) fn record(key: SizeKey, hctrl: &Tensor) -> Result<()> {
    let mut reg = registry();
    let Some(per_shape) = reg.deferred.get_mut(&key.0) else {
        return Ok(());
    };
    let words = hctrl.f_narrow(0, 0, 3)?;
    match per_shape.get(&key) {
        Some(acc) => {
            let mut status = acc.f_narrow(0, HC_STATUS, 1)?;
            let _ = status.f_bitwise_or_tensor_(&words.f_narrow(0, HC_STATUS, 1)?)?;
            let mut sizes = acc.f_narrow(0, HC_NNZ, 2)?;
            sizes.f_copy_(&sizes.f_maximum(&words.f_narrow(0, HC_NNZ, 2)?)?)?;
        }
        None => {
            let mut acc = words.f_zeros_like()?;
            acc.f_copy_(&words)?;
            per_shape.insert(key, acc);
        }
    }
    Ok(())
}

/// Hybrid forwards on `device` that check their status on the device while this lives
/// (see the module's text). Open one per step, read [`DeferredChecks::overflow_flag`] with
/// the step's other values, then [`DeferredChecks::settle`].
pub struct DeferredChecks {
    ordinal: usize,
}

impl DeferredChecks {
    /// Opens the checks of `device` (a CUDA device), replacing any left open.
    pub fn begin(device: Device) -> Result<DeferredChecks> {
        let ordinal = cuda_ordinal(device)?;
        registry().deferred.insert(ordinal, HashMap::new());
        Ok(DeferredChecks { ordinal })
    }

    /// `1.0` (f32 scalar on the device) when a forward since [`DeferredChecks::begin`]
    /// overflowed, else `0.0`; no sync.
    pub fn overflow_flag(&self) -> Result<Tensor> {
        let device = Device::Cuda(self.ordinal);
        let mut flag = Tensor::f_zeros([], (Kind::Float, device))?;
        let reg = registry();
        for acc in reg
            .deferred
            .get(&self.ordinal)
            .into_iter()
            .flat_map(|m| m.values())
        {
            let hit = acc
                .f_narrow(0, HC_STATUS, 1)?
                .f_ne(0)?
                .f_to_kind(Kind::Float)?;
            flag = flag.f_maximum(&hit.f_reshape([])?)?;
        }
        Ok(flag)
    }

    /// Closes the checks. When the step `overflowed` (its flag, read by the caller), grows
    /// every shape's sizes to what its forwards asked for (one read per shape) and returns
    /// how many shapes grew.
    pub fn settle(self, overflowed: bool) -> Result<usize> {
        let per_shape = registry()
            .deferred
            .remove(&self.ordinal)
            .unwrap_or_default();
        if !overflowed {
            return Ok(0);
        }
        let mut grown = 0;
        for (key, acc) in per_shape {
            let w = Vec::<i32>::try_from(acc.f_to_device(Device::Cpu)?)?;
            let (st, nnz, gspill) = (w[0] as i64, w[1] as i64, w[2] as i64);
            if st == 0 {
                continue;
            }
            let mut reg = registry();
            if let Some((sizes, max_spill)) = reg.sizes.get_mut(&key) {
                *sizes = sizes.grown(st, nnz, gspill, *max_spill);
                grown += 1;
            }
        }
        Ok(grown)
    }
}

impl Drop for DeferredChecks {
    fn drop(&mut self) {
        registry().deferred.remove(&self.ordinal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Growth covers what was asked for, keeps what was not short, and bounds the spill.
    #[test]
    fn sizes_grow_to_what_the_kernels_asked_for() {
        let s = PoolSizes::initial(100, 4);
        assert_eq!(
            s,
            PoolSizes {
                cap: 6400,
                spill_cap: 64
            }
        );
        let g = s.grown(ST_NNZ_OVER, 10_000, 0, 400);
        assert!(g.cap >= 10_000 && g.spill_cap == 64);
        let g = s.grown(ST_GATE_SPILL, 0, 300, 400);
        assert_eq!(g.cap, 6400);
        assert!(g.spill_cap >= 300 && g.spill_cap <= 400);
        assert_eq!(s.grown(0, 1 << 20, 1 << 20, 400), s);
    }
}
