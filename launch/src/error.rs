//! Errors of the process group and its collectives. Every variant names the rank that saw it,
//! because in a multi-rank job the same message may come from eight processes at once.

use tch::{Device, Kind};

/// An error raised by [`crate::World`] or a [`crate::Collective`] on one rank.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// MPI could not be initialised although the launcher's environment says it should be.
    #[error("rank {rank}: MPI initialisation failed ({detail})")]
    MpiInit {
        /// World rank as read from the launcher's environment, 0 if unknown.
        rank: usize,
        /// What went wrong.
        detail: String,
    },
    /// More ranks were placed on this node than it has GPUs.
    #[error(
        "rank {rank}: local rank {local_rank} has no GPU (this node has {gpu_count}); \
         start at most {gpu_count} ranks per node"
    )]
    NotEnoughGpus {
        /// World rank.
        rank: usize,
        /// Rank within the node.
        local_rank: usize,
        /// CUDA devices visible to this process.
        gpu_count: usize,
    },
    /// `libnccl.so` could not be loaded.
    #[error(
        "rank {rank}: libnccl.so not found; put a folder holding a libnccl.so symlink to \
         libnccl.so.2 on LD_LIBRARY_PATH (see launch/README.md)"
    )]
    NcclLibraryMissing {
        /// World rank.
        rank: usize,
    },
    /// cudarc opened another NCCL library than the one libtorch already loaded; two NCCLs in
    /// one process corrupt each other's communicators.
    #[error(
        "rank {rank}: cudarc loaded NCCL from {cudarc_lib} but libtorch uses {torch_lib}; put a \
         folder holding a libnccl.so symlink to {torch_lib} first on LD_LIBRARY_PATH \
         (see launch/README.md)"
    )]
    NcclLibraryMismatch {
        /// World rank.
        rank: usize,
        /// The file cudarc's `libnccl.so` resolved to.
        cudarc_lib: String,
        /// The file libtorch's NCCL was loaded from.
        torch_lib: String,
    },
    /// An NCCL or CUDA driver call failed.
    #[error("rank {rank}: NCCL {op} failed: {detail}")]
    Nccl {
        /// World rank.
        rank: usize,
        /// The operation (`init`, `all_reduce`, ...).
        op: &'static str,
        /// The library's error.
        detail: String,
    },
    /// A tensor's element type is not supported by the backend that would move it.
    #[error("rank {rank}: {op} does not support {kind:?} tensors on {device:?}")]
    UnsupportedKind {
        /// World rank.
        rank: usize,
        /// The collective.
        op: &'static str,
        /// The tensor's element type.
        kind: Kind,
        /// The tensor's device.
        device: Device,
    },
    /// A CUDA tensor was given to a group that has no NCCL communicator (CPU world), or a
    /// tensor lives on another GPU than the group's.
    #[error("rank {rank}: {op} got a tensor on {got:?}, this group communicates on {expected}")]
    WrongDevice {
        /// World rank.
        rank: usize,
        /// The collective.
        op: &'static str,
        /// The tensor's device.
        got: Device,
        /// The devices this group can use.
        expected: String,
    },
    /// The tensors given to one collective do not fit together.
    #[error("rank {rank}: {op}: {detail}")]
    Shape {
        /// World rank.
        rank: usize,
        /// The collective.
        op: &'static str,
        /// Which sizes disagree.
        detail: String,
    },
    /// A value that must be identical on every rank (config, data, code version) differs.
    #[error(
        "rank {rank}: {label} differs across ranks: ranks {differing:?} disagree with rank 0 \
         (hashes by rank: {hashes:x?})"
    )]
    NotSameOnAllRanks {
        /// World rank (each rank reports the same list).
        rank: usize,
        /// What was compared (`config`, `data manifest`, ...).
        label: String,
        /// Ranks whose hash differs from rank 0's.
        differing: Vec<usize>,
        /// Every rank's hash, in rank order.
        hashes: Vec<u64>,
    },
    /// `split` was asked for something MPI cannot do.
    #[error("rank {rank}: split(color {color}, key {key}): {detail}")]
    Split {
        /// World rank.
        rank: usize,
        /// The colour asked for.
        color: usize,
        /// The ordering key asked for.
        key: usize,
        /// What went wrong.
        detail: String,
    },
}
