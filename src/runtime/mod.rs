//! ONNX Runtime: the shared library, sessions on worker threads, execution providers, tensors.

pub mod batch_size;
pub mod bindings;
pub mod decoder;
pub mod encoder;
pub mod library;
pub mod memory;
pub mod placement;
pub mod providers;
pub mod residency;
pub mod session;
pub mod shared_weights;
pub mod step;
pub mod warmup;

pub use session::{GraphIo, SessionPool, TensorSpec};
