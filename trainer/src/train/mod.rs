//! Training: the [`Trainer`] (set-up, one optimizer step, the run), its log (progress
//! line, `metrics.jsonl`, TensorBoard), the graceful stop on signals, out-of-memory steps by
//! name, and `--profile-steps`.
pub mod log;
pub mod micro_batch;
pub mod oom;
pub mod profile;
pub mod stop;
pub mod trainer;

pub use trainer::{pick_device, train, RunOptions, Trainer};
