//! CUDA graphs (C++ side: `bridge/cuda_graph.cpp`, over libtorch's `at::cuda::CUDAGraph`):
//! [`CudaGraph::capture`] runs a step a few times eagerly on the graph's own stream, then
//! records one run of it; [`CudaGraph::replay`] launches the recorded kernels again, with
//! no host work per kernel. Everything the step reads or writes must stay at the same
//! addresses between replays (static input and output buffers, updated in place); tensors
//! the step allocates come from the graph's private pool and live as long as the graph.
use std::ffi::{c_char, c_int, c_void};

use tch::Device;

use super::{read_err, ERR_LEN};

extern "C" {
    fn sparse_cuda_graph_new(
        device: i32,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn sparse_cuda_graph_enter(g: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn sparse_cuda_graph_exit(g: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn sparse_cuda_graph_capture_begin(g: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn sparse_cuda_graph_capture_end(g: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn sparse_cuda_graph_replay(g: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn sparse_cuda_graph_free(g: *mut c_void);
}

/// A failed graph operation, with libtorch's or the step's message.
#[derive(Debug, thiserror::Error)]
#[error("CUDA graph: {0}")]
pub struct GraphError(pub String);

type Entry = unsafe extern "C" fn(*mut c_void, *mut c_char, usize) -> c_int;

/// One captured step on one device.
pub struct CudaGraph {
    raw: *mut c_void,
}

impl CudaGraph {
    /// Runs `warmup` once, then records one run of `step`, both on the graph's stream (the
    /// warm-up lets libraries set up their handles and workspaces on that stream, and loads
    /// kernels, before the capture: it should run the step at least once and may undo what
    /// the step changed; the recording itself executes nothing). An error of either ends the
    /// capture and comes back as the error.
    pub fn capture<E: std::fmt::Display>(
        device: Device,
        warmup: impl FnOnce() -> Result<(), E>,
        step: impl FnOnce() -> Result<(), E>,
    ) -> Result<CudaGraph, GraphError> {
        let Device::Cuda(ordinal) = device else {
            return Err(GraphError(format!("{device:?} is not a CUDA device")));
        };
        let mut raw = std::ptr::null_mut();
        let mut err = [0 as c_char; ERR_LEN];
        // SAFETY: the C++ side catches every exception and fills `err` on failure.
        if unsafe { sparse_cuda_graph_new(ordinal as i32, &mut raw, err.as_mut_ptr(), ERR_LEN) }
            != 0
        {
            return Err(GraphError(read_err(&err)));
        }
        let graph = CudaGraph { raw };
        graph.call(sparse_cuda_graph_enter)?;
        let recorded = (|| {
            warmup().map_err(|e| GraphError(format!("warm-up: {e}")))?;
            graph.call(sparse_cuda_graph_capture_begin)?;
            let body = step().map_err(|e| GraphError(format!("captured step: {e}")));
            // The capture must end either way (the stream stays in capture mode otherwise).
            let end = graph.call(sparse_cuda_graph_capture_end);
            body.and(end)
        })();
        let exit = graph.call(sparse_cuda_graph_exit);
        recorded.and(exit)?;
        Ok(graph)
    }

    /// Launches the recorded step on the device's current stream (no host synchronisation).
    pub fn replay(&self) -> Result<(), GraphError> {
        self.call(sparse_cuda_graph_replay)
    }

    fn call(&self, entry: Entry) -> Result<(), GraphError> {
        let mut err = [0 as c_char; ERR_LEN];
        // SAFETY: `raw` is a live graph made by `sparse_cuda_graph_new`; every entry catches
        // its exceptions and fills `err` on failure.
        match unsafe { entry(self.raw, err.as_mut_ptr(), ERR_LEN) } {
            0 => Ok(()),
            _ => Err(GraphError(read_err(&err))),
        }
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `sparse_cuda_graph_new` and is freed once, here.
        unsafe { sparse_cuda_graph_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_off_cuda_is_a_named_error() {
        let ok = || Ok::<(), String>(());
        let e = CudaGraph::capture(Device::Cpu, ok, ok).err().unwrap();
        assert!(e.to_string().contains("not a CUDA device"), "{e}");
    }
}
