//! [`World`]: who this process is (rank, local rank, device) and the world [`Collective`];
//! plus the fail-fast exits that keep a multi-rank job from hanging when one rank fails.

use std::fmt;
use std::io::Write;
use std::rc::Rc;

use mpi::environment::Threading;
use mpi::topology::{Communicator, SimpleCommunicator};
use tch::Device;

use crate::collective::{Collective, DEFAULT_BUCKET_BYTES};
use crate::error::LaunchError;
use crate::mpi_ops::MpiGroup;

/// Environment variables set by MPI launchers (OpenMPI's mpirun, PMI/PMIx-based launchers
/// such as MPICH's hydra and Slurm's srun). Any of them present means "initialise MPI".
const MPI_LAUNCHER_VARS: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"];

/// Variables holding the world rank before MPI is up, for messages only.
const MPI_RANK_VARS: [&str; 3] = ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"];

/// How to set up the world.
#[derive(Debug, Clone)]
pub struct WorldOptions {
    /// Use the CPU even when CUDA is available (tests, debugging).
    pub cpu_only: bool,
    /// Bytes per flat bucket of [`Collective::all_reduce_sum_many`].
    pub bucket_bytes: usize,
}

impl Default for WorldOptions {
    fn default() -> Self {
        Self {
            cpu_only: false,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
        }
    }
}

/// Which transport the world's collectives use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One process, not under an MPI launcher: every collective is local.
    Single,
    /// Under MPI, on CPUs: tensors move through MPI.
    Mpi,
    /// Under MPI, one GPU per rank: CUDA tensors move through NCCL, host values through MPI.
    Nccl,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Single => "single process",
            Backend::Mpi => "MPI (CPU tensors)",
            Backend::Nccl => "MPI + NCCL",
        })
    }
}

/// This process's place in the job, its device, and the collectives over all ranks.
///
/// Under an MPI launcher, MPI is initialised for the main thread (`MPI_THREAD_FUNNELED`) and a
/// panic on any thread aborts the whole job (see [`abort_all`]). End a successful run with
/// [`World::finish`]; dropping a multi-rank `World` without it aborts the job, since MPI's
/// finalisation would otherwise wait forever for ranks stuck in a collective.
pub struct World {
    collective: Collective,
    backend: Backend,
    local_rank: usize,
    local_size: usize,
    device: Device,
    finished: bool,
}

impl World {
    /// Sets up the world: under `mpirun` (or another MPI launcher) ranks come from MPI and
    /// each rank takes GPU `cuda:{local_rank}` (CPU when CUDA is unavailable or
    /// `options.cpu_only`), with an NCCL communicator when on GPU; otherwise one process with
    /// no MPI at all, on `cuda:0` or the CPU.
    ///
    /// Collective under MPI: every rank must call it. On error MPI is left initialised so
    /// that [`fail_fast`] can abort the job; pass the result through it.
    pub fn init(options: &WorldOptions) -> Result<World, LaunchError> {
        if !launched_by_mpi() {
            return Ok(World {
                collective: Collective::single(options.bucket_bytes),
                backend: Backend::Single,
                local_rank: 0,
                local_size: 1,
                device: choose_device(options.cpu_only, 0, 0)?,
                finished: false,
            });
        }
        let (universe, _) =
            mpi::initialize_with_threading(Threading::Funneled).ok_or_else(|| {
                LaunchError::MpiInit {
                    rank: rank_from_env(),
                    detail: "MPI was already initialised in this process".into(),
                }
            })?;
        abort_job_on_panic();
        let universe = Rc::new(universe);
        let hold = universe.clone();
        let world = init_over_mpi(universe, options);
        if world.is_err() {
            // Finalising now would block in MPI_Finalize while other ranks wait for this one;
            // keep MPI up so the caller's fail_fast can abort the job.
            std::mem::forget(hold);
        }
        world
    }

    /// This process's rank, `0..size()`.
    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    /// Number of ranks in the job.
    pub fn size(&self) -> usize {
        self.collective.size()
    }

    /// Rank among the processes on this node (picks the GPU).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Number of ranks on this node.
    pub fn local_size(&self) -> usize {
        self.local_size
    }

    /// True on rank 0, the rank that logs and writes checkpoints.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// The device this rank computes on: `cuda:{local_rank}` or the CPU.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The transport in use, for the start-up log line.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The collectives over all ranks; [`Collective::split`] it for tensor/data parallel groups.
    pub fn collective(&self) -> &Collective {
        &self.collective
    }

    /// The value of `result`, or, on error, print `rank N: error` and abort every rank of the
    /// job (see [`fail_fast`]).
    pub fn fail_fast<T, E: fmt::Display>(&self, result: Result<T, E>) -> T {
        fail_fast(result)
    }

    /// Clean shutdown after a successful run: waits for this rank's GPU work, then for every
    /// rank, then releases NCCL and finalises MPI (once every split group is dropped too).
    pub fn finish(mut self) {
        if let Device::Cuda(ordinal) = self.device {
            tch::Cuda::synchronize(ordinal as i64);
        }
        self.collective.barrier();
        self.finished = true;
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if self.backend != Backend::Single && !self.finished {
            abort_all(
                1,
                "World dropped without World::finish (an error returned without fail_fast?); \
                 aborting the job so no rank waits forever",
            );
        }
    }
}

/// The MPI part of [`World::init`], after `MPI_Init`.
fn init_over_mpi(
    universe: Rc<mpi::environment::Universe>,
    options: &WorldOptions,
) -> Result<World, LaunchError> {
    let world = universe.world();
    let rank = world.rank() as usize;
    let node = world.split_shared(world.rank());
    let (local_rank, local_size) = (node.rank() as usize, node.size() as usize);
    let device = choose_device(options.cpu_only, rank, local_rank)?;
    let gpu = match device {
        Device::Cuda(ordinal) => Some(ordinal),
        _ => None,
    };
    let collective = Collective::over_mpi(
        MpiGroup::new(world, rank, universe),
        gpu,
        rank,
        options.bucket_bytes,
    )?;
    Ok(World {
        collective,
        backend: if gpu.is_some() {
            Backend::Nccl
        } else {
            Backend::Mpi
        },
        local_rank,
        local_size,
        device,
        finished: false,
    })
}

/// True when an MPI launcher started this process.
fn launched_by_mpi() -> bool {
    MPI_LAUNCHER_VARS
        .iter()
        .any(|var| std::env::var_os(var).is_some())
}

/// The world rank from the launcher's environment (before or without MPI), 0 if unknown.
fn rank_from_env() -> usize {
    MPI_RANK_VARS
        .iter()
        .find_map(|var| std::env::var(var).ok()?.parse().ok())
        .unwrap_or(0)
}

/// This process's world rank, from MPI when it is up, else from the environment.
fn current_rank() -> usize {
    if mpi::is_initialized() && !mpi::is_finalized() {
        SimpleCommunicator::world().rank() as usize
    } else {
        rank_from_env()
    }
}

/// `cuda:{local_rank}` when CUDA is usable and wanted, else the CPU. Checks CUDA through tch
/// first: cudarc panics when libcuda is missing.
fn choose_device(cpu_only: bool, rank: usize, local_rank: usize) -> Result<Device, LaunchError> {
    if cpu_only || !tch::Cuda::is_available() {
        return Ok(Device::Cpu);
    }
    let gpu_count = tch::Cuda::device_count() as usize;
    if local_rank >= gpu_count {
        return Err(LaunchError::NotEnoughGpus {
            rank,
            local_rank,
            gpu_count,
        });
    }
    Ok(Device::Cuda(local_rank))
}

/// Chains a panic hook that aborts the job after the default report, so a panicking rank
/// does not leave the others blocked in a collective.
fn abort_job_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        abort_all(101, "panicked (report above); aborting the job");
    }));
}

/// Prints `rank N: msg` to stderr and ends the whole job with exit status `code`: under MPI
/// through `MPI_Abort`, which makes `mpirun` kill every other rank; otherwise by exiting.
pub fn abort_all(code: i32, msg: &str) -> ! {
    let rank = current_rank();
    let prefix = format!("rank {rank}: ");
    let line = if msg.starts_with(&prefix) {
        msg.to_string()
    } else {
        format!("{prefix}{msg}")
    };
    let _ = std::io::stdout().flush();
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{line}");
    let _ = stderr.flush();
    drop(stderr);
    if mpi::is_initialized() && !mpi::is_finalized() {
        SimpleCommunicator::world().abort(code);
    }
    std::process::exit(code)
}

/// The value of `result`, or, on error, [`abort_all`] with status 1 and the error (with its
/// causes, for `anyhow`). Use it wherever a rank may fail while others could be waiting in a
/// collective: around [`World::init`], start-up (config, data, checkpoint) and the loop.
pub fn fail_fast<T, E: fmt::Display>(result: Result<T, E>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => abort_all(1, &format!("{e:#}")),
    }
}
