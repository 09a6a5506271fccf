//! A causal decoder whose graph writes each step's keys and values into the cache buffers it is
//! fed (onnxruntime's GroupQueryAttention, with one buffer bound as both past and present), so
//! a step neither concatenates nor reallocates the cache: it binds the same buffers again.
//!
//! Rows are left-aligned: row `b`'s cache holds its `fed` tokens in columns `0..fed` of its slot
//! in buffers `[slots, heads, capacity, head_dim]` (`cache_buffers`), and the graph learns each
//! row's length from `seqlens_k`. Rows joining a batch are copied into its free slots, and a
//! leaving row's slot is refilled by moving a later row down; the buffers are laid out anew only
//! when the slots run out, when rows are reordered (beams), or when a row outgrows the capacity,
//! which then grows to `GROWTH` columns beyond what is needed.
//!
//! The buffers are float32 or float16, as the graph declares them, and live where the graph's
//! attention reads them. onnxruntime's GroupQueryAttention has CUDA kernels for float16 and
//! bfloat16 only: so under CUDA a float16 graph's buffers stay in GPU memory, where a step
//! reads and writes them and only rows joining or leaving, or a row outgrowing the capacity,
//! pass them through the host (GPU buffers hold exactly their rows: no free slots), while a
//! float32 graph runs that operator on the CPU, over buffers in host memory (`models/real`
//! writes SmolLM2 in float16 for GPUs).

use ort::memory::{Allocator, MemoryInfo};
use ort::session::Session;
use ort::value::{Tensor, TensorElementType};

use super::cache_buffers::{CacheBuffers, RowMove};
use super::graph::{Row, StepGraph};
use crate::runtime::providers::Provider;
use crate::runtime::residency;
use crate::runtime::step::{RowBatch, RunError, StepDecoder};

/// Columns a buffer gets beyond the longest row when it is allocated: steps run that many
/// times before the cache is copied into a larger one.
const GROWTH: usize = 128;

/// Slots host buffers get for `rows` rows: room for as many again, and at least 8, so that rows
/// joining later are copied into free slots. Slots no row has reached yet cost address space,
/// not memory; a batch that has shrunk to a quarter of its slots is laid out anew (`keep`).
fn slots_for(rows: usize) -> usize {
    (rows * 2).max(8)
}

/// Sequences decoded together, each row's cache left-aligned in its slot of the buffers.
pub struct SharedCacheBatch {
    rows: Vec<Row>,
    /// The buffers rows `0..rows.len()` occupy the first slots of; none while the batch is empty.
    buffers: Option<CacheBuffers>,
}

impl SharedCacheBatch {
    fn buffers(&self) -> &CacheBuffers {
        self.buffers
            .as_ref()
            .expect("a batch with rows has buffers")
    }

    fn buffers_mut(&mut self) -> &mut CacheBuffers {
        self.buffers
            .as_mut()
            .expect("a batch with rows has buffers")
    }
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
            buffers: None,
        }
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

    /// New buffers for `rows` rows of `capacity` columns, where the graph reads them, zeroed.
    fn allocate(
        &self,
        session: &Session,
        rows: usize,
        capacity: usize,
    ) -> Result<CacheBuffers, RunError> {
        match self.gpu() {
            None => self.host_buffers(rows, capacity),
            Some(device) => self.upload(
                CacheBuffers::host(self.graph.state_type, &self.layouts, rows, capacity)?,
                session,
                device,
            ),
        }
    }

    /// `buffers` copied into the memory of CUDA device `device`, from `session`'s allocator.
    fn upload(
        &self,
        buffers: CacheBuffers,
        session: &Session,
        device: i32,
    ) -> Result<CacheBuffers, RunError> {
        let memory = residency::device_memory(Provider::Cuda { device })?;
        buffers.upload(&Allocator::new(session, memory)?)
    }

    /// Host buffers for `rows` rows with free slots (`slots_for`), or without them where the
    /// host cannot give the memory for both.
    fn host_buffers(&self, rows: usize, capacity: usize) -> Result<CacheBuffers, RunError> {
        let element = self.graph.state_type;
        CacheBuffers::host(element, &self.layouts, slots_for(rows), capacity)
            .or_else(|_| CacheBuffers::host(element, &self.layouts, rows, capacity))
    }

    /// A batch of `rows`, each taken from a source batch as `(source, row)`, in buffers laid out
    /// anew with `capacity` columns: every picked row's cached columns are copied.
    fn assemble(
        &self,
        sources: &[&SharedCacheBatch],
        picks: &[(usize, usize)],
        capacity: usize,
    ) -> Result<SharedCacheBatch, RunError> {
        // Laid out in host memory, from host copies of buffers on a GPU (which hold exactly
        // their rows): rows join and leave far less often than steps run.
        let mut buffers = match self.gpu() {
            Some(_) => {
                CacheBuffers::host(self.graph.state_type, &self.layouts, picks.len(), capacity)?
            }
            None => self.host_buffers(picks.len(), capacity)?,
        };
        for (index, source) in sources.iter().enumerate() {
            let moves: Vec<RowMove> = picks
                .iter()
                .enumerate()
                .filter(|(_, (from, _))| *from == index)
                .map(|(to, &(_, row))| RowMove {
                    from: row,
                    to,
                    columns: source.rows[row].fed,
                })
                .collect();
            if !moves.is_empty() {
                buffers.copy_rows_from(source.buffers(), &moves)?;
            }
        }
        if let Some(device) = self.gpu() {
            buffers = self.upload(buffers, &self.graph.session(), device)?;
        }
        let rows = picks
            .iter()
            .map(|&(source, row)| sources[source].rows[row].clone())
            .collect();
        Ok(SharedCacheBatch {
            rows,
            buffers: Some(buffers),
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
        let logits_name = bindings
            .logits
            .as_deref()
            .expect("decoders have a logits output (checked at load)");
        binding.bind_output_to_device(logits_name, &MemoryInfo::default())?;
        // A graph may return every column's logits; each row's newest token is its last real one.
        let newest: Vec<usize> = if columns == 1 {
            vec![0; rows]
        } else {
            lengths.iter().map(|&len| len - 1).collect()
        };
        batch
            .buffers_mut()
            .run(session, binding, &bindings.state, rows, |outputs| {
                let (shape, data) = outputs
                    .get(logits_name)
                    .ok_or_else(|| RunError::MissingOutput(logits_name.to_owned()))?
                    .try_extract_tensor::<f32>()?;
                Ok(newest_logits(shape, data, &newest))
            })
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
        let mut session = self.graph.session();
        let buffers = self.allocate(&session, prompts.len(), width + self.growth)?;
        let mut batch = SharedCacheBatch {
            rows: Vec::new(),
            buffers: Some(buffers),
        };
        let logits = self.run(&mut session, &mut batch, ids, &lengths)?;
        batch.rows = prompts.into_iter().map(Row::new).collect();
        Ok((batch, logits))
    }

    fn step(&mut self, batch: &mut SharedCacheBatch) -> Result<Vec<Vec<f32>>, RunError> {
        let longest = batch.rows.iter().map(|row| row.fed).max().unwrap_or(0);
        if longest + 1 > batch.buffers().capacity() {
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

    fn keep(
        &self,
        mut batch: SharedCacheBatch,
        rows: &[usize],
    ) -> Result<SharedCacheBatch, RunError> {
        if rows.iter().copied().eq(0..batch.rows.len()) {
            return Ok(batch);
        }
        if rows.is_empty() {
            return Ok(Self::empty_batch());
        }
        let in_order = rows.windows(2).all(|pair| pair[0] < pair[1]);
        let buffers = batch.buffers();
        // Kept where they are unless a quarter of the slots would hold every row.
        let roomy = rows.len() * 4 < buffers.slots() && slots_for(rows.len()) < buffers.slots();
        if in_order && buffers.in_host_memory() && !roomy {
            // Rows leave and the others keep their order: each moves down into the first free
            // slot, and rows already in place are not copied.
            let moves: Vec<RowMove> = rows
                .iter()
                .enumerate()
                .filter(|&(to, &from)| from != to)
                .map(|(to, &from)| RowMove {
                    from,
                    to,
                    columns: batch.rows[from].fed,
                })
                .collect();
            batch.buffers_mut().move_rows_down(&moves);
            let mut old: Vec<Option<Row>> = batch.rows.drain(..).map(Some).collect();
            batch.rows = rows
                .iter()
                .map(|&row| old[row].take().expect("each row is kept once"))
                .collect();
            return Ok(batch);
        }
        let picks: Vec<(usize, usize)> = rows.iter().map(|&row| (0, row)).collect();
        let capacity = batch.buffers().capacity();
        self.assemble(&[&batch], &picks, capacity)
    }

    fn merge(
        &self,
        mut running: SharedCacheBatch,
        joining: SharedCacheBatch,
    ) -> Result<SharedCacheBatch, RunError> {
        if running.rows.is_empty() {
            return Ok(joining);
        }
        if joining.rows.is_empty() {
            return Ok(running);
        }
        let (before, total) = (running.rows.len(), running.rows.len() + joining.rows.len());
        let buffers = running.buffers_mut();
        let longest_joining = joining.rows.iter().map(|row| row.fed).max().unwrap_or(0);
        if buffers.in_host_memory()
            && total <= buffers.slots()
            && longest_joining <= buffers.capacity()
        {
            // The joining rows go into the running batch's free slots; its own rows stay put.
            let moves: Vec<RowMove> = joining
                .rows
                .iter()
                .enumerate()
                .map(|(row, joiner)| RowMove {
                    from: row,
                    to: before + row,
                    columns: joiner.fed,
                })
                .collect();
            buffers.copy_rows_from(joining.buffers(), &moves)?;
            running.rows.extend(joining.rows);
            return Ok(running);
        }
        let picks: Vec<(usize, usize)> = (0..before)
            .map(|row| (0, row))
            .chain((0..joining.rows.len()).map(|row| (1, row)))
            .collect();
        let capacity = running
            .buffers()
            .capacity()
            .max(joining.buffers().capacity());
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
