//! Each loaded version's engine: the dynamic batcher that merges concurrent embed/classify texts
//! into one encoder run (grouped by length so padding does not eat the gain), or the continuous
//! scheduler that decodes many generations together over one of the decoder families.

pub mod admission;
pub mod batch_state;
pub mod batcher;
pub mod continuous;
pub mod faults;
pub mod lanes;

use std::sync::Arc;
use std::time::Duration;

pub use batch_state::{BatchLimits, BatchState};
pub use batcher::Batcher;
use batcher::BatcherSettings;
use continuous::{ContinuousLimits, ContinuousScheduler, KvBudget, SchedulerSettings, kv_budget};
pub use faults::FaultTracker;

use crate::config::Config;
use crate::kinds::Family;
use crate::runtime::SessionPool;
use crate::runtime::batch_size::BestBatch;
use crate::runtime::bindings::Bindings;
use crate::runtime::decoder::seq2seq::Seq2SeqDecoder;
use crate::runtime::decoder::{
    self, Carry, KvCacheDecoder, RecomputeDecoder, RecurrentDecoder, SharedCacheDecoder,
};
use crate::runtime::step::{self, StepDecoder};
use crate::telemetry::metrics::ModelLabels;

/// What serves a loaded version's requests.
pub enum Engine {
    /// Embed and classify over an encoder.
    Batcher(Batcher),
    /// Generate over a decoder family.
    Generator(ContinuousScheduler),
}

impl Engine {
    pub fn batcher(&self) -> Option<&Batcher> {
        match self {
            Engine::Batcher(batcher) => Some(batcher),
            Engine::Generator(_) => None,
        }
    }

    pub fn generator(&self) -> Option<&ContinuousScheduler> {
        match self {
            Engine::Generator(scheduler) => Some(scheduler),
            Engine::Batcher(_) => None,
        }
    }

    /// Work waiting for this version: texts in the batcher's queue, or sequences in the
    /// scheduler's.
    pub fn waiting(&self) -> usize {
        match self {
            Engine::Batcher(batcher) => batcher.waiting(),
            Engine::Generator(scheduler) => scheduler.waiting(),
        }
    }
}

/// The graphs a version's engine runs, as the loader prepared them.
pub struct EngineGraphs {
    pub family: Family,
    /// The graph every request runs: the encoder, the decoder, or a seq2seq model's step graph.
    pub pool: Arc<SessionPool>,
    pub bindings: Arc<Bindings>,
    pub pad_id: i64,
    /// An encoder's batch limits with the best rate per row on this host, when measured.
    pub best_batch: Option<BestBatch>,
    /// The encoder-decoder, for that family.
    pub seq2seq: Option<Seq2SeqDecoder>,
}

/// Starts the engine `graphs.family` needs, on its own thread.
pub fn start(
    graphs: EngineGraphs,
    config: &Config,
    labels: &ModelLabels,
    faults: &Arc<FaultTracker>,
) -> anyhow::Result<Engine> {
    let EngineGraphs {
        family,
        pool,
        bindings,
        pad_id,
        best_batch,
        seq2seq,
    } = graphs;
    if family == Family::Encoder {
        let mut settings = batcher_settings(config);
        if let Some(best) = best_batch {
            let limits = &mut settings.limits;
            limits.max_batch_size = limits.max_batch_size.min(best.rows.max(1));
            limits.max_batch_tokens = limits.max_batch_tokens.min(best.tokens.max(1));
        }
        return Ok(Engine::Batcher(Batcher::spawn(
            pool,
            bindings,
            pad_id,
            settings,
            labels.clone(),
            Arc::clone(faults),
        )));
    }
    // A seq2seq model's target grows its step graph's self-attention cache; what the source
    // left (cross-attention) is per row and counted in the prompt's reservation.
    let bytes_per_token = match &seq2seq {
        Some(seq2seq) => {
            let (inputs, bindings) = seq2seq.step.io();
            kv_budget::bytes_per_token(inputs, bindings)
        }
        None => kv_budget::bytes_per_token(pool.inputs(), &bindings),
    };
    let settings = scheduler_settings(config, faults, bytes_per_token);
    let labels = labels.clone();
    let token = pad_id.max(0);
    let scheduler = match seq2seq {
        Some(seq2seq) => spawn_rehearsed(seq2seq, settings, labels, token)?,
        None => {
            let recurrent = family == Family::Rnn;
            let graph = decoder::step_graph(pool, bindings, recurrent, pad_id)
                .map_err(anyhow::Error::msg)?;
            match graph.carry {
                Carry::KvCache => spawn_rehearsed(KvCacheDecoder(graph), settings, labels, token)?,
                Carry::SharedKvCache => {
                    let decoder = SharedCacheDecoder::new(graph).map_err(anyhow::Error::msg)?;
                    spawn_rehearsed(decoder, settings, labels, token)?
                }
                Carry::Recurrent => {
                    spawn_rehearsed(RecurrentDecoder(graph), settings, labels, token)?
                }
                Carry::Nothing => {
                    spawn_rehearsed(RecomputeDecoder(graph), settings, labels, token)?
                }
            }
        }
    };
    Ok(Engine::Generator(scheduler))
}

/// Starts `decoder`'s scheduler once it has decoded a changing batch (`step::rehearse`).
fn spawn_rehearsed<D: StepDecoder>(
    mut decoder: D,
    settings: SchedulerSettings,
    labels: ModelLabels,
    token: i64,
) -> anyhow::Result<ContinuousScheduler> {
    step::rehearse(&mut decoder, token).map_err(|error| {
        anyhow::anyhow!(
            "rehearsing a batch (prompts of different lengths, a row joining, one leaving): {error}"
        )
    })?;
    // The rehearsal's runs left freed heap behind them, 37 MiB of it for SmolLM2-135M.
    crate::runtime::memory::give_back();
    Ok(ContinuousScheduler::spawn(decoder, settings, labels)?)
}

fn batcher_settings(config: &Config) -> BatcherSettings {
    let batching = &config.batching;
    BatcherSettings {
        limits: BatchLimits {
            max_batch_size: batching.max_batch_size.max(1),
            max_batch_tokens: batching.max_batch_tokens.max(1),
            max_padding_ratio: batching.max_padding_ratio.max(0.0),
        },
        max_wait: Duration::from_micros(batching.max_wait_micros),
        queue_capacity: batching.queue_capacity.max(1),
        max_queue_time: Duration::from_millis(batching.max_queue_time_ms),
    }
}

fn scheduler_settings(
    config: &Config,
    faults: &Arc<FaultTracker>,
    bytes_per_token: usize,
) -> SchedulerSettings {
    let generation = &config.generation;
    let kv = Arc::new(KvBudget::new(
        bytes_per_token,
        generation.max_total_tokens.max(1),
        generation.kv_cache_mib,
    ));
    SchedulerSettings {
        faults: Arc::clone(faults),
        limits: ContinuousLimits {
            max_batch_size: generation.max_batch_size.max(1),
            max_total_tokens: kv.budget_tokens,
            max_prefill_batch: generation.max_prefill_batch.max(1),
            max_decode_stall: Duration::from_millis(generation.max_decode_stall_ms),
        },
        queue_capacity: generation.queue_capacity.max(1),
        decode_cpus: config.runtime.decode_cpus.clone(),
        max_queue_time: Duration::from_millis(generation.max_queue_time_ms),
        kv,
    }
}
