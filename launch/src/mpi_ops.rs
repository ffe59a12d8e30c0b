//! Collectives over MPI on contiguous CPU tensors, so multi-rank runs are testable without GPUs.
//!
//! Element types MPI moves natively: f32, f64, i64, i32, u8, i8. bf16 and f16 tensors are
//! staged through an f32 copy (exact for broadcast and gather, and a more accurate sum).

use std::rc::Rc;

use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};
use tch::{Device, Kind, Tensor};

use crate::element::{check_device, unsupported, with_element_type, InPlace, Transfer};
use crate::error::LaunchError;

/// The elements of a contiguous, non-empty CPU tensor whose kind matches `T`.
fn host<T>(tensor: &Tensor) -> &[T] {
    debug_assert!(tensor.is_contiguous() && tensor.numel() > 0);
    // Safety: the caller checked device, contiguity, kind and non-emptiness; the slice
    // borrows `tensor`, which keeps the storage alive.
    unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const T, tensor.numel()) }
}

/// Mutable form of [`host`].
fn host_mut<T>(tensor: &mut Tensor) -> &mut [T] {
    debug_assert!(tensor.is_contiguous() && tensor.numel() > 0);
    // Safety: as in `host`; the exclusive borrow of `tensor` stands for the storage's.
    unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut T, tensor.numel()) }
}

/// True for kinds moved through an f32 copy.
fn staged(kind: Kind) -> bool {
    matches!(kind, Kind::BFloat16 | Kind::Half)
}

/// An MPI communicator for one group of ranks. Holds the MPI universe alive: MPI is finalised
/// only when the last group (world or split) is dropped, after its communicator is freed.
pub(crate) struct MpiGroup {
    comm: SimpleCommunicator,
    world_rank: usize,
    _universe: Rc<Universe>,
}

impl MpiGroup {
    pub(crate) fn new(comm: SimpleCommunicator, world_rank: usize, universe: Rc<Universe>) -> Self {
        Self {
            comm,
            world_rank,
            _universe: universe,
        }
    }

    /// The MPI communicator (for splitting and for the NCCL id broadcast).
    pub(crate) fn comm(&self) -> &SimpleCommunicator {
        &self.comm
    }

    /// A group over `comm`, sharing this group's hold on the universe.
    pub(crate) fn sibling(&self, comm: SimpleCommunicator) -> Self {
        Self::new(comm, self.world_rank, self._universe.clone())
    }

    fn check(&self, op: &'static str, tensors: &[&Tensor]) -> Result<(), LaunchError> {
        check_device(self.world_rank, op, tensors, Device::Cpu, || {
            "Cpu (MPI); this group has no NCCL communicator".into()
        })
    }

    /// Runs `collective` on a contiguous CPU tensor: `MPI_Allreduce` or `MPI_Bcast`.
    pub(crate) fn in_place(
        &self,
        collective: InPlace,
        tensor: &mut Tensor,
    ) -> Result<(), LaunchError> {
        let op = collective.name();
        self.check(op, &[tensor])?;
        if tensor.numel() == 0 {
            return Ok(());
        }
        if staged(tensor.kind()) {
            let mut wide = tensor.to_kind(Kind::Float);
            self.in_place(collective, &mut wide)?;
            tensor.copy_(&wide);
            return Ok(());
        }
        with_element_type!(
            tensor.kind(),
            T => {
                match collective {
                    InPlace::AllReduceSum => {
                        let send = tensor.copy();
                        self.comm.all_reduce_into(
                            host::<T>(&send),
                            host_mut::<T>(tensor),
                            SystemOperation::sum(),
                        );
                    }
                    InPlace::Broadcast { root } => self
                        .comm
                        .process_at_rank(root as i32)
                        .broadcast_into(host_mut::<T>(tensor)),
                }
                Ok(())
            },
            Err(unsupported(self.world_rank, op, tensor))
        )
    }

    /// Runs `collective` from `input` into `output` (contiguous CPU tensors of one kind):
    /// `MPI_Reduce_scatter_block` or `MPI_Allgather`.
    pub(crate) fn transfer(
        &self,
        collective: Transfer,
        input: &Tensor,
        output: &mut Tensor,
    ) -> Result<(), LaunchError> {
        let op = collective.name();
        self.check(op, &[input, output])?;
        if input.numel() == 0 || output.numel() == 0 {
            return Ok(());
        }
        if staged(input.kind()) {
            let mut wide = output.to_kind(Kind::Float);
            self.transfer(collective, &input.to_kind(Kind::Float), &mut wide)?;
            output.copy_(&wide);
            return Ok(());
        }
        with_element_type!(
            input.kind(),
            T => {
                let (send, recv) = (host::<T>(input), host_mut::<T>(output));
                match collective {
                    Transfer::ReduceScatterSum => {
                        self.comm.reduce_scatter_block_into(send, recv, SystemOperation::sum())
                    }
                    Transfer::AllGather => self.comm.all_gather_into(send, recv),
                }
                Ok(())
            },
            Err(unsupported(self.world_rank, op, input))
        )
    }

    /// Blocks until every rank of the group got here.
    pub(crate) fn barrier(&self) {
        self.comm.barrier();
    }

    /// Group-wide reduction of one host value.
    pub(crate) fn all_reduce_scalar<T: Equivalence + Default>(
        &self,
        value: T,
        op: SystemOperation,
    ) -> T {
        let mut out = T::default();
        self.comm.all_reduce_into(&value, &mut out, op);
        out
    }

    /// Every rank's `value`, in rank order.
    pub(crate) fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        let mut out = vec![0u64; self.comm.size() as usize];
        self.comm.all_gather_into(&value, &mut out[..]);
        out
    }
}
