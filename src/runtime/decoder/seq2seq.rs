//! Encoder-decoder generation (translation, summarization). A request's prompt is its source:
//! the encoder reads every new source once, batched across the arrivals of one prefill, and
//! what the decoder needs of it (the cross-attention keys and values, or the hidden states, and
//! the source mask) is kept per row and fed to every step. The decoder's own state is carried
//! like a decoder-only model's, so rows join and leave between steps the same way.
//!
//! Two layouts: optimum's, where a first-step graph reads the encoder's hidden states and
//! returns the cross-attention keys and values the later steps (a second graph) are fed; and a
//! single step graph fed the encoder's outputs directly, from the first step on.

use std::sync::Arc;

use ort::session::SessionInputValue;
use ort::value::{DynValue, Tensor};

use super::graph::{Align, Row, RunInputs, StepGraph, gather_columns, last_column};
use super::{DecodeBatch, step_with};
use crate::runtime::SessionPool;
use crate::runtime::residency::{self, Placement};
use crate::runtime::step::{RowBatch, RunError, StepDecoder};

/// The encoder graph and what becomes of its outputs.
pub struct EncoderGraph {
    pub pool: Arc<SessionPool>,
    pub input_ids: String,
    pub attention_mask: Option<String>,
    pub pad_id: i64,
}

/// optimum's first decoder step (`decoder_model.onnx`, or the merged graph's no-cache branch):
/// reads the encoder's hidden states and returns the cross-attention keys and values.
pub struct FirstStep {
    pub pool: Arc<SessionPool>,
    pub input_ids: String,
    pub logits: String,
    /// Its input for the encoder's hidden states, and the encoder output that fills it.
    pub hidden_states: (String, String),
    pub encoder_attention_mask: Option<String>,
    /// Outputs that become the steps' carried state, in the step graph's `[state]` order.
    pub state_outputs: Vec<String>,
    /// Outputs fed unchanged to every later step (the cross-attention keys and values), as
    /// (first-step output, step input).
    pub fixed_outputs: Vec<(String, String)>,
    /// Inputs the graph takes but this step does not use (the merged graph's pasts), fed
    /// empty, with their declared shapes.
    pub empty_inputs: Vec<(String, Vec<i64>)>,
    /// The merged graph's branch switch, fed `false` here.
    pub cache_branch: Option<String>,
}

pub struct Seq2SeqDecoder {
    pub encoder: EncoderGraph,
    /// Encoder outputs fed to every step, as (encoder output, step input).
    pub encoder_to_step: Vec<(String, String)>,
    /// optimum's first step; without it the step graph runs from the first token.
    pub first_step: Option<FirstStep>,
    /// The graph every (later) step runs.
    pub step: StepGraph,
    /// The step graph's input for the source mask.
    pub encoder_attention_mask: Option<String>,
    /// The merged graph's branch switch, fed `true` at every step after the first.
    pub cache_branch: Option<String>,
    /// The token every target starts from (`decoder_start_token_id`).
    pub start_token: i64,
}

/// Rows decoded together, with what each row's source left for the decoder.
pub struct Seq2SeqBatch {
    decoded: DecodeBatch,
    /// One tensor per step input the source fills, `[rows, ..., source, ...]`, each row's
    /// source columns first and zeros after.
    fixed: Vec<DynValue>,
    /// The step inputs `fixed` fills, in order.
    fixed_inputs: Arc<[String]>,
    /// Each row's source length.
    sources: Vec<usize>,
    /// Source columns held per row: the longest source among the rows.
    source_width: usize,
}

impl RowBatch for Seq2SeqBatch {
    fn len(&self) -> usize {
        self.decoded.len()
    }

    fn push_token(&mut self, row: usize, token: i64) {
        self.decoded.push_token(row, token);
    }
}

/// The source axis of a per-row tensor: `[rows, source, hidden]` or `[rows, heads, source, dim]`.
fn source_axis(rank: usize) -> usize {
    if rank == 4 { 2 } else { 1 }
}

impl Seq2SeqDecoder {
    /// The step inputs a batch's per-row tensors fill, in order: the encoder's, then the
    /// first step's.
    fn fixed_inputs(&self) -> Vec<String> {
        let from_first = self
            .first_step
            .iter()
            .flat_map(|first| &first.fixed_outputs);
        self.encoder_to_step
            .iter()
            .chain(from_first)
            .map(|(_, input)| input.clone())
            .collect()
    }

    /// Runs the encoder over right-padded sources; returns its outputs by name.
    fn encode(
        &self,
        sources: &[Vec<i64>],
        width: usize,
    ) -> Result<Vec<(String, DynValue)>, RunError> {
        let encoder = &self.encoder;
        let rows = sources.len();
        let mut ids = Vec::with_capacity(rows * width);
        for source in sources {
            ids.extend_from_slice(source);
            ids.extend(std::iter::repeat_n(encoder.pad_id, width - source.len()));
        }
        let mut feed: Vec<(String, SessionInputValue<'_>)> = vec![(
            encoder.input_ids.clone(),
            Tensor::from_array(([rows, width], ids))?.into(),
        )];
        if let Some(name) = &encoder.attention_mask {
            feed.push((
                name.clone(),
                source_mask(sources.iter().map(Vec::len), width)?.into(),
            ));
        }
        // What the steps are fed stays in the memory of the device that computed it.
        let mut wanted: Vec<&str> = self
            .encoder_to_step
            .iter()
            .map(|(output, _)| output.as_str())
            .collect();
        if let Some(first) = &self.first_step
            && !wanted.contains(&first.hidden_states.1.as_str())
        {
            wanted.push(&first.hidden_states.1);
        }
        let mut outputs = residency::run_placed(
            &mut encoder.pool.session(0),
            &feed,
            &Placement {
                host: &[],
                device: &wanted,
                provider: encoder.pool.provider(),
            },
        )?;
        wanted
            .iter()
            .map(|name| Ok(((*name).to_owned(), outputs.take(name)?)))
            .collect()
    }

    /// The first decoder step of optimum's layout: logits, the carried state and the tensors
    /// every later step is fed.
    fn first_step(
        &self,
        first: &FirstStep,
        hidden: &DynValue,
        mask: &DynValue,
        rows: usize,
    ) -> Result<FirstStepOutput, RunError> {
        let mut feed: Vec<(String, SessionInputValue<'_>)> = vec![
            (
                first.input_ids.clone(),
                Tensor::from_array(([rows, 1], vec![self.start_token; rows]))?.into(),
            ),
            (first.hidden_states.0.clone(), hidden.into()),
        ];
        if let Some(name) = &first.encoder_attention_mask {
            feed.push((name.clone(), mask.into()));
        }
        for (name, declared) in &first.empty_inputs {
            let shape: Vec<usize> = declared
                .iter()
                .enumerate()
                .map(|(axis, &dim)| match axis {
                    0 => rows,
                    _ if dim < 0 => 0,
                    _ => dim as usize,
                })
                .collect();
            feed.push((
                name.clone(),
                Tensor::from_array((shape, Vec::<f32>::new()))?.into(),
            ));
        }
        if let Some(name) = &first.cache_branch {
            feed.push((
                name.clone(),
                Tensor::from_array(([1_usize], vec![false]))?.into(),
            ));
        }
        let carried: Vec<&str> = first
            .state_outputs
            .iter()
            .chain(first.fixed_outputs.iter().map(|(output, _)| output))
            .map(String::as_str)
            .collect();
        let mut outputs = residency::run_placed(
            &mut first.pool.session(0),
            &feed,
            &Placement {
                host: &[&first.logits],
                device: &carried,
                provider: first.pool.provider(),
            },
        )?;
        let logits = {
            let (shape, data) = outputs.get(&first.logits)?.try_extract_tensor::<f32>()?;
            last_column(shape, data, rows)
        };
        let mut take = |name: &String| outputs.take(name);
        let state = first
            .state_outputs
            .iter()
            .map(&mut take)
            .collect::<Result<_, _>>()?;
        let fixed = first
            .fixed_outputs
            .iter()
            .map(|(output, _)| take(output))
            .collect::<Result<_, _>>()?;
        Ok(FirstStepOutput {
            logits,
            state,
            fixed,
        })
    }

    /// Feeds each row's pending token to the step graph with its source's tensors.
    fn run_step(&self, batch: &mut Seq2SeqBatch) -> Result<Vec<Vec<f32>>, RunError> {
        let mask = source_mask(batch.sources.iter().copied(), batch.source_width)?;
        let mut extra: Vec<(String, SessionInputValue<'_>)> = batch
            .fixed_inputs
            .iter()
            .zip(&batch.fixed)
            .map(|(name, value)| (name.clone(), SessionInputValue::from(value)))
            .collect();
        if let Some(name) = &self.encoder_attention_mask {
            extra.push((name.clone(), mask.into()));
        }
        if let Some(name) = &self.cache_branch {
            extra.push((
                name.clone(),
                Tensor::from_array(([1_usize], vec![true]))?.into(),
            ));
        }
        let logits = step_with(&self.step, &mut batch.decoded, extra)?;
        if !batch.decoded.state.is_empty() && self.step.carry == super::Carry::KvCache {
            batch.decoded.width += 1;
        }
        Ok(logits)
    }

    /// Whether the first pass over new sources (the encoder, then the first decoder step) can
    /// be told which source columns are padding.
    fn prefill_masks_sources(&self) -> bool {
        let first_masks = match &self.first_step {
            Some(first) => first.encoder_attention_mask.is_some(),
            None => self.encoder_attention_mask.is_some(),
        };
        self.encoder.attention_mask.is_some() && first_masks
    }

    /// Encodes the sources right-padded to the longest, and runs the first decoder step.
    fn prefill_padded(
        &mut self,
        sources: Vec<Vec<i64>>,
    ) -> Result<(Seq2SeqBatch, Vec<Vec<f32>>), RunError> {
        let rows = sources.len();
        let lengths: Vec<usize> = sources.iter().map(Vec::len).collect();
        let width = lengths.iter().copied().max().unwrap_or(0);
        let mut encoded = self.encode(&sources, width)?;
        let mask = source_mask(lengths.iter().copied(), width)?.into_dyn();
        let start = vec![vec![self.start_token]; rows];
        let mut take_encoded = |output: &String| {
            let at = encoded
                .iter()
                .position(|(name, _)| name == output)
                .ok_or_else(|| RunError::MissingOutput(output.clone()))?;
            Ok::<_, RunError>(encoded.swap_remove(at).1)
        };
        let mut fixed: Vec<DynValue> = self
            .encoder_to_step
            .iter()
            .map(|(output, _)| take_encoded(output))
            .collect::<Result<_, _>>()?;
        let (logits, state) = match &self.first_step {
            None => {
                let mut extra: Vec<(String, SessionInputValue<'_>)> = self
                    .encoder_to_step
                    .iter()
                    .zip(&fixed)
                    .map(|((_, input), value)| (input.clone(), SessionInputValue::from(value)))
                    .collect();
                if let Some(name) = &self.encoder_attention_mask {
                    extra.push((name.clone(), (&mask).into()));
                }
                self.step.run(
                    &mut self.step.session(),
                    RunInputs {
                        ids: &start,
                        past: 0,
                        real: &vec![1; rows],
                        state: self.step.empty_state(rows)?,
                        extra,
                    },
                )?
            }
            Some(first) => {
                // The hidden states may also feed every step (the merged graph takes them).
                let hidden_output = &first.hidden_states.1;
                let kept = self
                    .encoder_to_step
                    .iter()
                    .position(|(output, _)| output == hidden_output);
                let owned;
                let hidden = match kept {
                    Some(at) => &fixed[at],
                    None => {
                        owned = take_encoded(hidden_output)?;
                        &owned
                    }
                };
                let out = self.first_step(first, hidden, &mask, rows)?;
                fixed.extend(out.fixed);
                (out.logits, out.state)
            }
        };
        // Every row has seen its start token; a KV cache holds that one column.
        let width_after = match self.step.carry {
            super::Carry::KvCache => 1,
            _ => 0,
        };
        let decoded = DecodeBatch {
            rows: start
                .into_iter()
                .map(|tokens| Row { tokens, fed: 1 })
                .collect(),
            state,
            width: width_after,
        };
        let batch = Seq2SeqBatch {
            decoded,
            fixed,
            fixed_inputs: self.fixed_inputs().into(),
            sources: lengths,
            source_width: width,
        };
        Ok((batch, logits))
    }

    /// One batch, in the scheduler's row order, from groups that ran apart: each part is the
    /// rows it holds, their batch and their logits.
    fn reassemble(
        &self,
        parts: Vec<(Vec<usize>, Seq2SeqBatch, Vec<Vec<f32>>)>,
    ) -> Result<(Seq2SeqBatch, Vec<Vec<f32>>), RunError> {
        let mut order = Vec::new();
        let mut logits_in_order = Vec::new();
        let mut joined: Option<Seq2SeqBatch> = None;
        for (members, batch, logits) in parts {
            order.extend(members);
            logits_in_order.extend(logits);
            joined = Some(match joined {
                None => batch,
                Some(done) => self.merge(done, batch)?,
            });
        }
        let mut position = vec![0; order.len()];
        for (at, &row) in order.iter().enumerate() {
            position[row] = at;
        }
        let joined = joined.expect("a batch has rows");
        let batch = self.keep(joined, &position)?;
        let mut logits: Vec<Option<Vec<f32>>> = logits_in_order.into_iter().map(Some).collect();
        let logits = position
            .iter()
            .map(|&at| logits[at].take().expect("each row once"))
            .collect();
        Ok((batch, logits))
    }

    /// A copy of the rows at `keep`.
    fn select(&self, batch: &Seq2SeqBatch, keep: &[usize]) -> Result<Seq2SeqBatch, RunError> {
        let sources: Vec<usize> = keep.iter().map(|&row| batch.sources[row]).collect();
        let width = sources.iter().copied().max().unwrap_or(0);
        let fixed = batch
            .fixed
            .iter()
            .map(|value| {
                let axis = source_axis(value.shape().len());
                gather_columns(
                    &[(value, batch.source_width, keep)],
                    axis,
                    width,
                    Align::Left,
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Seq2SeqBatch {
            decoded: self.step.select(&batch.decoded, keep)?,
            fixed,
            fixed_inputs: Arc::clone(&batch.fixed_inputs),
            sources,
            source_width: width,
        })
    }
}

impl StepDecoder for Seq2SeqDecoder {
    type Batch = Seq2SeqBatch;

    fn empty(&self) -> Seq2SeqBatch {
        Seq2SeqBatch {
            decoded: DecodeBatch::empty(),
            fixed: Vec::new(),
            fixed_inputs: self.fixed_inputs().into(),
            sources: Vec::new(),
            source_width: 0,
        }
    }

    fn prefill(
        &mut self,
        sources: Vec<Vec<i64>>,
    ) -> Result<(Seq2SeqBatch, Vec<Vec<f32>>), RunError> {
        if self.prefill_masks_sources() {
            return self.prefill_padded(sources);
        }
        // A graph of the first pass would read a short source's padding: sources of one
        // length run together, each group apart.
        let groups = groups_by(sources.iter().map(Vec::len));
        if groups.len() <= 1 {
            return self.prefill_padded(sources);
        }
        let mut sources: Vec<Option<Vec<i64>>> = sources.into_iter().map(Some).collect();
        let mut parts = Vec::with_capacity(groups.len());
        for members in groups {
            let group = members
                .iter()
                .map(|&row| sources[row].take().expect("each row in one group"))
                .collect();
            let (batch, logits) = self.prefill_padded(group)?;
            parts.push((members, batch, logits));
        }
        self.reassemble(parts)
    }

    fn step(&mut self, batch: &mut Seq2SeqBatch) -> Result<Vec<Vec<f32>>, RunError> {
        // Rows run together only where the step graph can tell their padding apart: optimum's
        // decoders take no decoder mask and count positions from the cache length, so rows at
        // different positions run apart; a graph without a source mask runs each source
        // length apart.
        let masks_positions = self.step.masks_padding();
        let masks_sources = self.encoder_attention_mask.is_some();
        let keys = batch
            .decoded
            .rows
            .iter()
            .zip(&batch.sources)
            .map(|(row, &source)| {
                (
                    if masks_positions { 0 } else { row.fed },
                    if masks_sources { 0 } else { source },
                )
            });
        let groups = groups_by(keys);
        if groups.len() <= 1 {
            return self.run_step(batch);
        }
        let mut parts = Vec::with_capacity(groups.len());
        for members in groups {
            let mut group = self.select(batch, &members)?;
            let logits = self.run_step(&mut group)?;
            parts.push((members, group, logits));
        }
        let (stepped, logits) = self.reassemble(parts)?;
        *batch = stepped;
        Ok(logits)
    }

    fn keep(&self, batch: Seq2SeqBatch, rows: &[usize]) -> Result<Seq2SeqBatch, RunError> {
        if rows.iter().copied().eq(0..batch.len()) {
            return Ok(batch);
        }
        self.select(&batch, rows)
    }

    fn merge(
        &self,
        running: Seq2SeqBatch,
        joining: Seq2SeqBatch,
    ) -> Result<Seq2SeqBatch, RunError> {
        if running.is_empty() {
            return Ok(joining);
        }
        if joining.is_empty() {
            return Ok(running);
        }
        let width = running.source_width.max(joining.source_width);
        let all_running: Vec<usize> = (0..running.len()).collect();
        let all_joining: Vec<usize> = (0..joining.len()).collect();
        let fixed = running
            .fixed
            .iter()
            .zip(&joining.fixed)
            .map(|(a, b)| {
                let axis = source_axis(a.shape().len());
                gather_columns(
                    &[
                        (a, running.source_width, &all_running),
                        (b, joining.source_width, &all_joining),
                    ],
                    axis,
                    width,
                    Align::Left,
                )
            })
            .collect::<Result<_, _>>()?;
        let mut sources = running.sources;
        sources.extend(joining.sources);
        Ok(Seq2SeqBatch {
            decoded: self.step.concat(running.decoded, joining.decoded)?,
            fixed,
            fixed_inputs: running.fixed_inputs,
            sources,
            source_width: width,
        })
    }
}

struct FirstStepOutput {
    logits: Vec<Vec<f32>>,
    state: Vec<DynValue>,
    fixed: Vec<DynValue>,
}

/// Row indices grouped by key, groups in order of first appearance.
fn groups_by<K: PartialEq>(keys: impl Iterator<Item = K>) -> Vec<Vec<usize>> {
    let mut groups: Vec<(K, Vec<usize>)> = Vec::new();
    for (index, key) in keys.enumerate() {
        match groups.iter_mut().find(|(seen, _)| *seen == key) {
            Some((_, members)) => members.push(index),
            None => groups.push((key, vec![index])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

/// `[rows, width]` with 1 over each row's first `length` columns.
fn source_mask(
    lengths: impl Iterator<Item = usize>,
    width: usize,
) -> Result<Tensor<i64>, RunError> {
    let mut mask = Vec::new();
    let mut rows = 0;
    for length in lengths {
        mask.extend((0..width).map(|column| i64::from(column < length)));
        rows += 1;
    }
    Ok(Tensor::from_array(([rows, width], mask))?)
}
