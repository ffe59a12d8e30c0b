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

use crate::error::LaunchError;

/// Runs `$body` with `$T` bound to the Rust element type of `$kind`, or evaluates `$other`.
macro_rules! with_mpi_type {
    ($kind:expr, $T:ident => $body:expr, $other:expr) => {
        match $kind {
            Kind::Float => {
                type $T = f32;
                $body
            }
            Kind::Double => {
                type $T = f64;
                $body
            }
            Kind::Int64 => {
                type $T = i64;
                $body
            }
            Kind::Int => {
                type $T = i32;
                $body
            }
            Kind::Uint8 => {
                type $T = u8;
                $body
            }
            Kind::Int8 => {
                type $T = i8;
                $body
            }
            _ => $other,
        }
    };
}

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

    fn check(&self, op: &'static str, tensor: &Tensor) -> Result<(), LaunchError> {
        if tensor.device() != Device::Cpu {
            return Err(LaunchError::WrongDevice {
                rank: self.world_rank,
                op,
                got: tensor.device(),
                expected: "Cpu (MPI); this group has no NCCL communicator".into(),
            });
        }
        debug_assert!(tensor.is_contiguous());
        Ok(())
    }

    fn unsupported(&self, op: &'static str, tensor: &Tensor) -> LaunchError {
        LaunchError::UnsupportedKind {
            rank: self.world_rank,
            op,
            kind: tensor.kind(),
            device: tensor.device(),
        }
    }

    /// In-place sum of a contiguous CPU tensor over the group.
    pub(crate) fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), LaunchError> {
        const OP: &str = "all_reduce_sum";
        self.check(OP, tensor)?;
        if tensor.numel() == 0 {
            return Ok(());
        }
        if staged(tensor.kind()) {
            let mut wide = tensor.to_kind(Kind::Float);
            self.all_reduce_sum(&mut wide)?;
            tensor.copy_(&wide);
            return Ok(());
        }
        let send = tensor.copy();
        with_mpi_type!(
            tensor.kind(),
            T => {
                self.comm.all_reduce_into(
                    host::<T>(&send),
                    host_mut::<T>(tensor),
                    SystemOperation::sum(),
                );
                Ok(())
            },
            Err(self.unsupported(OP, tensor))
        )
    }

    /// `output` (`numel = n`) gets block `rank` of the group-wide sum of `input`
    /// (`numel = n * size`), through `MPI_Reduce_scatter_block`.
    pub(crate) fn reduce_scatter_sum(
        &self,
        input: &Tensor,
        output: &mut Tensor,
    ) -> Result<(), LaunchError> {
        const OP: &str = "reduce_scatter_sum";
        self.check(OP, input)?;
        self.check(OP, output)?;
        if output.numel() == 0 {
            return Ok(());
        }
        if staged(input.kind()) {
            let mut wide = output.to_kind(Kind::Float);
            self.reduce_scatter_sum(&input.to_kind(Kind::Float), &mut wide)?;
            output.copy_(&wide);
            return Ok(());
        }
        with_mpi_type!(
            input.kind(),
            T => {
                self.comm.reduce_scatter_block_into(
                    host::<T>(input),
                    host_mut::<T>(output),
                    SystemOperation::sum(),
                );
                Ok(())
            },
            Err(self.unsupported(OP, input))
        )
    }

    /// `output` (`numel = n * size`) gets every rank's `input` (`numel = n`) in rank order.
    pub(crate) fn all_gather(
        &self,
        input: &Tensor,
        output: &mut Tensor,
    ) -> Result<(), LaunchError> {
        const OP: &str = "all_gather";
        self.check(OP, input)?;
        self.check(OP, output)?;
        if input.numel() == 0 {
            return Ok(());
        }
        if staged(input.kind()) {
            let mut wide = output.to_kind(Kind::Float);
            self.all_gather(&input.to_kind(Kind::Float), &mut wide)?;
            output.copy_(&wide);
            return Ok(());
        }
        with_mpi_type!(
            input.kind(),
            T => {
                self.comm.all_gather_into(host::<T>(input), host_mut::<T>(output));
                Ok(())
            },
            Err(self.unsupported(OP, input))
        )
    }

    /// Overwrites `tensor` with group rank `root`'s copy.
    pub(crate) fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), LaunchError> {
        const OP: &str = "broadcast";
        self.check(OP, tensor)?;
        if tensor.numel() == 0 {
            return Ok(());
        }
        if staged(tensor.kind()) {
            let mut wide = tensor.to_kind(Kind::Float);
            self.broadcast(&mut wide, root)?;
            tensor.copy_(&wide);
            return Ok(());
        }
        with_mpi_type!(
            tensor.kind(),
            T => {
                self.comm
                    .process_at_rank(root as i32)
                    .broadcast_into(host_mut::<T>(tensor));
                Ok(())
            },
            Err(self.unsupported(OP, tensor))
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
