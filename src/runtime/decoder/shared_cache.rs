//! A causal decoder whose graph writes each step's keys and values into the cache buffers it is
//! fed (onnxruntime's GroupQueryAttention, with one buffer bound as both past and present), so
//! a step neither concatenates nor reallocates the cache: it binds the same buffers again.
//!
//! Rows are left-aligned: row `b`'s cache holds its `fed` tokens in columns `0..fed` of a buffer
//! `[rows, heads, capacity, head_dim]`, and the graph learns each row's length from
//! `seqlens_k`. The buffers are copied only when rows join or leave, or when a row outgrows
//! the capacity, which then grows to `GROWTH` columns beyond what is needed.
//!
//! The buffers are float32 or float16, as the graph declares them, and live where the graph's
//! attention reads them. onnxruntime's GroupQueryAttention has CUDA kernels for float16 and
//! bfloat16 only: so under CUDA a float16 graph's buffers stay in GPU memory, where a step
//! reads and writes them and only rows joining or leaving pass them through the host, while a
//! float32 graph runs that operator on the CPU, over buffers in host memory (`models/real`
//! writes SmolLM2 in float16 for GPUs).

use std::borrow::Cow;

use half::f16;
use ort::memory::{AllocationDevice, Allocator, MemoryInfo};
use ort::session::Session;
use ort::value::{DynTensor, PrimitiveTensorElementType, Tensor, TensorElementType};

use super::graph::{Row, StepGraph};
use crate::runtime::providers::Provider;
use crate::runtime::residency;
use crate::runtime::step::{RowBatch, RunError, StepDecoder};

/// Columns a buffer gets beyond the longest row when it is allocated: steps run that many
/// times before the cache is copied into a larger one.
const GROWTH: usize = 128;

/// Sequences decoded together, each row's cache left-aligned in the shared buffers.
pub struct SharedCacheBatch {
    rows: Vec<Row>,
    /// One buffer `[rows, heads, capacity, head_dim]` per state pair, in `bindings.state` order.
    buffers: Vec<DynTensor>,
    capacity: usize,
}

impl RowBatch for SharedCacheBatch {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn push_token(&mut self, row: usize, token: i64) {
        self.rows[row].tokens.push(token);
    }
}

pub struct SharedCacheDecoder {
    graph: StepGraph,
    /// `[heads, head_dim]` of each state pair's buffer, from the graph's declared shapes.
    layouts: Vec<(usize, usize)>,
    /// Columns of headroom a buffer is allocated with: `GROWTH`.
    growth: usize,
}

impl SharedCacheDecoder {
    /// Checks that every cache input declares its heads and head size, which size the buffers.
    pub fn new(graph: StepGraph) -> Result<Self, String> {
        let mut layouts = Vec::with_capacity(graph.state_shapes.len());
        for (shape, pair) in graph.state_shapes.iter().zip(&graph.bindings.state) {
            match shape.as_slice() {
                &[_, heads, _, dim] if heads > 0 && dim > 0 => {
                    layouts.push((heads as usize, dim as usize));
                }
                _ => {
                    return Err(format!(
                        "cache input `{}` written in place must be [batch, heads, capacity, head_dim] with fixed heads and head_dim, got {shape:?}",
                        pair.input
                    ));
                }
            }
        }
        Ok(Self {
            graph,
            layouts,
            growth: GROWTH,
        })
    }

    /// Allocates buffers with `columns` of headroom instead of `GROWTH`: with 1, every step
    /// outgrows its buffers, which tests use to check the copy.
    pub fn with_growth(mut self, columns: usize) -> Self {
        self.growth = columns.max(1);
        self
    }

    fn empty_batch() -> SharedCacheBatch {
        SharedCacheBatch {
            rows: Vec::new(),
            buffers: Vec::new(),
            capacity: 0,
        }
    }

    /// Buffers for `rows` rows of `capacity` columns from `allocator` (ort zeroes host memory; GPU
    /// memory is left as it was). The graph reads only each row's first `seqlens_k + 1`
    /// columns, which a copy or a run has written: filling the rest with NaN left the
    /// real-model parity tests, batched rows of different lengths included, token-identical.
    fn allocate(
        &self,
        allocator: &Allocator,
        rows: usize,
        capacity: usize,
    ) -> Result<Vec<DynTensor>, RunError> {
        self.layouts
            .iter()
            .map(|&(heads, dim)| {
                Ok(DynTensor::new(
                    allocator,
                    self.graph.state_type,
                    [rows, heads, capacity, dim],
                )?)
            })
            .collect()
    }

    /// The CUDA device the buffers live on, if not in host memory: see the module's comment.
    fn gpu(&self) -> Option<i32> {
        match self.graph.pool.provider() {
            Provider::Cpu => None,
            Provider::Cuda { device } => {
                (self.graph.state_type == TensorElementType::Float16).then_some(device)
            }
        }
    }

    /// The allocator of the memory the buffers live in.
    fn buffer_allocator(&self, session: &Session) -> Result<Allocator, RunError> {
        let Some(device) = self.gpu() else {
            return Ok(Allocator::default());
        };
        let memory = residency::device_memory(Provider::Cuda { device })?;
        Ok(Allocator::new(session, memory)?)
    }

    /// A batch of `rows`, each taken from a source batch as `(source, row)`, in buffers of
    /// `capacity` columns: every source row's cached columns are copied.
    fn assemble(
        &self,
        sources: &[&SharedCacheBatch],
        picks: &[(usize, usize)],
        capacity: usize,
    ) -> Result<SharedCacheBatch, RunError> {
        // Assembled in host memory, from host copies of buffers on a GPU: rows join and leave
        // far less often than steps run, and a step copies nothing.
        let mut buffers = self.allocate(&Allocator::default(), picks.len(), capacity)?;
        for (index, buffer) in buffers.iter_mut().enumerate() {
            let readable = sources
                .iter()
                .map(|source| host_readable(&source.buffers[index]))
                .collect::<Result<Vec<_>, _>>()?;
            let copy = RowCopy {
                layout: self.layouts[index],
                sources,
                picks,
                capacity,
            };
            match self.graph.state_type {
                TensorElementType::Float16 => copy.run::<f16>(&readable, buffer)?,
                _ => copy.run::<f32>(&readable, buffer)?,
            }
        }
        if let Some(device) = self.gpu() {
            buffers = buffers
                .iter()
                .map(|buffer| buffer.to(AllocationDevice::CUDA, device))
                .collect::<Result<_, _>>()?;
        }
        let rows = picks
            .iter()
            .map(|&(source, row)| sources[source].rows[row].clone())
            .collect();
        Ok(SharedCacheBatch {
            rows,
            buffers,
            capacity,
        })
    }

    /// One run over `ids` (`[rows, columns]`, right-padded), `lengths` being each row's tokens
    /// after it; the graph writes the new columns into the batch's buffers.
    fn run(
        &self,
        session: &mut Session,
        batch: &mut SharedCacheBatch,
        ids: Vec<i64>,
        lengths: &[usize],
    ) -> Result<Vec<Vec<f32>>, RunError> {
        let rows = lengths.len();
        let columns = ids.len() / rows.max(1);
        let bindings = &self.graph.bindings;
        let total = lengths.iter().copied().max().unwrap_or(0);
        let seqlens: Vec<i32> = lengths.iter().map(|&len| len as i32 - 1).collect();
        let mut binding = session.create_binding()?;
        binding.bind_input(
            &bindings.input_ids,
            &Tensor::from_array(([rows, columns], ids))?,
        )?;
        let lengths_name = bindings.seqlens_k.as_deref().expect("checked at load");
        binding.bind_input(lengths_name, &Tensor::from_array(([rows], seqlens))?)?;
        let total_name = bindings
            .total_sequence_length
            .as_deref()
            .expect("checked at load");
        binding.bind_input(
            total_name,
            &Tensor::from_array((Vec::<usize>::new(), vec![total as i32]))?,
        )?;
        for (pair, buffer) in bindings.state.iter().zip(&mut batch.buffers) {
            // The same value as input and output: the graph sees one buffer and writes in place.
            binding.bind_input(&pair.input, buffer)?;
            binding.bind_output(&pair.output, &mut *buffer)?;
        }
        let logits_name = bindings
            .logits
            .as_deref()
            .expect("decoders have a logits output (checked at load)");
        binding.bind_output_to_device(logits_name, &MemoryInfo::default())?;
        let outputs = session.run_binding(&binding)?;
        let (shape, data) = outputs
            .get(logits_name)
            .ok_or_else(|| RunError::MissingOutput(logits_name.to_owned()))?
            .try_extract_tensor::<f32>()?;
        // A graph may return every column's logits; each row's newest token is its last real one.
        let newest: Vec<usize> = if columns == 1 {
            vec![0; rows]
        } else {
            lengths.iter().map(|&len| len - 1).collect()
        };
        Ok(newest_logits(shape, data, &newest))
    }
}

/// `value` where the host can read it: itself, or a copy of a buffer on a GPU.
fn host_readable(value: &DynTensor) -> Result<Cow<'_, DynTensor>, RunError> {
    if value.memory_info().is_cpu_accessible() {
        return Ok(Cow::Borrowed(value));
    }
    Ok(Cow::Owned(value.to(AllocationDevice::CPU, 0)?))
}

/// Which rows of which batches a new batch's buffer takes, for one state pair.
struct RowCopy<'a> {
    /// `(heads, head_dim)` of the buffers.
    layout: (usize, usize),
    sources: &'a [&'a SharedCacheBatch],
    /// `(source, row)` for each row of the new buffer, in order.
    picks: &'a [(usize, usize)],
    capacity: usize,
}

impl RowCopy<'_> {
    /// Copies each picked row's cached columns from `readable` (the sources' buffers, readable
    /// by the host) into `target`, a host buffer of `capacity` columns.
    fn run<T: PrimitiveTensorElementType + Copy>(
        &self,
        readable: &[Cow<'_, DynTensor>],
        target: &mut DynTensor,
    ) -> Result<(), RunError> {
        let (heads, dim) = self.layout;
        let target = target.try_extract_tensor_mut::<T>()?.1;
        for (to, &(source, row)) in self.picks.iter().enumerate() {
            let from = self.sources[source];
            let data = readable[source].try_extract_tensor::<T>()?.1;
            let columns = from.rows[row].fed * dim;
            for head in 0..heads {
                let read = (row * heads + head) * from.capacity * dim;
                let write = (to * heads + head) * self.capacity * dim;
                target[write..write + columns].copy_from_slice(&data[read..read + columns]);
            }
        }
        Ok(())
    }
}

/// Row `r`'s logits at column `newest[r]` of `[rows, columns, vocab]`, or of `[rows, 1, vocab]`
/// and `[rows, vocab]` where the graph already picked each row's newest column.
fn newest_logits(shape: &[i64], data: &[f32], newest: &[usize]) -> Vec<Vec<f32>> {
    let vocab = *shape.last().unwrap_or(&0) as usize;
    let columns = if shape.len() == 3 {
        shape[1] as usize
    } else {
        1
    };
    newest
        .iter()
        .enumerate()
        .map(|(row, &column)| {
            let column = if columns == 1 { 0 } else { column };
            let start = (row * columns + column) * vocab;
            data[start..start + vocab].to_vec()
        })
        .collect()
}

impl StepDecoder for SharedCacheDecoder {
    type Batch = SharedCacheBatch;

    fn empty(&self) -> SharedCacheBatch {
        Self::empty_batch()
    }

    fn prefill(
        &mut self,
        prompts: Vec<Vec<i64>>,
    ) -> Result<(SharedCacheBatch, Vec<Vec<f32>>), RunError> {
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let mut ids = Vec::with_capacity(prompts.len() * width);
        for prompt in &prompts {
            ids.extend_from_slice(prompt);
            ids.extend(std::iter::repeat_n(self.graph.pad_id, width - prompt.len()));
        }
        let capacity = width + self.growth;
        let mut session = self.graph.session();
        let allocator = self.buffer_allocator(&session)?;
        let mut batch = SharedCacheBatch {
            rows: Vec::new(),
            buffers: self.allocate(&allocator, prompts.len(), capacity)?,
            capacity,
        };
        let logits = self.run(&mut session, &mut batch, ids, &lengths)?;
        batch.rows = prompts.into_iter().map(Row::new).collect();
        Ok((batch, logits))
    }

    fn step(&mut self, batch: &mut SharedCacheBatch) -> Result<Vec<Vec<f32>>, RunError> {
        let longest = batch.rows.iter().map(|row| row.fed).max().unwrap_or(0);
        if longest + 1 > batch.capacity {
            let all: Vec<(usize, usize)> = (0..batch.rows.len()).map(|row| (0, row)).collect();
            *batch = self.assemble(&[&*batch], &all, longest + 1 + self.growth)?;
        }
        let ids = batch.rows.iter().map(Row::pending).collect();
        let lengths: Vec<usize> = batch.rows.iter().map(|row| row.fed + 1).collect();
        let logits = self.run(&mut self.graph.session(), batch, ids, &lengths)?;
        for row in &mut batch.rows {
            row.fed += 1;
        }
        Ok(logits)
    }

    fn keep(&self, batch: SharedCacheBatch, rows: &[usize]) -> Result<SharedCacheBatch, RunError> {
        if rows.iter().copied().eq(0..batch.rows.len()) {
            return Ok(batch);
        }
        if rows.is_empty() {
            return Ok(Self::empty_batch());
        }
        let picks: Vec<(usize, usize)> = rows.iter().map(|&row| (0, row)).collect();
        self.assemble(&[&batch], &picks, batch.capacity)
    }

    fn merge(
        &self,
        running: SharedCacheBatch,
        joining: SharedCacheBatch,
    ) -> Result<SharedCacheBatch, RunError> {
        if running.rows.is_empty() {
            return Ok(joining);
        }
        if joining.rows.is_empty() {
            return Ok(running);
        }
        let picks: Vec<(usize, usize)> = (0..running.rows.len())
            .map(|row| (0, row))
            .chain((0..joining.rows.len()).map(|row| (1, row)))
            .collect();
        let capacity = running.capacity.max(joining.capacity);
        self.assemble(&[&running, &joining], &picks, capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_logits_reads_each_rows_own_column_or_the_only_one() {
        // 2 rows, 2 columns, vocab 2: row 0's newest is column 0, row 1's column 1.
        let data = [0., 1., 2., 3., 4., 5., 6., 7.];
        assert_eq!(
            newest_logits(&[2, 2, 2], &data, &[0, 1]),
            vec![vec![0., 1.], vec![6., 7.]]
        );
        // The graph picked them already: [rows, 1, vocab].
        assert_eq!(
            newest_logits(&[2, 1, 2], &data[..4], &[5, 9]),
            vec![vec![0., 1.], vec![2., 3.]]
        );
    }
}
