//! libtorch's profiler (Kineto), which tch does not expose (C++ side:
//! `bridge/profiler.cpp`). [`start`] records every libtorch op on every thread (with input
//! shapes) and, on CUDA, every kernel and copy; [`stop`] writes what was recorded as a Chrome
//! trace (open it in Perfetto or chrome://tracing). [`range`] marks a named region of the
//! caller's own (a step's forward, a block's FFN) that the trace shows around the ops inside.
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::{read_err, ERR_LEN};

extern "C" {
    fn sparse_profiler_start(cuda: i32, err: *mut c_char) -> i32;
    fn sparse_profiler_stop(path: *const c_char, err: *mut c_char) -> i32;
    fn sparse_profiler_range_open(name: *const c_char) -> *mut c_void;
    fn sparse_profiler_range_close(range: *mut c_void);
}

/// Why the profiler could not start or write its trace.
#[derive(Debug, Error)]
pub enum ProfilerError {
    #[error("the libtorch profiler did not start: {0}")]
    Start(String),
    #[error("the libtorch profiler could not write its trace to {path}: {message}")]
    Stop { path: PathBuf, message: String },
}

/// Starts recording: CPU ops always, CUDA kernels and copies when `cuda`.
pub fn start(cuda: bool) -> Result<(), ProfilerError> {
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: `err` holds ERR_LEN bytes; the C++ side catches every exception.
    match unsafe { sparse_profiler_start(cuda as i32, err.as_mut_ptr()) } {
        0 => Ok(()),
        _ => Err(ProfilerError::Start(read_err(&err))),
    }
}

/// Stops recording and writes the Chrome trace to `path` (JSON). On CUDA, synchronise the
/// device first so that the last kernels are in the trace.
pub fn stop(path: &Path) -> Result<(), ProfilerError> {
    let failed = |message: String| ProfilerError::Stop {
        path: path.to_path_buf(),
        message,
    };
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| failed("the path holds a NUL byte".into()))?;
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: as in `start`; `c_path` is NUL-terminated and outlives the call.
    match unsafe { sparse_profiler_stop(c_path.as_ptr(), err.as_mut_ptr()) } {
        0 => Ok(()),
        _ => Err(failed(read_err(&err))),
    }
}

/// A named region open until this value drops. Costs one check when nothing records.
#[must_use = "the range closes when this value drops"]
pub struct Range(*mut c_void);

/// Opens the region `name` on this thread (see [`Range`]).
pub fn range(name: &'static CStr) -> Range {
    // SAFETY: `name` is NUL-terminated and static; the C++ side copies it and catches every
    // exception (returning null, which closing ignores).
    Range(unsafe { sparse_profiler_range_open(name.as_ptr()) })
}

impl Drop for Range {
    fn drop(&mut self) {
        // SAFETY: the handle came from `sparse_profiler_range_open` and is closed once.
        unsafe { sparse_profiler_range_close(self.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// The trace holds the ops run while recording and the ranges around them, and nothing
    /// from before `start`.
    #[test]
    fn trace_holds_the_ranges_and_the_ops_inside_them() {
        let a = Tensor::ones([32, 32], (Kind::Float, tch::Device::Cpu));
        // Ops no other test runs, since the profiler records every thread.
        let _ = a.sinh(); // before start: not recorded
        start(false).unwrap();
        {
            let _r = range(c"test_region");
            let _ = a.cosh();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.json");
        stop(&path).unwrap();
        let trace: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let names: Vec<&str> = trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert!(names.contains(&"test_region"), "{names:?}");
        assert!(names.contains(&"aten::cosh"), "{names:?}");
        assert!(!names.contains(&"aten::sinh"), "{names:?}");
        assert!(matches!(stop(&path), Err(ProfilerError::Stop { .. })));
    }
}
