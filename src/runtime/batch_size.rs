//! The batch size an encoder runs best at on this host, measured at load time. Batching pays
//! only while a bigger run keeps more of the cores busy per row; on small or memory-bound graphs
//! the rate per row even falls past some size (the benchmark measured tiny-encoder's sorted
//! batches of 32 at half its one-text-per-run rate). Where that point lies depends on the model,
//! the host and the provider, so it is measured rather than configured.

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
/// Sizes whose rate is within this share of the best count as equally fast, and the largest of
/// them is chosen. The limit is also how many queued texts a batch may pick company of a similar
/// length from, so under load a bigger limit forms fuller, better matched runs (all-MiniLM-L6-v2
/// at 32 concurrent requests, one 2-core host: 186-193 sentences/s with a limit of 8 rows, whose
/// runs averaged 4.7 texts; 266-283 with 32, averaging 9.7, in the same hour), while a lone
/// request, which runs at once whatever the limit, pays nothing for it. Rates past a few rows
/// are flat to within a few percent, and timings on a shared host move by that much, so a
/// narrower margin picks a size by noise (8, 16, 32 or 64 rows of MiniLM between starts).
const WITHIN_BEST: f64 = 0.95;
/// Rounds over the sizes; each size's rate is its fastest run. A round times every size once,
/// so a slow spell of the host slows all sizes alike instead of the ones timed during it.
const ROUNDS: usize = 3;
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

/// Runs batches of 1, 2, 4 ... [`LARGEST_TRIED`] rows of `row_tokens` tokens, in [`ROUNDS`]
/// rounds, and picks the largest size within reach of the best rate.
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
        pool_from: 0,
        logits: bindings.logits.is_some(),
        ..EncoderRow::default()
    };
    let mut time_run = |size: usize| -> ort::Result<Duration> {
        let rows = vec![row.clone(); size];
        let started = Instant::now();
        encoder::run(session, bindings, pad_id, &rows)?;
        Ok(started.elapsed())
    };
    // The first round also finds the sizes worth timing: none past the first slow run.
    let mut fastest: Vec<(usize, Duration)> = Vec::new();
    let mut size = 1;
    while size <= LARGEST_TRIED {
        let took = time_run(size)?;
        fastest.push((size, took));
        if took > SLOWEST_RUN {
            break;
        }
        size *= 2;
    }
    for _ in 1..ROUNDS {
        for (size, best) in &mut fastest {
            *best = (*best).min(time_run(*size)?);
        }
    }
    let rows_per_second: Vec<(usize, f64)> = fastest
        .into_iter()
        .map(|(size, took)| (size, size as f64 / took.as_secs_f64().max(1e-9)))
        .collect();
    Ok(BatchProfile {
        best: choose(&rows_per_second),
        rows_per_second,
    })
}

/// The largest size whose rate is within [`WITHIN_BEST`] of the best rate.
fn choose(rows_per_second: &[(usize, f64)]) -> usize {
    let best_rate = rows_per_second
        .iter()
        .map(|&(_, rate)| rate)
        .fold(0.0, f64::max);
    rows_per_second
        .iter()
        .filter(|&&(_, rate)| rate >= best_rate * WITHIN_BEST)
        .map(|&(size, _)| size)
        .max()
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::choose;

    #[test]
    fn the_largest_size_within_reach_of_the_best_rate_is_chosen() {
        // Rates that grow to 16 rows and then fall: 32 is more than 5% below the best.
        let rates = [(1, 100.0), (4, 300.0), (8, 400.0), (16, 403.0), (32, 370.0)];
        assert_eq!(choose(&rates), 16);
    }

    #[test]
    fn flat_rates_choose_the_largest_not_the_noisiest() {
        // all-MiniLM-L6-v2's timing at load on a shared host: flat past 4 rows, with 8 ahead by
        // noise. The larger limit lets the batcher match lengths from more of the queue.
        let rates = [
            (4, 246.0),
            (8, 266.0),
            (16, 241.0),
            (32, 253.0),
            (64, 244.0),
        ];
        assert_eq!(choose(&rates), 32);
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
