//! The process group of sparse-train: rank, world size, local rank and device from MPI
//! (`mpirun -n 8 sparse-train ...`) or a single process (plain `sparse-train ...`, no MPI
//! initialised at all); the collectives training uses over tch tensors (NCCL for CUDA
//! tensors, MPI for CPU tensors, local for one process); and the fail-fast exits that make
//! every rank stop with a message naming the failing rank instead of hanging.
//!
//! How the trainer uses it:
//!
//! ```no_run
//! use sparse_launch::{fail_fast, stable_hash, World, WorldOptions};
//! use tch::{Kind, Tensor};
//!
//! // Start-up: any error on any rank aborts the whole job, naming the rank.
//! let world = fail_fast(World::init(&WorldOptions::default()));
//! let device = world.device(); // cuda:{local_rank}, or Cpu
//! let dp = world.collective();
//! world.fail_fast(dp.check_same_on_all_ranks("config", stable_hash(b"config yaml bytes")));
//!
//! // Same initial weights everywhere.
//! let mut weight = Tensor::randn([1024, 256], (Kind::Float, device));
//! world.fail_fast(dp.broadcast(&mut weight, 0));
//!
//! // Each step: sum gradients (divide by world.size() for the mean), in flat buckets.
//! let mut grads = vec![weight.zeros_like()];
//! world.fail_fast(dp.all_reduce_sum_many(&mut grads));
//!
//! // ZeRO-1: each rank owns one 1/size block of the flat gradient and optimizer state.
//! let flat_grad = Tensor::zeros([4 * 1024], (Kind::Float, device));
//! let mut grad_shard = Tensor::zeros([4 * 1024 / world.size() as i64], (Kind::Float, device));
//! world.fail_fast(dp.reduce_scatter_sum(&flat_grad, &mut grad_shard));
//! // ... AdamW on this rank's block of the parameters, then share the updated blocks:
//! let param_shard = grad_shard.zeros_like();
//! let mut flat_params = flat_grad.zeros_like();
//! world.fail_fast(dp.all_gather(&param_shard, &mut flat_params));
//!
//! // Stop together when any rank got SIGTERM/SIGUSR1.
//! let got_signal = false;
//! if dp.any_rank_flag(got_signal) { /* checkpoint, then leave the loop */ }
//!
//! world.finish();
//! ```

mod collective;
mod element;
mod error;
mod mpi_ops;
mod nccl;
mod world;

pub use collective::{Collective, DEFAULT_BUCKET_BYTES};
pub use error::LaunchError;
pub use world::{abort_all, fail_fast, Backend, World, WorldOptions};

/// A hash of `bytes` that is the same in every process and build (64-bit FNV-1a), for
/// [`Collective::check_same_on_all_ranks`]: hash the config file's bytes, the data manifest,
/// the binary's version string.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    fn single() -> Collective {
        Collective::single(64)
    }

    #[test]
    fn stable_hash_matches_fnv1a_reference_values() {
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(stable_hash(b"lr: 3e-4"), stable_hash(b"lr: 3e-3"));
    }

    #[test]
    fn init_without_launcher_is_a_single_process_without_mpi() {
        let world = World::init(&WorldOptions {
            cpu_only: true,
            ..WorldOptions::default()
        })
        .unwrap();
        assert_eq!((world.rank(), world.size(), world.local_rank()), (0, 1, 0));
        assert_eq!(world.local_size(), 1);
        assert!(world.is_main());
        assert_eq!(world.device(), Device::Cpu);
        assert_eq!(world.backend(), Backend::Single);
        assert!(!world.collective().has_nccl());
        assert!(!mpi::is_initialized());
        world.finish();
    }

    #[test]
    fn single_process_in_place_ops_leave_tensors_unchanged() {
        let c = single();
        let mut t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        c.all_reduce_sum(&mut t).unwrap();
        c.broadcast(&mut t, 0).unwrap();
        let mut many = vec![t.copy(), Tensor::from_slice(&[7i64, 8])];
        c.all_reduce_sum_many(&mut many).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [1.0, 2.0, 3.0]);
        assert_eq!(Vec::<i64>::try_from(&many[1]).unwrap(), [7, 8]);
    }

    #[test]
    fn single_process_reduce_scatter_and_all_gather_copy() {
        let c = single();
        let input = Tensor::arange(6, (Kind::Float, Device::Cpu)).reshape([2, 3]);
        let mut out = Tensor::zeros([6], (Kind::Float, Device::Cpu));
        c.reduce_scatter_sum(&input, &mut out).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&out).unwrap(),
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        );
        let mut gathered = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
        c.all_gather(&out, &mut gathered).unwrap();
        assert!(gathered.reshape([-1]).equal(&out));
    }

    #[test]
    fn shape_mismatch_is_an_error_naming_the_rank() {
        let c = single();
        let input = Tensor::zeros([6], (Kind::Float, Device::Cpu));
        let mut out = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let err = c.reduce_scatter_sum(&input, &mut out).unwrap_err();
        assert!(
            err.to_string().starts_with("rank 0: reduce_scatter_sum:"),
            "{err}"
        );
        let mut wrong_kind = Tensor::zeros([6], (Kind::Double, Device::Cpu));
        assert!(c.all_gather(&input, &mut wrong_kind).is_err());
        let mut t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let err = c.broadcast(&mut t, 1).unwrap_err();
        assert!(err.to_string().contains("root 1"), "{err}");
    }

    #[test]
    fn single_process_scalars_flags_and_checks_are_local() {
        let c = single();
        assert_eq!(c.all_reduce_sum_f64(2.5), 2.5);
        assert_eq!(c.all_reduce_max_f64(-1.0), -1.0);
        assert!(c.any_rank_flag(true));
        assert!(!c.any_rank_flag(false));
        c.barrier();
        c.check_same_on_all_ranks("config", 42).unwrap();
        let sub = c.split(3, 0).unwrap();
        assert_eq!((sub.rank(), sub.size()), (0, 1));
        assert_eq!(sub.bucket_bytes(), 64);
    }

    #[test]
    fn not_same_on_all_ranks_message_names_the_differing_ranks() {
        let err = LaunchError::NotSameOnAllRanks {
            rank: 2,
            label: "config".into(),
            differing: vec![1, 3],
            hashes: vec![5, 6, 5, 7],
        };
        let msg = err.to_string();
        assert!(msg.starts_with("rank 2: config differs"), "{msg}");
        assert!(msg.contains("ranks [1, 3] disagree with rank 0"), "{msg}");
    }
}
