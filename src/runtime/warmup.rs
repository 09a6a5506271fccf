//! One throwaway run per session at load time: it proves the graph accepts the inputs the
//! bindings will feed, and pays ONNX Runtime's first-run costs before traffic arrives.

use half::f16;
use ort::session::Session;
use ort::value::{DynValue, Tensor, TensorElementType};

use super::bindings::Bindings;
use super::session::TensorSpec;

/// Runs one token through `session`, with empty (or zero) carried state.
pub fn run(
    session: &mut Session,
    bindings: &Bindings,
    inputs: &[TensorSpec],
    token: i64,
) -> ort::Result<()> {
    let mut values: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
    for spec in inputs {
        let value: DynValue = if spec.name == bindings.input_ids {
            Tensor::from_array(([1_usize, 1], vec![token]))?.into_dyn()
        } else if bindings.position_ids.as_deref() == Some(&spec.name)
            || bindings.token_type_ids.as_deref() == Some(&spec.name)
        {
            Tensor::from_array(([1_usize, 1], vec![0_i64]))?.into_dyn()
        } else if bindings.attention_mask.as_deref() == Some(&spec.name) {
            Tensor::from_array(([1_usize, 1], vec![1_i64]))?.into_dyn()
        } else if bindings.seqlens_k.as_deref() == Some(&spec.name) {
            // One row of one token: its length minus one.
            Tensor::from_array(([1_usize], vec![0_i32]))?.into_dyn()
        } else if bindings.total_sequence_length.as_deref() == Some(&spec.name) {
            Tensor::from_array((Vec::<usize>::new(), vec![1_i32]))?.into_dyn()
        } else {
            // Carried state: batch 1, every other dynamic axis (the past length) empty.
            let shape: Vec<usize> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(axis, &dim)| {
                    if dim >= 0 {
                        dim as usize
                    } else if axis == 0 {
                        1
                    } else {
                        0
                    }
                })
                .collect();
            let len = shape.iter().product();
            if spec.float_type() == Some(TensorElementType::Float16) {
                Tensor::from_array((shape, vec![f16::ZERO; len]))?.into_dyn()
            } else {
                Tensor::from_array((shape, vec![0.0_f32; len]))?.into_dyn()
            }
        };
        values.push((spec.name.clone(), value));
    }
    session.run(values)?;
    Ok(())
}
