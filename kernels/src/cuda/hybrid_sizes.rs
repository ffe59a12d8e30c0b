//! How large the hybrid forward's active pool and gate spill buffer are, per shape, and when
//! their status is checked.
//!
//! A forward of a shape seen for the first time reads its status word on the host (one sync)
//! and grows and reruns until it fits, as `hybrid_forward` always did; the sizes that sufficed
//! (with headroom) are kept per (device, N, D, H). While a [`DeferredChecks`] is open on a
//! device, later forwards of a known shape do not synchronise: each folds its status word
//! into a per-shape accumulator on the device, and the owner of the checks reads them all
//! once after the step. On an overflow the step's results are wrong (the kernels leave their
//! outputs unwritten past the status, never writing out of bounds): the owner discards the
//! step, [`DeferredChecks::finish`] grows the sizes to what the kernels asked for, and the
//! step runs again. A training step thus waits on the host once, not once per layer.
//!
//! The accumulators outlive the checks: [`DeferredChecks::begin`] zeroes those of earlier
//! steps in place rather than making new ones, so a captured step (a CUDA graph replays the
//! folds into the addresses it recorded, without running this code) reports into the
//! accumulators the owner reads.
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};

use tch::{Device, Tensor};

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
    /// Bumped whenever a shape's sizes are kept or grow (a captured step records the sizes
    /// of its time: see [`sizes_generation`]).
    generation: u64,
    /// Per device: whether checks are open, and per shape `[status OR, nnz max, spill max]`
    /// int32 (kept across steps).
    deferred: HashMap<usize, DeviceChecks>,
}

#[derive(Default)]
struct DeviceChecks {
    open: bool,
    per_shape: HashMap<SizeKey, Tensor>,
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
    let mut reg = registry();
    reg.sizes.insert(key, (sizes, max_spill));
    reg.generation += 1;
}

/// A counter that changes whenever any shape's pool sizes are kept or grow: a CUDA graph
/// captured at one value runs kernels sized for that time, and must be captured again
/// once the value moves on.
pub fn sizes_generation() -> u64 {
    registry().generation
}

/// Whether forwards of `key` may skip their host read: checks are open on its device and
/// its sizes are known.
pub(super) fn defers(key: SizeKey) -> bool {
    let reg = registry();
    reg.deferred.get(&key.0).is_some_and(|d| d.open) && reg.sizes.contains_key(&key)
}

/// Folds a forward's control words `hctrl` into the open checks of its shape (device ops,
/// no sync). A shape's first fold makes its accumulator (zeros, then the fold).
pub(super) fn record(key: SizeKey, hctrl: &Tensor) -> Result<()> {
    let mut reg = registry();
    let Some(checks) = reg.deferred.get_mut(&key.0).filter(|d| d.open) else {
        return Ok(());
    };
    let words = hctrl.f_narrow(0, 0, 3)?;
    let acc = match checks.per_shape.get(&key) {
        Some(acc) => acc.shallow_clone(),
        None => {
            let acc = words.f_zeros_like()?;
            checks.per_shape.insert(key, acc.shallow_clone());
            acc
        }
    };
    let mut status = acc.f_narrow(0, HC_STATUS, 1)?;
    let _ = status.f_bitwise_or_tensor_(&words.f_narrow(0, HC_STATUS, 1)?)?;
    let mut sizes = acc.f_narrow(0, HC_NNZ, 2)?;
    sizes.f_copy_(&sizes.f_maximum(&words.f_narrow(0, HC_NNZ, 2)?)?)?;
    Ok(())
}

/// Hybrid forwards on `device` that check their status on the device while this lives
/// (see the module's text). Open one per step and [`DeferredChecks::finish`] it after the
/// step's micro-batches.
pub struct DeferredChecks {
    ordinal: usize,
}

impl DeferredChecks {
    /// Opens the checks of `device` (a CUDA device), replacing any left open: the
    /// accumulators of earlier steps are zeroed in place (one small kernel per shape).
    pub fn begin(device: Device) -> Result<DeferredChecks> {
        let ordinal = cuda_ordinal(device)?;
        open(ordinal)?;
        Ok(DeferredChecks { ordinal })
    }

    /// Closes the checks: the status words of the step's forwards, every shape's at once
    /// (one sync). On an overflow, grows each overflowing shape's sizes to what its forwards
    /// asked for; the caller then discards the step and runs it again.
    pub fn finish(self) -> Result<Settled> {
        let (keys, accs): (Vec<SizeKey>, Vec<Tensor>) = {
            let mut reg = registry();
            let Some(checks) = reg.deferred.get_mut(&self.ordinal) else {
                return Ok(Settled::default());
            };
            checks.open = false;
            checks
                .per_shape
                .iter()
                .map(|(k, t)| (*k, t.shallow_clone()))
                .unzip()
        };
        let mut settled = Settled::default();
        if keys.is_empty() {
            return Ok(settled);
        }
        let words = Tensor::f_stack(&accs, 0)?.f_view([-1])?;
        let words = Vec::<i32>::try_from(words.f_to_device(Device::Cpu)?)?;
        let mut reg = registry();
        for (key, w) in keys.iter().zip(words.chunks(3)) {
            let (st, nnz, gspill) = (w[0] as i64, w[1] as i64, w[2] as i64);
            if st == 0 {
                continue;
            }
            settled.overflowed = true;
            if let Some((sizes, max_spill)) = reg.sizes.get_mut(key) {
                *sizes = sizes.grown(st, nnz, gspill, *max_spill);
                settled.grown += 1;
            }
        }
        if settled.grown > 0 {
            reg.generation += 1;
        }
        Ok(settled)
    }
}

/// What [`DeferredChecks::finish`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Settled {
    /// A forward since [`DeferredChecks::begin`] overflowed: its step's results are wrong.
    pub overflowed: bool,
    /// Shapes whose sizes grew.
    pub grown: usize,
}

impl Drop for DeferredChecks {
    fn drop(&mut self) {
        if let Some(checks) = registry().deferred.get_mut(&self.ordinal) {
            checks.open = false;
        }
    }
}

/// Opens the checks of device `ordinal`, zeroing the accumulators it already has.
fn open(ordinal: usize) -> Result<()> {
    let mut reg = registry();
    let checks = reg.deferred.entry(ordinal).or_default();
    for acc in checks.per_shape.values_mut() {
        let _ = acc.f_zero_()?;
    }
    checks.open = true;
    Ok(())
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

    /// The checks' bookkeeping on CPU tensors (an ordinal no device has): statuses OR'ed and
    /// sizes maxed over a shape's forwards, every shape read at `finish`, only the shapes that
    /// overflowed grown, and no deferral once closed.
    #[test]
    fn finish_reads_every_shape_and_grows_what_overflowed() {
        let ordinal = 1000;
        let (fits, over) = ((ordinal, 10, 64, 256), (ordinal, 20, 64, 256));
        let kept = PoolSizes {
            cap: 100,
            spill_cap: 8,
        };
        keep_sizes(fits, kept, 40);
        keep_sizes(over, kept, 80);
        // Control words as the kernels leave them (longer than the three read).
        let words =
            |st: i64, nnz: i32, spill: i32| Tensor::from_slice(&[st as i32, nnz, spill, 7, 7]);
        let begin = || {
            open(ordinal).unwrap();
            DeferredChecks { ordinal }
        };

        let checks = begin();
        assert!(defers(fits) && defers(over));
        record(fits, &words(0, 90, 2)).unwrap();
        record(over, &words(0, 90, 2)).unwrap();
        assert_eq!(checks.finish().unwrap(), Settled::default());
        assert!(!defers(over), "closed checks still defer");

        let checks = begin();
        record(fits, &words(0, 90, 2)).unwrap();
        record(over, &words(0, 90, 2)).unwrap();
        record(over, &words(ST_NNZ_OVER, 500, 3)).unwrap();
        record(over, &words(0, 120, 1)).unwrap();
        let settled = checks.finish().unwrap();
        assert_eq!(
            settled,
            Settled {
                overflowed: true,
                grown: 1
            }
        );
        assert_eq!(known_sizes(fits), Some(kept));
        // Grown from the largest count any of its forwards asked for, not the last one's.
        let want = kept.grown(ST_NNZ_OVER, 500, 3, 80);
        assert_eq!(known_sizes(over), Some(want));
        assert_ne!(want, kept.grown(ST_NNZ_OVER, 120, 1, 80));

        // The next step's checks start from zero in the same accumulators: a fold into the
        // accumulator itself (what a replayed CUDA graph does, without calling `record`) is
        // what `finish` reads.
        let acc = registry().deferred[&ordinal].per_shape[&fits].shallow_clone();
        let generation = sizes_generation();
        let checks = begin();
        assert_eq!(Vec::<i32>::try_from(&acc).unwrap(), vec![0, 0, 0]);
        acc.narrow(0, 0, 3)
            .copy_(&Tensor::from_slice(&[ST_NNZ_OVER as i32, 700, 0]));
        let settled = checks.finish().unwrap();
        assert!(settled.overflowed && settled.grown == 1);
        assert!(known_sizes(fits).unwrap().cap >= 700);
        assert!(
            sizes_generation() > generation,
            "growth leaves the generation unchanged"
        );
    }
}
