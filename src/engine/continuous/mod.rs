//! Continuous batching for generation: one scheduler thread per model version runs every decode
//! step over all active sequences at once; new sequences are prefilled and join between steps,
//! finished or abandoned ones leave, and nobody waits for the longest generation to end.

pub mod kv_budget;
pub mod scheduler;
pub mod state;

pub use kv_budget::KvBudget;
pub use scheduler::{
    ContinuousScheduler, Decision, GenerationJob, SchedulerSettings, SequenceDriver, StopCause,
};
pub use state::ContinuousLimits;

#[cfg(test)]
mod tests;
