//! The batch size an encoder runs best at on this host, measured at load time. Batching pays
//! only while a bigger run keeps more of the cores busy per row; past that, it adds latency and
//! padding for nothing, and on small or memory-bound graphs the rate per row even falls (the
//! benchmark measured tiny-encoder's sorted batches of 32 at half its one-text-per-run rate).
//! Where that point lies depends on the model, the host and the provider, so it is measured
//! rather than configured.

use std::time::{Duration, Instant};

use ort::session::Session;

use super::bindings::Bindings;
use super::encoder::{self, Embedding, EncoderRow, Pooling};

/// The largest batch tried; `batching.max_batch_size` caps what the batcher forms in any case.
pub const LARGEST_TRIED: usize = 64;
/// Tokens per row of the two measurements: a sentence, and a paragraph. Attention's cost grows
/// with the square of the length, so long rows gain less from batching than short ones, and
/// one size cannot suit both.
pub const SHORT_ROW: usize = 32;
pub const LONG_ROW: usize = 128;
/// A bigger batch must beat the best smaller one by this much to be chosen. Small, because a
/// bigger limit costs a lone request nothing (it runs alone at once) and under load fewer,
/// larger runs also save the per-run hand-offs the timing does not see.
const GAIN_NEEDED: f64 = 1.01;
/// Measuring stops once a run takes this long: every batch past it costs seconds of load time.
const SLOWEST_RUN: Duration = Duration::from_millis(400);

/// The batch limits an encoder runs best at here.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BestBatch {
    /// Rows per run, from short rows.
    pub rows: usize,
    /// Padded tokens per run: the larger of what the best short and the best long batch hold.
    pub tokens: usize,
}

/// Times both row lengths (cut to `max_length`) and returns the limits, with what was timed.
pub fn best_batch(
    session: &mut Session,
    bindings: &Bindings,
    pad_id: i64,
    max_length: usize,
) -> ort::Result<(BestBatch, String)> {
    let short = SHORT_ROW.min(max_length).max(1);
    let long = LONG_ROW.min(max_length).max(1);
    let short_profile = measure(session, bindings, pad_id, short)?;
    let long_profile = measure(session, bindings, pad_id, long)?;
    // The padded tokens the best batch of either length needs: short rows keep gaining up to
    // far more tokens per run than long ones (measured on all-MiniLM-L6-v2: 64 rows of 32
    // against 4 of 128), and a long batch that the larger budget lets grow past its best
    // loses little rate, only latency.
    let best = BestBatch {
        rows: short_profile.best,
        tokens: (short_profile.best * short).max(long_profile.best * long),
    };
    let timed = format!(
        "rows/s at {short} tokens: {}; at {long} tokens: {}",
        short_profile.describe(),
        long_profile.describe()
    );
    Ok((best, timed))
}

/// What one measurement found: the chosen size and the rows per second at each size tried.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchProfile {
    pub best: usize,
    pub rows_per_second: Vec<(usize, f64)>,
}

impl BatchProfile {
    fn describe(&self) -> String {
        self.rows_per_second
            .iter()
            .map(|(size, rate)| format!("{size}: {rate:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Runs batches of 1, 2, 4 ... [`LARGEST_TRIED`] rows of `row_tokens` tokens (the fastest of
/// three runs each) and picks the smallest size within reach of the best rate.
pub fn measure(
    session: &mut Session,
    bindings: &Bindings,
    pad_id: i64,
    row_tokens: usize,
) -> ort::Result<BatchProfile> {
    // Every output a request may read, so the runs cost what served ones do. The token's value
    // does not change the work.
    let embedding = if bindings.hidden_states.is_some() {
        Some(Embedding::Pool(Pooling::Mean))
    } else if bindings.pooled_output.is_some() {
        Some(Embedding::Pooled)
    } else {
        None
    };
    let row = EncoderRow {
        ids: vec![pad_id; row_tokens],
        embedding,
        logits: bindings.logits.is_some(),
    };
    let mut rows_per_second = Vec::new();
    let mut size = 1;
    while size <= LARGEST_TRIED {
        let rows = vec![row.clone(); size];
        let mut fastest = Duration::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            encoder::run(session, bindings, pad_id, &rows)?;
            fastest = fastest.min(started.elapsed());
        }
        rows_per_second.push((size, size as f64 / fastest.as_secs_f64().max(1e-9)));
        if fastest > SLOWEST_RUN {
            break;
        }
        size *= 2;
    }
    Ok(BatchProfile {
        best: choose(&rows_per_second),
        rows_per_second,
    })
}

/// The smallest size that no larger size beats by [`GAIN_NEEDED`].
fn choose(rows_per_second: &[(usize, f64)]) -> usize {
    let mut best = rows_per_second.first().copied().unwrap_or((1, 0.0));
    for &(size, rate) in rows_per_second {
        if rate > best.1 * GAIN_NEEDED {
            best = (size, rate);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::choose;

    #[test]
    fn a_bigger_batch_must_pay_for_itself() {
        // Rates that grow to 8 rows and then flatten: 16 gains under 1%, not enough.
        let rates = [(1, 100.0), (2, 180.0), (4, 300.0), (8, 400.0), (16, 403.0)];
        assert_eq!(choose(&rates), 8);
    }

    #[test]
    fn a_graph_slower_per_row_in_batches_runs_one_row() {
        assert_eq!(choose(&[(1, 900.0), (2, 850.0), (4, 600.0)]), 1);
    }

    #[test]
    fn a_later_gain_past_a_dip_counts() {
        assert_eq!(choose(&[(1, 100.0), (2, 98.0), (4, 150.0)]), 4);
    }
}
