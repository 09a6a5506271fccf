//! Per-model schedulers: a dynamic batcher that merges concurrent embed/classify texts into one
//! session run (grouped by length so padding does not eat the gain), and a continuous batcher
//! that decodes many generations together.

pub mod admission;
pub mod batch_state;
pub mod batcher;
pub mod continuous;
pub mod faults;

pub use batch_state::{BatchLimits, BatchState};
pub use batcher::Batcher;
pub use faults::FaultTracker;
