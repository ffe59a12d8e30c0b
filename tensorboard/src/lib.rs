//! TensorBoard event-file writer.
