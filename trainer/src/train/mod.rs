//! Training: the [`Trainer`] (set-up, one optimizer step, the run), its log (progress
//! line, `metrics.jsonl`, TensorBoard), and the graceful stop on signals.
pub mod log;
pub mod stop;
pub mod trainer;

pub use trainer::{pick_device, train, RunOptions, Trainer};
