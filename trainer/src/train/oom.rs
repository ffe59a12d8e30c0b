//! Out of memory during a step, by name. libtorch reports an allocation that does not fit
//! as an error that tch turns into a panic; [`catch`] runs the step, recognises that panic
//! from its text ([`is_out_of_memory`]) and returns it as an [`OutOfMemory`] error the loop
//! passes up (no checkpoint is written after it: the step may have stopped part-way through
//! the update). Every other panic goes on unwinding unchanged.
//!
//! Under `mpirun` the job's panic hook aborts every rank before any unwinding, so the hook
//! installed here lets an out-of-memory panic inside [`catch`] pass silently (it becomes the
//! error that `fail_fast` then reports, naming the rank) and hands every other panic to the
//! hook it replaced.
//!
//! Test hook: `SPARSE_TRAIN_TEST_OOM_AT_STEP=<step>` (0-based) raises libtorch's
//! out-of-memory text in that step, after the optimizer update and before the step counts,
//! so a test can show no checkpoint of the half-updated state is written. Unset in real runs.
use crate::config::TrainConfig;
use anyhow::{bail, Result};
use sparse_kernels::torch::panic_text;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

/// The environment variable of the test hook (see the module docs).
pub const TEST_OOM_AT_STEP: &str = "SPARSE_TRAIN_TEST_OOM_AT_STEP";

/// Texts of the allocators' out-of-memory errors: libtorch's CUDA caching allocator, the CUDA
/// driver (our kernels, through cudarc), cuBLAS's workspace, and libtorch's CPU allocator.
const OUT_OF_MEMORY_TEXTS: [&str; 4] = [
    "CUDA out of memory",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "DefaultCPUAllocator: can't allocate memory",
];

/// Whether a panic's or error's text is an allocator's out-of-memory report.
pub fn is_out_of_memory(text: &str) -> bool {
    OUT_OF_MEMORY_TEXTS.iter().any(|t| text.contains(t))
}

/// A step ran out of device memory: `detail` is the allocator's report.
#[derive(Debug, thiserror::Error)]
#[error(
    "out of memory in step {step} (0-based) with train.micro_batch_size = {micro_batch_size}: \
     lower train.micro_batch_size (train.batch_size stays, more micro-batches accumulate), or \
     set train.recompute to recompute activations in the backward pass instead of keeping \
     them; no checkpoint was written from this step, `latest` names the last complete one. \
     The allocator said: {detail}"
)]
pub struct OutOfMemory {
    pub step: usize,
    pub micro_batch_size: usize,
    pub detail: String,
}

impl OutOfMemory {
    /// Step `step` of a run with `train`'s micro-batches ran out of memory.
    pub fn in_step(step: usize, train: &TrainConfig, detail: String) -> OutOfMemory {
        OutOfMemory {
            step,
            micro_batch_size: train.micro_batch_size,
            detail,
        }
    }
}

thread_local! {
    /// True while this thread runs inside [`catch`].
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Chains, once, the hook that keeps out-of-memory panics inside [`catch`] quiet (and, under
/// MPI, from aborting the job before they become an error).
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let caught = CATCHING.with(Cell::get)
                && panic_text(info.payload()).is_some_and(is_out_of_memory);
            if !caught {
                previous(info);
            }
        }));
    });
}

/// Runs `f`; an out-of-memory panic becomes `Err(detail)`, with the allocator's first line.
/// Any other panic is re-raised unchanged.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    let outer = CATCHING.with(|c| c.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    match result {
        Ok(value) => Ok(value),
        Err(payload) => match panic_text(payload.as_ref()).filter(|t| is_out_of_memory(t)) {
            Some(text) => Err(allocator_report(text)),
            None => panic::resume_unwind(payload),
        },
    }
}

/// From tch's panic text (`called Result::unwrap() on an Err value: Torch("CUDA out of
/// memory. Tried to allocate ...`), the allocator's own report, first line.
fn allocator_report(text: &str) -> String {
    let start = OUT_OF_MEMORY_TEXTS
        .iter()
        .filter_map(|t| text.find(t))
        .min()
        .unwrap_or(0);
    let report = &text[start..];
    // A line ends at a newline, or at one written as `\n` (tch's error, debug-formatted),
    // before libtorch's backtrace.
    let end = ["\n", "\\n", "Exception raised from"]
        .iter()
        .filter_map(|t| report.find(t))
        .min()
        .unwrap_or(report.len());
    let line = report[..end].trim_end();
    line.strip_suffix("\")").unwrap_or(line).to_string()
}

/// The step of the test hook, when [`TEST_OOM_AT_STEP`] is set.
pub fn test_hook_step() -> Result<Option<usize>> {
    match std::env::var(TEST_OOM_AT_STEP) {
        Err(_) => Ok(None),
        Ok(v) => match v.parse() {
            Ok(step) => Ok(Some(step)),
            Err(_) => {
                bail!("{TEST_OOM_AT_STEP}={v:?}: expected a step number (a test hook; unset it)")
            }
        },
    }
}

/// The test hook's failure, in libtorch's words, when `step` is the hook's.
pub fn inject_if_due(hook_step: Option<usize>, step: usize) {
    if hook_step == Some(step) {
        panic!(
            "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to \
             allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is \
             free ({TEST_OOM_AT_STEP}={step})\")"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libtorch's CUDA report through tch's unwrap is recognised, its report kept.
    #[test]
    fn a_libtorch_out_of_memory_panic_becomes_an_error() {
        let text = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. \
                    Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.19 GiB\nException raised from malloc\")";
        let err = catch(|| -> () { panic!("{text}") }).unwrap_err();
        assert!(
            err.starts_with("CUDA out of memory. Tried to allocate 20.00 MiB"),
            "{err}"
        );
        assert!(!err.contains("Exception raised"), "{err}");
        // As tch's error reaches the panic: debug-formatted, its newlines written as `\n`.
        let escaped = format!("{:?}", "CUDA out of memory. Tried to allocate 5.50 GiB.\nException raised from malloc\nframe #0");
        let err = catch(|| -> () { panic!("Torch({escaped})") }).unwrap_err();
        assert!(
            err.starts_with("CUDA out of memory. Tried to allocate 5.50 GiB."),
            "{err}"
        );
        assert!(!err.contains("frame") && !err.contains("\\n"), "{err}");
        assert!(is_out_of_memory(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        ));
        assert!(!is_out_of_memory(
            "shape '[2, 3]' is invalid for input of size 5"
        ));
        let named = OutOfMemory {
            step: 3,
            micro_batch_size: 8,
            detail: err,
        }
        .to_string();
        for want in ["train.micro_batch_size = 8", "train.recompute", "step 3"] {
            assert!(named.contains(want), "{named}");
        }
    }

    /// Any other panic leaves `catch` as it was raised (same payload), and a value passes.
    #[test]
    fn other_panics_are_re_raised_unchanged() {
        let payload = panic::catch_unwind(|| {
            let _ = catch(|| -> () { panic!("index 7 out of range for a dimension of size 4") });
        })
        .unwrap_err();
        assert_eq!(
            panic_text(payload.as_ref()),
            Some("index 7 out of range for a dimension of size 4")
        );
        assert_eq!(catch(|| 5), Ok(5));
    }

    /// The test hook raises the text `catch` recognises, at its step only.
    #[test]
    fn the_test_hook_raises_an_out_of_memory_at_its_step() {
        assert_eq!(catch(|| inject_if_due(Some(2), 1)), Ok(()));
        let err = catch(|| inject_if_due(Some(2), 2)).unwrap_err();
        assert!(err.starts_with("CUDA out of memory"), "{err}");
    }
}
