//! ONNX Runtime: the shared library, sessions on worker threads, execution providers, tensors.

pub mod batch_size;
pub mod bindings;
pub mod decoder;
pub mod encoder;
pub mod library;
pub mod memory;
pub mod placement;
pub mod providers;
pub mod residency;
pub mod session;
pub mod shared_weights;
pub mod step;
pub mod warmup;

pub use session::{GraphIo, SessionPool, TensorSpec};

/// Runs `rows` through `run` in groups of one length (`length_of`), and returns the outputs in
/// the rows' order: how a graph that cannot be told where a row's padding is (no attention
/// mask, no positions) still batches, since padded it would read the pads as tokens.
pub fn run_by_length<R, O, E>(
    rows: &[R],
    length_of: impl Fn(&R) -> usize,
    mut run: impl FnMut(&[&R]) -> Result<Vec<O>, E>,
) -> Result<Vec<O>, E> {
    let mut lengths: Vec<usize> = rows.iter().map(&length_of).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let mut outputs: Vec<Option<O>> = std::iter::repeat_with(|| None).take(rows.len()).collect();
    for length in lengths {
        let (indices, group): (Vec<usize>, Vec<&R>) = rows
            .iter()
            .enumerate()
            .filter(|(_, row)| length_of(row) == length)
            .unzip();
        for (index, output) in indices.into_iter().zip(run(&group)?) {
            outputs[index] = Some(output);
        }
    }
    Ok(outputs
        .into_iter()
        .map(|output| output.expect("every row is in one group"))
        .collect())
}
