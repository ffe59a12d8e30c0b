//! [`Collective`]: the collectives training uses, over one group of ranks (the world, or a
//! tensor- or data-parallel sub-group made by [`Collective::split`]).
//!
//! A tensor's device picks the transport: CUDA tensors go through NCCL, CPU tensors through
//! MPI; host scalars and flags always go through MPI. In a single process every operation is
//! local (in-place ones are no-ops, the others copy). Every method is collective: all ranks of
//! the group must call it in the same order with tensors of the same shapes and kinds; the
//! checks here are local and cannot see another rank's arguments.

use std::fmt::Display;

use mpi::collective::SystemOperation;
use mpi::topology::{Color, Communicator};
use tch::{Device, Tensor};

use crate::element::{InPlace, Transfer};
use crate::error::LaunchError;
use crate::mpi_ops::MpiGroup;
use crate::nccl::NcclGroup;

/// Default size of one flat bucket in [`Collective::all_reduce_sum_many`]: 25 MiB, the
/// PyTorch DDP default, large enough to reach bus bandwidth and small enough to stay cheap.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// Collectives over one group of ranks. Not `Send`: MPI is initialised for the main thread
/// only, and an NCCL communicator must stay on the thread that made it.
pub struct Collective {
    rank: usize,
    size: usize,
    world_rank: usize,
    bucket_bytes: usize,
    nccl: Option<NcclGroup>,
    mpi: Option<MpiGroup>,
}

impl Collective {
    /// The group of one process that is not under MPI: every operation is local.
    pub fn single(bucket_bytes: usize) -> Self {
        Self {
            rank: 0,
            size: 1,
            world_rank: 0,
            bucket_bytes,
            nccl: None,
            mpi: None,
        }
    }

    /// A group over MPI communicator `mpi`, with an NCCL communicator when `gpu` is given.
    pub(crate) fn over_mpi(
        mpi: MpiGroup,
        gpu: Option<usize>,
        world_rank: usize,
        bucket_bytes: usize,
    ) -> Result<Self, LaunchError> {
        let nccl = gpu
            .map(|ordinal| NcclGroup::new(mpi.comm(), ordinal, world_rank))
            .transpose()?;
        Ok(Self {
            rank: mpi.comm().rank() as usize,
            size: mpi.comm().size() as usize,
            world_rank,
            bucket_bytes,
            nccl,
            mpi: Some(mpi),
        })
    }

    /// This process's rank within the group, `0..size()`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the group.
    pub fn size(&self) -> usize {
        self.size
    }

    /// True when CUDA tensors are moved by NCCL in this group.
    pub fn has_nccl(&self) -> bool {
        self.nccl.is_some()
    }

    /// Bytes per flat bucket in [`Collective::all_reduce_sum_many`].
    pub fn bucket_bytes(&self) -> usize {
        self.bucket_bytes
    }

    /// A sub-group of the ranks that pass the same `color`, ordered by `key` (ties by rank in
    /// this group). Collective over this group: every rank must call it. With NCCL, each
    /// sub-group gets its own communicator (its own unique id, broadcast within the group).
    ///
    /// Tensor parallel of width `tp` over a world of `size` ranks:
    /// `tp_group = world.split(rank / tp, rank % tp)`, `dp_group = world.split(rank % tp, rank / tp)`.
    pub fn split(&self, color: usize, key: usize) -> Result<Collective, LaunchError> {
        let Some(mpi) = &self.mpi else {
            return Ok(Collective::single(self.bucket_bytes));
        };
        let split_err = |detail: &str| LaunchError::Split {
            rank: self.world_rank,
            color,
            key,
            detail: detail.into(),
        };
        let color_i32 = i32::try_from(color).map_err(|_| split_err("color exceeds i32::MAX"))?;
        let key_i32 = i32::try_from(key).map_err(|_| split_err("key exceeds i32::MAX"))?;
        let comm = mpi
            .comm()
            .split_by_color_with_key(Color::with_value(color_i32), key_i32)
            .ok_or_else(|| split_err("MPI_Comm_split returned no communicator"))?;
        let gpu = self.nccl.as_ref().map(NcclGroup::ordinal);
        Collective::over_mpi(mpi.sibling(comm), gpu, self.world_rank, self.bucket_bytes)
    }

    fn shape_err(&self, op: &'static str, detail: impl Display) -> LaunchError {
        LaunchError::Shape {
            rank: self.world_rank,
            op,
            detail: detail.to_string(),
        }
    }

    fn cuda_without_nccl(&self, op: &'static str, device: Device) -> LaunchError {
        LaunchError::WrongDevice {
            rank: self.world_rank,
            op,
            got: device,
            expected: "Cpu (MPI); this group has no NCCL communicator".into(),
        }
    }

    /// Runs `f` on `tensor` itself when contiguous, else on a contiguous copy written back.
    fn on_contiguous(
        tensor: &mut Tensor,
        f: impl FnOnce(&mut Tensor) -> Result<(), LaunchError>,
    ) -> Result<(), LaunchError> {
        if tensor.is_contiguous() {
            return f(tensor);
        }
        let mut staging = tensor.contiguous();
        f(&mut staging)?;
        tensor.copy_(&staging);
        Ok(())
    }

    /// Sums `tensor` (any shape, contiguous or not) over the group, in place.
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), LaunchError> {
        self.in_place(InPlace::AllReduceSum, tensor)
    }

    /// Runs `collective` on the backend of `tensor`'s device; nothing to do on one rank
    /// without NCCL.
    fn in_place(&self, collective: InPlace, tensor: &mut Tensor) -> Result<(), LaunchError> {
        if self.size == 1 && self.nccl.is_none() {
            return Ok(());
        }
        let _no_grad = tch::no_grad_guard();
        Self::on_contiguous(tensor, |t| match (t.device(), &self.nccl, &self.mpi) {
            (Device::Cuda(_), Some(nccl), _) => nccl.in_place(collective, t),
            (Device::Cuda(_), None, _) => {
                Err(self.cuda_without_nccl(collective.name(), t.device()))
            }
            (_, _, Some(mpi)) => mpi.in_place(collective, t),
            (_, _, None) => Ok(()),
        })
    }

    /// Sums every tensor of `tensors` over the group, in place, packing consecutive tensors
    /// of one kind and device into flat buckets of at most [`Collective::bucket_bytes`]
    /// (a larger tensor forms its own bucket): one collective per bucket instead of one per
    /// tensor. Used for gradients: `tensors` are the parameters' `.grad()` handles.
    pub fn all_reduce_sum_many(&self, tensors: &mut [Tensor]) -> Result<(), LaunchError> {
        if self.size == 1 && self.nccl.is_none() {
            return Ok(());
        }
        let _no_grad = tch::no_grad_guard();
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let mut start = 0;
        while start < tensors.len() {
            let (kind, device) = (tensors[start].kind(), tensors[start].device());
            let mut bucket_bytes = bytes(&tensors[start]);
            let mut end = start + 1;
            while end < tensors.len()
                && tensors[end].kind() == kind
                && tensors[end].device() == device
                && bucket_bytes + bytes(&tensors[end]) <= self.bucket_bytes
            {
                bucket_bytes += bytes(&tensors[end]);
                end += 1;
            }
            self.all_reduce_bucket(&mut tensors[start..end])?;
            start = end;
        }
        Ok(())
    }

    /// One bucket: concatenate into a flat buffer, sum it, copy the slices back.
    fn all_reduce_bucket(&self, bucket: &mut [Tensor]) -> Result<(), LaunchError> {
        if let [single] = bucket {
            return self.all_reduce_sum(single);
        }
        let flat_parts: Vec<Tensor> = bucket.iter().map(|t| t.reshape([-1])).collect();
        let mut flat = Tensor::cat(&flat_parts, 0);
        self.all_reduce_sum(&mut flat)?;
        let mut offset = 0i64;
        for tensor in bucket.iter_mut() {
            let n = tensor.numel() as i64;
            tensor.copy_(&flat.narrow(0, offset, n).view_as(tensor));
            offset += n;
        }
        Ok(())
    }

    fn check_pair(
        &self,
        op: &'static str,
        small: &Tensor,
        large: &Tensor,
    ) -> Result<(), LaunchError> {
        if small.kind() != large.kind() || small.device() != large.device() {
            return Err(self.shape_err(
                op,
                format_args!(
                    "input and output differ: {:?} on {:?} vs {:?} on {:?}",
                    small.kind(),
                    small.device(),
                    large.kind(),
                    large.device()
                ),
            ));
        }
        if small.numel() * self.size != large.numel() {
            return Err(self.shape_err(
                op,
                format_args!(
                    "the full tensor has {} elements, expected {} = {} per rank x {} ranks",
                    large.numel(),
                    small.numel() * self.size,
                    small.numel(),
                    self.size
                ),
            ));
        }
        Ok(())
    }

    /// Reduce-scatter for ZeRO-style sharding: `input` (`numel = n * size`, same on every
    /// rank in shape) is summed over the group and `output` (`numel = n`) receives block
    /// `rank()` of the sum, i.e. elements `[rank * n, (rank + 1) * n)` of the flattened sum.
    /// Over MPI this is `MPI_Reduce_scatter_block`; over NCCL `ncclReduceScatter`.
    pub fn reduce_scatter_sum(
        &self,
        input: &Tensor,
        output: &mut Tensor,
    ) -> Result<(), LaunchError> {
        self.check_pair(Transfer::ReduceScatterSum.name(), output, input)?;
        self.transfer(Transfer::ReduceScatterSum, input, output)
    }

    /// All-gather: `output` (`numel = n * size`) receives every rank's `input` (`numel = n`)
    /// in rank order, i.e. elements `[r * n, (r + 1) * n)` come from rank `r`.
    pub fn all_gather(&self, input: &Tensor, output: &mut Tensor) -> Result<(), LaunchError> {
        self.check_pair(Transfer::AllGather.name(), input, output)?;
        self.transfer(Transfer::AllGather, input, output)
    }

    /// Runs `collective` on the backend of `output`'s device; on one rank without NCCL both
    /// collectives are a copy.
    fn transfer(
        &self,
        collective: Transfer,
        input: &Tensor,
        output: &mut Tensor,
    ) -> Result<(), LaunchError> {
        let _no_grad = tch::no_grad_guard();
        let input = input.contiguous();
        Self::on_contiguous(output, |out| match (out.device(), &self.nccl, &self.mpi) {
            (Device::Cuda(_), Some(nccl), _) => nccl.transfer(collective, &input, out),
            (Device::Cuda(_), None, _) if self.size > 1 => {
                Err(self.cuda_without_nccl(collective.name(), out.device()))
            }
            (Device::Cpu, _, Some(mpi)) => mpi.transfer(collective, &input, out),
            _ => {
                out.copy_(&input.view_as(out));
                Ok(())
            }
        })
    }

    /// Overwrites `tensor` on every rank with group rank `root`'s copy (initial weights,
    /// RNG seeds).
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), LaunchError> {
        const OP: &str = "broadcast";
        if root >= self.size {
            return Err(self.shape_err(
                OP,
                format_args!("root {root} is not a rank of this group of {}", self.size),
            ));
        }
        self.in_place(InPlace::Broadcast { root }, tensor)
    }

    /// Blocks until every rank of the group got here (host-side; does not wait for GPU work).
    pub fn barrier(&self) {
        if let Some(mpi) = &self.mpi {
            mpi.barrier();
        }
    }

    /// Sum of a host value over the group (token counts, loss sums for logging).
    pub fn all_reduce_sum_f64(&self, value: f64) -> f64 {
        match &self.mpi {
            Some(mpi) => mpi.all_reduce_scalar(value, SystemOperation::sum()),
            None => value,
        }
    }

    /// Maximum of a host value over the group (step times, peak memory).
    pub fn all_reduce_max_f64(&self, value: f64) -> f64 {
        match &self.mpi {
            Some(mpi) => mpi.all_reduce_scalar(value, SystemOperation::max()),
            None => value,
        }
    }

    /// True on every rank when `local` is true on any rank. Call once per step with "this
    /// rank got a stop signal" so all ranks stop (and checkpoint) at the same step.
    pub fn any_rank_flag(&self, local: bool) -> bool {
        match &self.mpi {
            Some(mpi) => mpi.all_reduce_scalar(i32::from(local), SystemOperation::max()) != 0,
            None => local,
        }
    }

    /// Errors on every rank, naming the ranks whose `hash` differs from rank 0's, when the
    /// value behind `hash` (config, data manifest, code version) is not the same everywhere.
    /// `label` names that value in the message. Hash with [`crate::stable_hash`].
    pub fn check_same_on_all_ranks(&self, label: &str, hash: u64) -> Result<(), LaunchError> {
        let Some(mpi) = &self.mpi else {
            return Ok(());
        };
        let hashes = mpi.all_gather_u64(hash);
        let differing: Vec<usize> = (0..hashes.len())
            .filter(|&r| hashes[r] != hashes[0])
            .collect();
        if differing.is_empty() {
            return Ok(());
        }
        Err(LaunchError::NotSameOnAllRanks {
            rank: self.world_rank,
            label: label.into(),
            differing,
            hashes,
        })
    }
}
