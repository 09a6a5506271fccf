//! One forward pass of an encoder over a batch of texts: right-pad, run, and read back each
//! row's pooled hidden state and class logits. Padding never leaks into a row's result.

use ort::session::Session;
use ort::value::Tensor;

use super::bindings::Bindings;

pub use crate::kinds::Pooling;

/// Which embedding a text wants from the pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Embedding {
    /// Pool the per-token hidden states this way.
    Pool(Pooling),
    /// The graph's own pooled output (`[batch, dim]`), as it is.
    Pooled,
}

/// What one text needs from the pass.
#[derive(Debug, Clone, Default)]
pub struct EncoderRow {
    pub ids: Vec<i64>,
    /// Token type ids, one per id; empty: all 0.
    pub type_ids: Vec<i64>,
    /// `None` when the caller needs no embedding.
    pub embedding: Option<Embedding>,
    /// Tokens at the start that pooling leaves out: a prompt, for a model whose authors pool
    /// without it (sentence-transformers' `include_prompt: false`).
    pub pool_from: usize,
    /// Read this row's class logits.
    pub logits: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncoderRowOutput {
    pub pooled: Option<Vec<f32>>,
    pub logits: Option<Vec<f32>>,
}

/// Runs `rows` as one batch, padded on the right with `pad_id` to the longest row. A graph with
/// no attention mask cannot be told where a row's padding is and would attend to it: its rows
/// run in groups of one length instead, unpadded.
pub fn run(
    session: &mut Session,
    bindings: &Bindings,
    pad_id: i64,
    rows: &[EncoderRow],
) -> ort::Result<Vec<EncoderRowOutput>> {
    if bindings.attention_mask.is_some() {
        return run_padded(session, bindings, pad_id, &rows.iter().collect::<Vec<_>>());
    }
    super::run_by_length(
        rows,
        |row| row.ids.len(),
        |group| run_padded(session, bindings, pad_id, group),
    )
}

fn run_padded(
    session: &mut Session,
    bindings: &Bindings,
    pad_id: i64,
    rows: &[&EncoderRow],
) -> ort::Result<Vec<EncoderRowOutput>> {
    let batch = rows.len();
    let width = rows
        .iter()
        .map(|row| row.ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = vec![pad_id; batch * width];
    let mut mask = vec![0_i64; batch * width];
    let mut positions = vec![0_i64; batch * width];
    // Padding's type is 0, as transformers' tokenizers pad it.
    let mut type_ids = vec![0_i64; batch * width];
    for (r, row) in rows.iter().enumerate() {
        let offset = r * width;
        ids[offset..offset + row.ids.len()].copy_from_slice(&row.ids);
        type_ids[offset..offset + row.type_ids.len()].copy_from_slice(&row.type_ids);
        for t in 0..row.ids.len() {
            mask[offset + t] = 1;
            positions[offset + t] = bindings.first_position + t as i64;
        }
    }
    let shape = [batch, width];
    let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::with_capacity(4);
    if let Some(name) = &bindings.token_type_ids {
        inputs.push((name.clone(), Tensor::from_array((shape, type_ids))?.into()));
    }
    if let Some(name) = &bindings.position_ids {
        inputs.push((name.clone(), Tensor::from_array((shape, positions))?.into()));
    }
    if let Some(name) = &bindings.attention_mask {
        inputs.push((name.clone(), Tensor::from_array((shape, mask))?.into()));
    }
    inputs.push((
        bindings.input_ids.clone(),
        Tensor::from_array((shape, ids))?.into(),
    ));

    let outputs = session.run(inputs)?;
    let wants = |which: fn(&EncoderRow) -> bool| rows.iter().any(|row| which(row));
    let tensor = |name: &Option<String>, wanted: bool, rank: usize| -> ort::Result<_> {
        match (name, wanted) {
            (Some(name), true) => {
                let (shape, data) = output(&outputs, name)?.try_extract_tensor::<f32>()?;
                // Checked at load; a graph that breaks its declared rank fails this batch only.
                if shape.len() != rank || shape[0] as usize != batch {
                    return Err(ort::Error::new(format!(
                        "output `{name}` has shape {:?}; expected rank {rank} with {batch} rows",
                        &shape[..]
                    )));
                }
                Ok(Some((shape[rank - 1] as usize, data)))
            }
            _ => Ok(None),
        }
    };
    let hidden = tensor(
        &bindings.hidden_states,
        wants(|row| matches!(row.embedding, Some(Embedding::Pool(_)))),
        3,
    )?;
    let pooled = tensor(
        &bindings.pooled_output,
        wants(|row| row.embedding == Some(Embedding::Pooled)),
        2,
    )?;
    let logits = tensor(&bindings.logits, wants(|row| row.logits), 2)?;

    let mut results = Vec::with_capacity(batch);
    for (r, row) in rows.iter().enumerate() {
        let mut result = EncoderRowOutput::default();
        match (row.embedding, &hidden, &pooled) {
            (Some(Embedding::Pool(pooling)), Some((hidden_size, data)), _) => {
                let states = &data[r * width * hidden_size..(r + 1) * width * hidden_size];
                let tokens = row.pool_from..row.ids.len();
                result.pooled = Some(pool(states, *hidden_size, tokens, pooling));
            }
            (Some(Embedding::Pooled), _, Some((dim, data))) => {
                result.pooled = Some(data[r * dim..(r + 1) * dim].to_vec());
            }
            _ => {}
        }
        if let (true, Some((classes, data))) = (row.logits, &logits) {
            result.logits = Some(data[r * classes..(r + 1) * classes].to_vec());
        }
        results.push(result);
    }
    Ok(results)
}

fn output<'o>(
    outputs: &'o ort::session::SessionOutputs<'_>,
    name: &str,
) -> ort::Result<&'o ort::value::DynValue> {
    outputs
        .get(name)
        .ok_or_else(|| ort::Error::new(format!("the model returned no `{name}` output")))
}

/// Pools the states of `tokens` of one row (`states` is `[T, hidden_size]`, row-major): its
/// real tokens, less any it leaves out at the start. CLS pooling takes the first token pooled
/// and last-token pooling the last, as sentence-transformers (6.3) does.
pub fn pool(
    states: &[f32],
    hidden_size: usize,
    tokens: std::ops::Range<usize>,
    pooling: Pooling,
) -> Vec<f32> {
    let length = tokens.end.max(1);
    // At least one token is pooled, should a prompt fill the whole row.
    let from = tokens.start.min(length - 1);
    match pooling {
        // The first token left in the mask; with none left, the first (argmax of all zeros).
        Pooling::Cls => {
            let first = if tokens.start < tokens.end {
                tokens.start
            } else {
                0
            };
            states[first * hidden_size..(first + 1) * hidden_size].to_vec()
        }
        Pooling::Last => states[(length - 1) * hidden_size..length * hidden_size].to_vec(),
        Pooling::Max => {
            let mut max = states[from * hidden_size..(from + 1) * hidden_size].to_vec();
            for token in
                states[(from + 1) * hidden_size..length * hidden_size].chunks_exact(hidden_size)
            {
                for (best, &value) in max.iter_mut().zip(token) {
                    *best = best.max(value);
                }
            }
            max
        }
        Pooling::Mean => {
            let mut sum = vec![0.0_f32; hidden_size];
            for token in states[from * hidden_size..length * hidden_size].chunks_exact(hidden_size)
            {
                for (total, value) in sum.iter_mut().zip(token) {
                    *total += value;
                }
            }
            let scale = 1.0 / (length - from) as f32;
            sum.iter_mut().for_each(|value| *value *= scale);
            sum
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_only_real_tokens() {
        // Two real tokens and one pad token of width 2.
        let states = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        assert_eq!(pool(&states, 2, 0..2, Pooling::Mean), vec![2.0, 3.0]);
        assert_eq!(pool(&states, 2, 0..2, Pooling::Cls), vec![1.0, 2.0]);
        assert_eq!(pool(&states, 2, 0..2, Pooling::Last), vec![3.0, 4.0]);
        assert_eq!(
            pool(&[1.0, 5.0, 3.0, 4.0, 100.0, 100.0], 2, 0..2, Pooling::Max),
            vec![3.0, 5.0]
        );
    }

    #[test]
    fn leaves_out_the_tokens_before_the_range() {
        // A prompt's token, two of the text's, a pad.
        let states = [9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        assert_eq!(pool(&states, 2, 1..3, Pooling::Mean), vec![2.0, 3.0]);
        assert_eq!(pool(&states, 2, 1..3, Pooling::Max), vec![3.0, 4.0]);
        // CLS pooling takes the first token pooled; last-token pooling the last.
        assert_eq!(pool(&states, 2, 1..3, Pooling::Cls), vec![1.0, 2.0]);
        assert_eq!(pool(&states, 2, 1..3, Pooling::Last), vec![3.0, 4.0]);
        assert_eq!(pool(&states, 2, 3..3, Pooling::Cls), vec![9.0, 9.0]);
        // A prompt as long as the row leaves its last token.
        assert_eq!(pool(&states, 2, 3..3, Pooling::Mean), vec![3.0, 4.0]);
    }
}
