//! One decoder step graph and the rows it runs. Rows are left-padded, so every row's newest
//! token sits in the last column; carried state (a KV cache, a recurrent state) is fed back
//! as the graph returned it, in the memory of the device that ran it (`runtime::residency`),
//! and copied only when rows leave or join.

use std::sync::Arc;

use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType};

use crate::runtime::SessionPool;
use crate::runtime::bindings::Bindings;
use crate::runtime::residency::{self, Placement};
use crate::runtime::step::{RowBatch, RunError};

/// Axis of the past length in a KV-cache tensor (optimum's layout).
pub const KV_SEQUENCE_AXIS: usize = 2;

/// What a model carries from one step to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// Keys and values `[batch, heads, past, head_dim]` that grow by one column a step.
    KvCache,
    /// Keys and values in buffers `[batch, heads, capacity, head_dim]` the graph writes each
    /// step's columns into, told each row's length (see `shared_cache`).
    SharedKvCache,
    /// A fixed-size state `[batch, ...]`, e.g. an LSTM's `h` and `c`.
    Recurrent,
    /// Nothing: each step re-runs the whole sequence.
    Nothing,
}

/// A step graph, its sessions and the facts about it checked once at load time.
#[derive(Clone)]
pub struct StepGraph {
    pub carry: Carry,
    pub(super) pool: Arc<SessionPool>,
    pub(super) bindings: Arc<Bindings>,
    /// Declared shape of each state input, in `bindings.state` order.
    pub(super) state_shapes: Vec<Vec<i64>>,
    /// The state's element type: float32, or float16 in a cache written in place.
    pub(super) state_type: TensorElementType,
    pub(super) pad_id: i64,
}

/// The per-row inputs of one run, besides the ids: see `StepGraph::run`.
pub struct RunInputs<'a> {
    /// `[rows, columns]`, left-padded.
    pub ids: &'a [Vec<i64>],
    /// Cached columns before `ids`.
    pub past: usize,
    /// How many of each row's positions (cached and new) are real tokens.
    pub real: &'a [usize],
    pub state: Vec<DynValue>,
    /// Inputs fed as they are, such as an encoder's outputs.
    pub extra: Vec<(String, SessionInputValue<'a>)>,
}

impl StepGraph {
    /// The graph's inputs and the names bound to them.
    pub fn io(&self) -> (&[crate::runtime::TensorSpec], &Bindings) {
        (self.pool.inputs(), &self.bindings)
    }

    /// Checks the graph's state inputs against what `carry` needs of them.
    pub fn new(
        pool: Arc<SessionPool>,
        bindings: Arc<Bindings>,
        recurrent: bool,
        pad_id: i64,
    ) -> Result<Self, String> {
        let in_place = !recurrent && bindings.writes_cache_in_place();
        let mut state_shapes = Vec::new();
        let mut state_type = TensorElementType::Float32;
        for pair in &bindings.state {
            let spec = pool
                .inputs()
                .iter()
                .find(|spec| spec.name == pair.input)
                .ok_or_else(|| format!("no state input `{}`", pair.input))?;
            let element = match spec.float_type() {
                Some(TensorElementType::Float32) => TensorElementType::Float32,
                Some(TensorElementType::Float16) if in_place => TensorElementType::Float16,
                _ => {
                    return Err(format!(
                        "state input `{}` is {}; state is float32, or float16 in a cache written in place",
                        spec.name, spec.dtype
                    ));
                }
            };
            if !state_shapes.is_empty() && element != state_type {
                return Err(format!(
                    "state input `{}` is {}, but `{}` is {state_type:?}; all state shares one type",
                    spec.name, spec.dtype, bindings.state[0].input
                ));
            }
            state_type = element;
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
            (true, false) if in_place => Carry::SharedKvCache,
            (true, false) => Carry::KvCache,
        };
        Ok(Self {
            carry,
            pool,
            bindings,
            state_shapes,
            state_type,
            pad_id,
        })
    }

    /// Whether rows of different lengths can share a run: the graph is told which columns are
    /// padding and where each row's tokens sit.
    pub fn masks_padding(&self) -> bool {
        self.bindings.attention_mask.is_some() && self.bindings.position_ids.is_some()
    }

    /// The decode thread's session.
    pub fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.pool.session(0)
    }

    /// One session run. Returns the last column's logits per row and the new state.
    pub fn run(
        &self,
        session: &mut Session,
        inputs: RunInputs<'_>,
    ) -> Result<(Vec<Vec<f32>>, Vec<DynValue>), RunError> {
        let RunInputs {
            ids,
            past,
            real,
            state,
            extra,
        } = inputs;
        let rows = ids.len();
        let columns = ids.first().map_or(0, Vec::len);
        let total = past + columns;
        let bindings = &self.bindings;
        let mut feed: Vec<(String, SessionInputValue<'_>)> =
            Vec::with_capacity(3 + state.len() + extra.len());
        feed.push((
            bindings.input_ids.clone(),
            Tensor::from_array(([rows, columns], ids.concat()))?.into(),
        ));
        if let Some(name) = &bindings.attention_mask {
            let mut mask = Vec::with_capacity(rows * total);
            for &real in real {
                mask.extend((0..total).map(|c| i64::from(c + real >= total)));
            }
            feed.push((
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
            feed.push((
                name.clone(),
                Tensor::from_array(([rows, columns], positions))?.into(),
            ));
        }
        if let Some(name) = &bindings.token_type_ids {
            feed.push((
                name.clone(),
                Tensor::from_array(([rows, columns], vec![0_i64; rows * columns]))?.into(),
            ));
        }
        for (pair, value) in bindings.state.iter().zip(state) {
            feed.push((pair.input.clone(), value.into()));
        }
        feed.extend(extra);

        let logits_name = bindings
            .logits
            .as_deref()
            .expect("decoders have a logits output (checked at load)");
        let state_names: Vec<&str> = bindings.state.iter().map(|p| p.output.as_str()).collect();
        let mut outputs = residency::run_placed(
            session,
            &feed,
            &Placement {
                host: &[logits_name],
                device: &state_names,
                provider: self.pool.provider(),
            },
        )?;
        let logits = {
            let (shape, data) = outputs.get(logits_name)?.try_extract_tensor::<f32>()?;
            last_column(shape, data, rows)
        };
        let new_state = state_names
            .iter()
            .map(|name| outputs.take(name))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((logits, new_state))
    }

    /// Zero state for `rows` new sequences: empty past for a KV cache, zeros for an RNN.
    pub fn empty_state(&self, rows: usize) -> Result<Vec<DynValue>, RunError> {
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

    /// Appends `other`'s rows after `batch`'s, right-aligning KV columns.
    pub fn concat(&self, batch: DecodeBatch, other: DecodeBatch) -> Result<DecodeBatch, RunError> {
        if batch.rows.is_empty() {
            return Ok(other);
        }
        if other.rows.is_empty() {
            return Ok(batch);
        }
        let width = batch.width.max(other.width);
        let all_a: Vec<usize> = (0..batch.rows.len()).collect();
        let all_b: Vec<usize> = (0..other.rows.len()).collect();
        let mut state = Vec::with_capacity(batch.state.len());
        for (a, b) in batch.state.iter().zip(&other.state) {
            state.push(self.gather(&[(a, batch.width, &all_a), (b, other.width, &all_b)], width)?);
        }
        let mut rows = batch.rows;
        rows.extend(other.rows);
        Ok(DecodeBatch { rows, state, width })
    }

    /// Keeps only the rows at `keep` (in that order; a row may be kept more than once),
    /// dropping cache columns no kept row uses.
    pub fn filter(&self, batch: DecodeBatch, keep: &[usize]) -> Result<DecodeBatch, RunError> {
        if keep.iter().copied().eq(0..batch.rows.len()) {
            return Ok(batch);
        }
        self.select(&batch, keep)
    }

    /// A copy of the rows at `keep`, as `filter` makes them.
    pub fn select(&self, batch: &DecodeBatch, keep: &[usize]) -> Result<DecodeBatch, RunError> {
        let width = match self.carry {
            Carry::KvCache | Carry::SharedKvCache => {
                keep.iter().map(|&i| batch.rows[i].fed).max().unwrap_or(0)
            }
            _ => 0,
        };
        let mut state = Vec::with_capacity(batch.state.len());
        for value in &batch.state {
            state.push(self.gather(&[(value, batch.width, keep)], width)?);
        }
        let rows = keep.iter().map(|&i| batch.rows[i].clone()).collect();
        Ok(DecodeBatch { rows, state, width })
    }

    /// Builds one state tensor from selected rows of several, right-aligning KV columns to `width`.
    fn gather(
        &self,
        sources: &[(&DynValue, usize, &[usize])],
        width: usize,
    ) -> Result<DynValue, RunError> {
        match self.carry {
            Carry::KvCache | Carry::SharedKvCache => {
                gather_columns(sources, KV_SEQUENCE_AXIS, width, Align::Right)
            }
            Carry::Recurrent | Carry::Nothing => gather_rows(sources),
        }
    }
}

/// Which side of an axis keeps the values when rows of different widths meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Values end at the last column; padding (or dropped columns) on the left.
    Right,
    /// Values start at column 0; padding (or dropped columns) on the right.
    Left,
}

/// Selected rows of several `[batch, ...]` float tensors, stacked.
pub fn gather_rows(sources: &[(&DynValue, usize, &[usize])]) -> Result<DynValue, RunError> {
    let mut out_shape: Option<Vec<usize>> = None;
    let mut data = Vec::new();
    let mut total_rows = 0;
    for &(value, _, rows) in sources {
        let host = residency::host_readable(value)?;
        let (shape, values) = host.as_ref().unwrap_or(value).try_extract_tensor::<f32>()?;
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let row_len: usize = shape[1..].iter().product();
        for &row in rows {
            data.extend_from_slice(&values[row * row_len..(row + 1) * row_len]);
        }
        out_shape.get_or_insert(shape);
        total_rows += rows.len();
    }
    let mut shape = out_shape.unwrap_or_default();
    shape[0] = total_rows;
    Ok(Tensor::from_array((shape, data))?.into_dyn())
}

/// Selected rows of several float tensors `[batch, ...]` whose `axis` has a per-source length
/// (the second tuple field), stacked with that axis made `width` long: zeros fill the short
/// side, and a longer source loses columns on the side `align` names (only padding is dropped).
pub fn gather_columns(
    sources: &[(&DynValue, usize, &[usize])],
    axis: usize,
    width: usize,
    align: Align,
) -> Result<DynValue, RunError> {
    let mut out_shape: Option<Vec<usize>> = None;
    let mut data = Vec::new();
    let mut total_rows = 0;
    for &(value, source_width, rows) in sources {
        let host = residency::host_readable(value)?;
        let (shape, values) = host.as_ref().unwrap_or(value).try_extract_tensor::<f32>()?;
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        if shape.len() <= axis || shape[axis] != source_width {
            return Err(RunError::BadShape {
                name: "carried state".into(),
                shape: shape.iter().map(|&d| d as i64).collect(),
                expected: "the width recorded for its rows",
            });
        }
        // Each row is `outer` runs of [source_width, inner] blocks.
        let outer: usize = shape[1..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        let row_len = outer * source_width * inner;
        for &row in rows {
            for block in 0..outer {
                let base = row * row_len + block * source_width * inner;
                let source = &values[base..base + source_width * inner];
                let zeros = width.saturating_sub(source_width) * inner;
                let cut = source_width.saturating_sub(width) * inner;
                match align {
                    Align::Right => {
                        data.extend(std::iter::repeat_n(0.0_f32, zeros));
                        data.extend_from_slice(&source[cut..]);
                    }
                    Align::Left => {
                        data.extend_from_slice(&source[..source.len() - cut]);
                        data.extend(std::iter::repeat_n(0.0_f32, zeros));
                    }
                }
            }
        }
        out_shape.get_or_insert_with(|| {
            let mut shape = shape.clone();
            shape[axis] = width;
            shape
        });
        total_rows += rows.len();
    }
    let mut shape = out_shape.unwrap_or_default();
    shape[0] = total_rows;
    Ok(Tensor::from_array((shape, data))?.into_dyn())
}

#[derive(Debug, Clone)]
pub struct Row {
    /// Every real token: the prompt, then each generated token (the newest not yet fed).
    pub tokens: Vec<i64>,
    /// Tokens the carried state has seen.
    pub fed: usize,
}

impl Row {
    pub fn new(prompt: Vec<i64>) -> Self {
        let fed = prompt.len();
        Self {
            tokens: prompt,
            fed,
        }
    }

    /// The token the next step feeds.
    pub fn pending(&self) -> i64 {
        *self.tokens.last().expect("a row always has a token")
    }
}

/// Sequences decoded together by a decoder-only step graph.
pub struct DecodeBatch {
    pub rows: Vec<Row>,
    pub state: Vec<DynValue>,
    /// Columns of KV cache held per row (real tokens right-aligned, padding on the left).
    pub width: usize,
}

impl DecodeBatch {
    pub fn empty() -> Self {
        Self {
            rows: Vec::new(),
            state: Vec::new(),
            width: 0,
        }
    }
}

impl RowBatch for DecodeBatch {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn push_token(&mut self, row: usize, token: i64) {
        self.rows[row].tokens.push(token);
    }
}

pub fn left_pad(tokens: &[i64], width: usize, pad: i64) -> Vec<i64> {
    let mut padded = vec![pad; width - tokens.len()];
    padded.extend_from_slice(tokens);
    padded
}

/// The logits of the last column of `[rows, columns, vocab]` (or `[rows, vocab]`), per row.
pub(super) fn last_column(shape: &[i64], data: &[f32], rows: usize) -> Vec<Vec<f32>> {
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

    fn tensor(shape: Vec<usize>, data: Vec<f32>) -> DynValue {
        Tensor::from_array((shape, data)).unwrap().into_dyn()
    }

    fn values(value: &DynValue) -> (Vec<i64>, Vec<f32>) {
        let (shape, data) = value.try_extract_tensor::<f32>().unwrap();
        (shape.to_vec(), data.to_vec())
    }

    #[test]
    fn columns_pad_and_cut_on_the_side_alignment_names() {
        // [rows 2, heads 1, width 2, dim 1]
        let a = tensor(vec![2, 1, 2, 1], vec![1., 2., 3., 4.]);
        let right = gather_columns(&[(&a, 2, &[1, 0])], 2, 3, Align::Right).unwrap();
        assert_eq!(
            values(&right),
            (vec![2, 1, 3, 1], vec![0., 3., 4., 0., 1., 2.])
        );
        let left = gather_columns(&[(&a, 2, &[0])], 2, 3, Align::Left).unwrap();
        assert_eq!(values(&left), (vec![1, 1, 3, 1], vec![1., 2., 0.]));
        let cut = gather_columns(&[(&a, 2, &[0])], 2, 1, Align::Right).unwrap();
        assert_eq!(values(&cut), (vec![1, 1, 1, 1], vec![2.]));
        // A mask-like [rows, width] tensor on axis 1.
        let m = tensor(vec![1, 2], vec![5., 6.]);
        let wide = gather_columns(&[(&m, 2, &[0]), (&m, 2, &[0])], 1, 3, Align::Left).unwrap();
        assert_eq!(values(&wide), (vec![2, 3], vec![5., 6., 0., 5., 6., 0.]));
    }
}
