//! Checkpoints from the trainer's side: what one holds and the exact restore of a run
//! ([`state`]), the tensor-parallel gather and restore ([`parallel`]), the background writer
//! ([`saver`]) and loading a trained model for inference ([`load`]). The on-disk format is
//! the `sparse-checkpoints` crate's.
pub mod load;
pub mod parallel;
pub mod saver;
pub mod state;

pub use state::{snapshot, TrainerState};
