//! Batched decoding for the three generation families, as one mechanism: tensors a step
//! produces are fed back at the next (a KV cache, a recurrent state) or, with no carried
//! state, the whole sequence is run again. Rows are left-padded, so every row's newest token
//! sits in the last column; rows join (`concat`) and leave (`filter`) between steps, and only
//! then is carried state copied — between those, outputs go back in without a copy.

use std::sync::Arc;

use ort::session::Session;
use ort::value::{DynValue, Tensor};

use super::bindings::Bindings;
use super::session::TensorSpec;

/// What a model carries from one step to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// Keys and values `[batch, heads, past, head_dim]` that grow by one column a step.
    KvCache,
    /// A fixed-size state `[batch, ...]`, e.g. an LSTM's `h` and `c`.
    Recurrent,
    /// Nothing: each step re-runs the whole sequence.
    Nothing,
}

/// Axis of the past length in a KV-cache tensor (optimum's layout).
const KV_SEQUENCE_AXIS: usize = 2;

/// The fixed facts of a decoder model, checked once at load time.
#[derive(Debug, Clone)]
pub struct DecoderModel {
    pub carry: Carry,
    bindings: Arc<Bindings>,
    /// Declared shape of each state input, in `bindings.state` order.
    state_shapes: Vec<Vec<i64>>,
    pad_id: i64,
}

impl DecoderModel {
    pub fn new(
        bindings: Arc<Bindings>,
        inputs: &[TensorSpec],
        recurrent: bool,
        pad_id: i64,
    ) -> Result<Self, String> {
        let mut state_shapes = Vec::new();
        for pair in &bindings.state {
            let spec = inputs
                .iter()
                .find(|spec| spec.name == pair.input)
                .ok_or_else(|| format!("no state input `{}`", pair.input))?;
            if spec.dtype != "float32" {
                return Err(format!(
                    "state input `{}` is {}; only float32 state is supported",
                    spec.name, spec.dtype
                ));
            }
            if recurrent && spec.shape.iter().skip(1).any(|&dim| dim < 0) {
                return Err(format!(
                    "recurrent state `{}` needs fixed dimensions after the batch axis, got {:?}",
                    spec.name, spec.shape
                ));
            }
            if !recurrent && spec.shape.len() != 4 {
                return Err(format!(
                    "KV-cache input `{}` must be [batch, heads, past, head_dim], got {:?}",
                    spec.name, spec.shape
                ));
            }
            state_shapes.push(spec.shape.clone());
        }
        let carry = match (bindings.has_state(), recurrent) {
            (false, _) => Carry::Nothing,
            (true, true) => Carry::Recurrent,
            (true, false) => Carry::KvCache,
        };
        if carry == Carry::KvCache
            && (bindings.attention_mask.is_none() || bindings.position_ids.is_none())
        {
            return Err("a KV-cache decoder needs attention_mask and position_ids inputs to batch sequences of different lengths".into());
        }
        Ok(Self {
            carry,
            bindings,
            state_shapes,
            pad_id,
        })
    }

    /// Runs the prompts of new sequences and returns them as a batch, with each row's
    /// next-token logits.
    pub fn prefill(
        &self,
        session: &mut Session,
        prompts: Vec<Vec<i64>>,
    ) -> ort::Result<(DecodeBatch, Vec<Vec<f32>>)> {
        match self.carry {
            Carry::KvCache => self.prefill_kv(session, prompts),
            Carry::Recurrent => {
                // Padding would flow through a recurrent state, so each prompt runs alone.
                let mut batch = DecodeBatch::empty();
                let mut logits = Vec::with_capacity(prompts.len());
                for prompt in prompts {
                    let state = self.empty_state(1)?;
                    let (mut row_logits, state) = self.run(
                        session,
                        std::slice::from_ref(&prompt),
                        0,
                        &[prompt.len()],
                        state,
                    )?;
                    logits.push(row_logits.remove(0));
                    batch = self.concat(
                        batch,
                        DecodeBatch {
                            rows: vec![Row::new(prompt)],
                            state,
                            width: 0,
                        },
                    )?;
                }
                Ok((batch, logits))
            }
            Carry::Nothing => {
                let rows: Vec<Row> = prompts.into_iter().map(Row::new).collect();
                let logits = self.run_full(session, &rows)?;
                Ok((
                    DecodeBatch {
                        rows,
                        state: Vec::new(),
                        width: 0,
                    },
                    logits,
                ))
            }
        }
    }

    fn prefill_kv(
        &self,
        session: &mut Session,
        prompts: Vec<Vec<i64>>,
    ) -> ort::Result<(DecodeBatch, Vec<Vec<f32>>)> {
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let fed: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let padded: Vec<Vec<i64>> = prompts
            .iter()
            .map(|p| left_pad(p, width, self.pad_id))
            .collect();
        let state = self.empty_state(prompts.len())?;
        let (logits, state) = self.run(session, &padded, 0, &fed, state)?;
        let rows = prompts.into_iter().map(Row::new).collect();
        Ok((DecodeBatch { rows, state, width }, logits))
    }

    /// Feeds each row's pending token and returns every row's next-token logits.
    pub fn step(
        &self,
        session: &mut Session,
        batch: &mut DecodeBatch,
    ) -> ort::Result<Vec<Vec<f32>>> {
        match self.carry {
            Carry::Nothing => self.run_full(session, &batch.rows),
            Carry::KvCache | Carry::Recurrent => {
                let last: Vec<Vec<i64>> = batch
                    .rows
                    .iter()
                    .map(|row| vec![*row.tokens.last().expect("a row always has a token")])
                    .collect();
                let fed_after: Vec<usize> = batch.rows.iter().map(|row| row.fed + 1).collect();
                let state = std::mem::take(&mut batch.state);
                let (logits, state) = self.run(session, &last, batch.width, &fed_after, state)?;
                batch.state = state;
                if self.carry == Carry::KvCache {
                    batch.width += 1;
                }
                for row in &mut batch.rows {
                    row.fed += 1;
                }
                Ok(logits)
            }
        }
    }

    /// Runs the whole (left-padded) sequences, for models that carry nothing.
    fn run_full(&self, session: &mut Session, rows: &[Row]) -> ort::Result<Vec<Vec<f32>>> {
        let width = rows.iter().map(|row| row.tokens.len()).max().unwrap_or(0);
        let padded: Vec<Vec<i64>> = rows
            .iter()
            .map(|row| left_pad(&row.tokens, width, self.pad_id))
            .collect();
        let lengths: Vec<usize> = rows.iter().map(|row| row.tokens.len()).collect();
        let (logits, _) = self.run(session, &padded, 0, &lengths, Vec::new())?;
        Ok(logits)
    }

    /// One session run. `ids` are `[rows, columns]`, left-padded; `past` is the number of
    /// cached columns before them; `real[r]` is how many of row r's positions (cached and new)
    /// are real tokens. Returns the last column's logits per row and the new state.
    fn run(
        &self,
        session: &mut Session,
        ids: &[Vec<i64>],
        past: usize,
        real: &[usize],
        state: Vec<DynValue>,
    ) -> ort::Result<(Vec<Vec<f32>>, Vec<DynValue>)> {
        let rows = ids.len();
        let columns = ids.first().map_or(0, Vec::len);
        let total = past + columns;
        let bindings = &self.bindings;
        let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> =
            Vec::with_capacity(3 + state.len());
        inputs.push((
            bindings.input_ids.clone(),
            Tensor::from_array(([rows, columns], ids.concat()))?.into(),
        ));
        if let Some(name) = &bindings.attention_mask {
            let mut mask = Vec::with_capacity(rows * total);
            for &real in real {
                mask.extend((0..total).map(|c| i64::from(c + real >= total)));
            }
            inputs.push((
                name.clone(),
                Tensor::from_array(([rows, total], mask))?.into(),
            ));
        }
        if let Some(name) = &bindings.position_ids {
            let mut positions = Vec::with_capacity(rows * columns);
            for &real in real {
                // Position of the column at absolute index c is c - (total - real); pads get 0.
                positions.extend((past..total).map(|c| (c + real).saturating_sub(total) as i64));
            }
            inputs.push((
                name.clone(),
                Tensor::from_array(([rows, columns], positions))?.into(),
            ));
        }
        if let Some(name) = &bindings.token_type_ids {
            inputs.push((
                name.clone(),
                Tensor::from_array(([rows, columns], vec![0_i64; rows * columns]))?.into(),
            ));
        }
        for (pair, value) in bindings.state.iter().zip(state) {
            inputs.push((pair.input.clone(), value.into()));
        }

        let mut outputs = session.run(inputs)?;
        let logits_name = bindings
            .logits
            .as_deref()
            .expect("decoders have a logits output (checked at load)");
        let logits = {
            let (shape, data) = outputs
                .get(logits_name)
                .ok_or_else(|| {
                    ort::Error::new(format!("the model returned no `{logits_name}` output"))
                })?
                .try_extract_tensor::<f32>()?;
            last_column(shape, data, rows)
        };
        let mut new_state = Vec::with_capacity(bindings.state.len());
        for pair in &bindings.state {
            new_state.push(outputs.remove(&pair.output).ok_or_else(|| {
                ort::Error::new(format!("the model returned no `{}` output", pair.output))
            })?);
        }
        Ok((logits, new_state))
    }

    /// Zero state for `rows` new sequences: empty past for a KV cache, zeros for an RNN.
    fn empty_state(&self, rows: usize) -> ort::Result<Vec<DynValue>> {
        self.state_shapes
            .iter()
            .map(|declared| {
                let shape: Vec<usize> = declared
                    .iter()
                    .enumerate()
                    .map(|(axis, &dim)| {
                        if axis == 0 {
                            rows
                        } else if dim < 0 {
                            0
                        } else {
                            dim as usize
                        }
                    })
                    .collect();
                let len = shape.iter().product();
                Ok(Tensor::from_array((shape, vec![0.0_f32; len]))?.into_dyn())
            })
            .collect()
    }

    /// Appends `other`'s rows after `batch`'s.
    pub fn concat(&self, batch: DecodeBatch, other: DecodeBatch) -> ort::Result<DecodeBatch> {
        if batch.rows.is_empty() {
            return Ok(other);
        }
        if other.rows.is_empty() {
            return Ok(batch);
        }
        let width = batch.width.max(other.width);
        let mut state = Vec::with_capacity(batch.state.len());
        for (a, b) in batch.state.iter().zip(&other.state) {
            let all_a: Vec<usize> = (0..batch.rows.len()).collect();
            let all_b: Vec<usize> = (0..other.rows.len()).collect();
            state.push(self.gather(&[(a, batch.width, &all_a), (b, other.width, &all_b)], width)?);
        }
        let mut rows = batch.rows;
        rows.extend(other.rows);
        Ok(DecodeBatch { rows, state, width })
    }

    /// Keeps only the rows at `keep` (in that order), dropping cache columns no kept row uses.
    pub fn filter(&self, batch: DecodeBatch, keep: &[usize]) -> ort::Result<DecodeBatch> {
        if keep.len() == batch.rows.len() {
            return Ok(batch);
        }
        let width = match self.carry {
            Carry::KvCache => keep.iter().map(|&i| batch.rows[i].fed).max().unwrap_or(0),
            _ => 0,
        };
        let mut state = Vec::with_capacity(batch.state.len());
        for value in &batch.state {
            state.push(self.gather(&[(value, batch.width, keep)], width)?);
        }
        let mut rows: Vec<Option<Row>> = batch.rows.into_iter().map(Some).collect();
        let rows = keep
            .iter()
            .map(|&i| rows[i].take().expect("each row kept once"))
            .collect();
        Ok(DecodeBatch { rows, state, width })
    }

    /// Builds one state tensor from selected rows of several, right-aligning KV columns to `width`.
    fn gather(
        &self,
        sources: &[(&DynValue, usize, &[usize])],
        width: usize,
    ) -> ort::Result<DynValue> {
        let mut out_shape: Option<Vec<usize>> = None;
        let mut data = Vec::new();
        let mut total_rows = 0;
        for &(value, source_width, rows) in sources {
            let (shape, values) = value.try_extract_tensor::<f32>()?;
            let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            match self.carry {
                Carry::KvCache => {
                    let (heads, head_dim) = (shape[1], shape[3]);
                    debug_assert_eq!(shape[KV_SEQUENCE_AXIS], source_width);
                    for &row in rows {
                        for head in 0..heads {
                            let base = (row * heads + head) * source_width * head_dim;
                            if width >= source_width {
                                data.extend(std::iter::repeat_n(
                                    0.0_f32,
                                    (width - source_width) * head_dim,
                                ));
                                data.extend_from_slice(
                                    &values[base..base + source_width * head_dim],
                                );
                            } else {
                                // The dropped leading columns are padding for every kept row.
                                let skip = (source_width - width) * head_dim;
                                data.extend_from_slice(
                                    &values[base + skip..base + source_width * head_dim],
                                );
                            }
                        }
                    }
                    out_shape.get_or_insert_with(|| vec![0, heads, width, head_dim]);
                }
                Carry::Recurrent | Carry::Nothing => {
                    let row_len: usize = shape[1..].iter().product();
                    for &row in rows {
                        data.extend_from_slice(&values[row * row_len..(row + 1) * row_len]);
                    }
                    out_shape.get_or_insert_with(|| shape.clone());
                }
            }
            total_rows += rows.len();
        }
        let mut shape = out_shape.unwrap_or_default();
        shape[0] = total_rows;
        Ok(Tensor::from_array((shape, data))?.into_dyn())
    }
}

#[derive(Debug, Clone)]
struct Row {
    /// Every real token: the prompt, then each generated token (the newest not yet fed).
    tokens: Vec<i64>,
    /// Tokens the carried state has seen.
    fed: usize,
}

impl Row {
    fn new(prompt: Vec<i64>) -> Self {
        let fed = prompt.len();
        Self {
            tokens: prompt,
            fed,
        }
    }
}

/// Sequences decoded together. Row order is the caller's: `push_token`, `filter` and `concat`
/// address rows by index.
pub struct DecodeBatch {
    rows: Vec<Row>,
    state: Vec<DynValue>,
    /// Columns of KV cache held per row (real tokens right-aligned, padding on the left).
    width: usize,
}

impl DecodeBatch {
    pub fn empty() -> Self {
        Self {
            rows: Vec::new(),
            state: Vec::new(),
            width: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Records the token chosen for row `index`; the next step feeds it.
    pub fn push_token(&mut self, index: usize, token: i64) {
        self.rows[index].tokens.push(token);
    }

    /// Tokens row `index` holds (prompt and generated).
    pub fn row_tokens(&self, index: usize) -> &[i64] {
        &self.rows[index].tokens
    }
}

fn left_pad(tokens: &[i64], width: usize, pad: i64) -> Vec<i64> {
    let mut padded = vec![pad; width - tokens.len()];
    padded.extend_from_slice(tokens);
    padded
}

/// The logits of the last column of `[rows, columns, vocab]` (or `[rows, vocab]`), per row.
fn last_column(shape: &[i64], data: &[f32], rows: usize) -> Vec<Vec<f32>> {
    let vocab = *shape.last().unwrap_or(&0) as usize;
    let columns = if shape.len() == 3 {
        shape[1] as usize
    } else {
        1
    };
    (0..rows)
        .map(|r| {
            let start = (r * columns + columns - 1) * vocab;
            data[start..start + vocab].to_vec()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_column_picks_each_rows_final_position() {
        // 2 rows, 2 columns, vocab 3.
        let data = [0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11.];
        assert_eq!(
            last_column(&[2, 2, 3], &data, 2),
            vec![vec![3., 4., 5.], vec![9., 10., 11.]]
        );
    }

    #[test]
    fn left_padding_right_aligns_tokens() {
        assert_eq!(left_pad(&[7, 8], 4, 0), vec![0, 0, 7, 8]);
    }
}
