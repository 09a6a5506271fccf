//! One forward pass of an encoder over a batch of texts: right-pad, run, and read back each
//! row's pooled hidden state and class logits. Padding never leaks into a row's result.

use ort::session::Session;
use ort::value::Tensor;
use serde::Deserialize;

use super::bindings::Bindings;

/// How per-token states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Average over the real (unpadded) tokens.
    Mean,
    /// The first token's state.
    Cls,
    /// The last real token's state.
    Last,
}

/// What one text needs from the pass.
#[derive(Debug, Clone, Default)]
pub struct EncoderRow {
    pub ids: Vec<i64>,
    /// Pool the hidden states this way; `None` when the caller needs no embedding.
    pub pooling: Option<Pooling>,
    /// Read this row's class logits.
    pub logits: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncoderRowOutput {
    pub pooled: Option<Vec<f32>>,
    pub logits: Option<Vec<f32>>,
}

/// Runs `rows` as one batch, padded on the right with `pad_id` to the longest row.
pub fn run(
    session: &mut Session,
    bindings: &Bindings,
    pad_id: i64,
    rows: &[EncoderRow],
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
    for (r, row) in rows.iter().enumerate() {
        let offset = r * width;
        ids[offset..offset + row.ids.len()].copy_from_slice(&row.ids);
        for t in 0..row.ids.len() {
            mask[offset + t] = 1;
            positions[offset + t] = t as i64;
        }
    }
    let shape = [batch, width];
    let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::with_capacity(4);
    if let Some(name) = &bindings.token_type_ids {
        inputs.push((
            name.clone(),
            Tensor::from_array((shape, vec![0_i64; batch * width]))?.into(),
        ));
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
    let wants_pooled = rows.iter().any(|row| row.pooling.is_some());
    let wants_logits = rows.iter().any(|row| row.logits);

    let hidden = match (&bindings.hidden_states, wants_pooled) {
        (Some(name), true) => Some(output(&outputs, name)?.try_extract_tensor::<f32>()?),
        _ => None,
    };
    let logits = match (&bindings.logits, wants_logits) {
        (Some(name), true) => Some(output(&outputs, name)?.try_extract_tensor::<f32>()?),
        _ => None,
    };

    let mut results = Vec::with_capacity(batch);
    for (r, row) in rows.iter().enumerate() {
        let mut result = EncoderRowOutput::default();
        if let (Some(pooling), Some((shape, data))) = (row.pooling, &hidden) {
            let hidden_size = shape[2] as usize;
            let states = &data[r * width * hidden_size..(r + 1) * width * hidden_size];
            result.pooled = Some(pool(states, hidden_size, row.ids.len(), pooling));
        }
        if let (true, Some((shape, data))) = (row.logits, &logits) {
            let classes = shape[1] as usize;
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

/// Pools the first `length` token states of one row (`states` is `[T, hidden_size]`, row-major).
pub fn pool(states: &[f32], hidden_size: usize, length: usize, pooling: Pooling) -> Vec<f32> {
    let length = length.max(1);
    match pooling {
        Pooling::Cls => states[..hidden_size].to_vec(),
        Pooling::Last => states[(length - 1) * hidden_size..length * hidden_size].to_vec(),
        Pooling::Mean => {
            let mut sum = vec![0.0_f32; hidden_size];
            for token in states[..length * hidden_size].chunks_exact(hidden_size) {
                for (total, value) in sum.iter_mut().zip(token) {
                    *total += value;
                }
            }
            let scale = 1.0 / length as f32;
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
        assert_eq!(pool(&states, 2, 2, Pooling::Mean), vec![2.0, 3.0]);
        assert_eq!(pool(&states, 2, 2, Pooling::Cls), vec![1.0, 2.0]);
        assert_eq!(pool(&states, 2, 2, Pooling::Last), vec![3.0, 4.0]);
    }
}
