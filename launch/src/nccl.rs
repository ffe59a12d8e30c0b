//! NCCL communicator over the memory of tch CUDA tensors, through cudarc's `nccl` module.
//!
//! The 128-byte NCCL unique id is made on the group's rank 0 and broadcast over the group's
//! MPI communicator, then every rank joins with `Comm::from_rank`. Collectives run on the
//! device's legacy default stream, the stream tch enqueues its kernels on, so they are ordered
//! after the kernels that produced the tensor and before the ones that read the result: no
//! host synchronisation is needed. `Comm` is not `Send`; keep the group on the main thread.

use std::{
    ffi::{c_void, CStr},
    marker::PhantomData,
    sync::Arc,
};

use cudarc::driver::{
    sys::CUdeviceptr, CudaContext, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop,
};
use cudarc::nccl::{result::NcclError, Comm, Id, ReduceOp};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, Root};
use tch::{Device, Kind, Tensor};

use crate::element::{check_device, unsupported, with_element_type, InPlace, Transfer};
use crate::error::LaunchError;

/// Bytes in an NCCL unique id.
const NCCL_ID_BYTES: usize = 128;

/// [`with_element_type`] and the half-precision kinds NCCL also moves natively.
macro_rules! with_nccl_type {
    ($kind:expr, $T:ident => $body:expr, $other:expr) => {
        with_element_type!(
            $kind,
            $T => $body,
            $other,
            Kind::BFloat16 => half::bf16,
            Kind::Half => half::f16
        )
    };
}

/// Fails unless cudarc's `libnccl.so` can be loaded and is the very library libtorch already
/// loaded (when it loaded one): with two NCCL builds in one process, symbols of one bind to the
/// other and communicators come out corrupted ("corrupted comm object detected").
fn check_same_nccl_as_torch(world_rank: usize) -> Result<(), LaunchError> {
    const SYMBOL: &CStr = c"ncclGetVersion";
    // Safety: probing, dlsym and dladdr only look libraries and symbols up.
    unsafe {
        if !cudarc::nccl::sys::is_culib_present() {
            return Err(LaunchError::NcclLibraryMissing { rank: world_rank });
        }
        let torch = libc::dlsym(libc::RTLD_DEFAULT, SYMBOL.as_ptr());
        let ours = match cudarc::nccl::sys::culib()
            .get::<unsafe extern "C" fn()>(SYMBOL.to_bytes_with_nul())
        {
            Ok(symbol) => *symbol as *mut c_void,
            Err(_) => return Err(LaunchError::NcclLibraryMissing { rank: world_rank }),
        };
        if torch.is_null() || torch == ours {
            return Ok(());
        }
        Err(LaunchError::NcclLibraryMismatch {
            rank: world_rank,
            cudarc_lib: library_file(ours),
            torch_lib: library_file(torch),
        })
    }
}

/// The path of the shared library that holds `addr`.
fn library_file(addr: *mut c_void) -> String {
    // Safety: dladdr fills `info` or returns 0; dli_fname points into the loader's tables.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(addr, &mut info) == 0 || info.dli_fname.is_null() {
            return format!("{addr:p}");
        }
        CStr::from_ptr(info.dli_fname)
            .to_string_lossy()
            .into_owned()
    }
}

/// The NCCL result code and the library's last error message on this thread.
fn describe(e: &NcclError) -> String {
    // Safety: both calls only read NCCL's static/thread-local error strings; a null
    // communicator asks for the thread's last error.
    let last = unsafe {
        let ptr = cudarc::nccl::sys::ncclGetLastError(std::ptr::null_mut());
        if ptr.is_null() {
            String::new()
        } else {
            CStr::from_ptr(ptr).to_string_lossy().into_owned()
        }
    };
    format!("{:?} ({last})", e.0)
}

/// A borrowed view of a contiguous CUDA tensor's memory as `len` elements of `T`; owns nothing.
/// Handing out the raw pointer records no event: the collective runs on the stream tch uses.
struct TensorMem<'a, T> {
    ptr: CUdeviceptr,
    len: usize,
    stream: &'a Arc<CudaStream>,
    _borrow: PhantomData<(&'a Tensor, T)>,
}

impl<'a, T> TensorMem<'a, T> {
    /// `tensor` must be contiguous, on this group's device, with elements of type `T`
    /// (checked by the caller).
    fn new(tensor: &'a Tensor, stream: &'a Arc<CudaStream>) -> Self {
        Self {
            ptr: tensor.data_ptr() as CUdeviceptr,
            len: tensor.numel(),
            stream,
            _borrow: PhantomData,
        }
    }
}

impl<T> DeviceSlice<T> for TensorMem<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        self.stream
    }
}

impl<T> DevicePtr<T> for TensorMem<'_, T> {
    fn device_ptr<'b>(&'b self, _stream: &'b CudaStream) -> (CUdeviceptr, SyncOnDrop<'b>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

impl<T> DevicePtrMut<T> for TensorMem<'_, T> {
    fn device_ptr_mut<'b>(&'b mut self, _stream: &'b CudaStream) -> (CUdeviceptr, SyncOnDrop<'b>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

/// One NCCL communicator for one group of ranks, on GPU `ordinal`.
pub(crate) struct NcclGroup {
    comm: Comm,
    stream: Arc<CudaStream>,
    ordinal: usize,
    world_rank: usize,
}

impl NcclGroup {
    /// Joins the NCCL communicator of the ranks in `group` (collective over `group`).
    pub(crate) fn new(
        group: &SimpleCommunicator,
        ordinal: usize,
        world_rank: usize,
    ) -> Result<Self, LaunchError> {
        let nccl_err = |op: &'static str, detail: String| LaunchError::Nccl {
            rank: world_rank,
            op,
            detail,
        };
        // Safety: only probes whether the library can be loaded.
        check_same_nccl_as_torch(world_rank)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| nccl_err("init", format!("{e:?}")))?;
        let stream = ctx.default_stream();

        // Byte 0 says whether rank 0 could make an id, so no rank waits on a bad one.
        let mut message = [0i8; NCCL_ID_BYTES + 1];
        let mut root_error = None;
        if group.rank() == 0 {
            match Id::new() {
                Ok(id) => {
                    message[0] = 1;
                    message[1..].copy_from_slice(id.internal());
                }
                Err(e) => root_error = Some(describe(&e)),
            }
        }
        group.process_at_rank(0).broadcast_into(&mut message[..]);
        if let Some(detail) = root_error {
            return Err(nccl_err("unique id", detail));
        }
        if message[0] != 1 {
            return Err(nccl_err(
                "unique id",
                "the group's rank 0 could not create one".into(),
            ));
        }
        let mut internal = [0i8; NCCL_ID_BYTES];
        internal.copy_from_slice(&message[1..]);
        let id = Id::uninit(internal);
        let comm = Comm::from_rank(
            stream.clone(),
            group.rank() as usize,
            group.size() as usize,
            id,
        )
        .map_err(|e| nccl_err("init", describe(&e)))?;
        Ok(Self {
            comm,
            stream,
            ordinal,
            world_rank,
        })
    }

    /// The CUDA ordinal of the GPU this communicator runs on.
    pub(crate) fn ordinal(&self) -> usize {
        self.ordinal
    }

    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    fn check(&self, op: &'static str, tensors: &[&Tensor]) -> Result<(), LaunchError> {
        check_device(self.world_rank, op, tensors, self.device(), || {
            format!("{:?} (NCCL) or Cpu (MPI)", self.device())
        })
    }

    fn result<S>(&self, op: &'static str, r: Result<S, NcclError>) -> Result<(), LaunchError> {
        r.map(|_| ()).map_err(|e| LaunchError::Nccl {
            rank: self.world_rank,
            op,
            detail: describe(&e),
        })
    }

    /// Runs `collective` on a contiguous tensor on this group's GPU: `ncclAllReduce` or
    /// `ncclBroadcast`, in place.
    pub(crate) fn in_place(
        &self,
        collective: InPlace,
        tensor: &mut Tensor,
    ) -> Result<(), LaunchError> {
        let op = collective.name();
        self.check(op, &[tensor])?;
        with_nccl_type!(
            tensor.kind(),
            T => {
                let mut mem = TensorMem::<T>::new(tensor, &self.stream);
                let r = match collective {
                    InPlace::AllReduceSum => self.comm.all_reduce_in_place(&mut mem, &ReduceOp::Sum),
                    InPlace::Broadcast { root } => self.comm.broadcast_in_place(&mut mem, root as i32),
                };
                self.result(op, r)
            },
            Err(unsupported(self.world_rank, op, tensor))
        )
    }

    /// Runs `collective` from `input` into `output` (contiguous, of one kind, on this
    /// group's GPU): `ncclReduceScatter` or `ncclAllGather`.
    pub(crate) fn transfer(
        &self,
        collective: Transfer,
        input: &Tensor,
        output: &mut Tensor,
    ) -> Result<(), LaunchError> {
        let op = collective.name();
        self.check(op, &[input, output])?;
        with_nccl_type!(
            input.kind(),
            T => {
                let send = TensorMem::<T>::new(input, &self.stream);
                let mut recv = TensorMem::<T>::new(output, &self.stream);
                let r = match collective {
                    Transfer::ReduceScatterSum => {
                        self.comm.reduce_scatter(&send, &mut recv, &ReduceOp::Sum)
                    }
                    Transfer::AllGather => self.comm.all_gather(&send, &mut recv),
                };
                self.result(op, r)
            },
            Err(unsupported(self.world_rank, op, input))
        )
    }
}
