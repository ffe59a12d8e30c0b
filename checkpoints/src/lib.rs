//! Atomic, resumable training checkpoints.
