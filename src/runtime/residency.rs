//! Where the tensors a sequence carries from one run to the next live: its KV cache or recurrent
//! state, and an encoder-decoder's encoder outputs.
//!
//! A plain `Session::run` returns every output in host memory. On the CPU that is where they
//! are anyway; on CUDA it would copy a sequence's whole cache from the GPU after every step and
//! back before the next. So runs bind the carried outputs to the memory of the device that ran
//! them (ONNX Runtime I/O binding) and feed them to the next run where they are; only the
//! logits, which the sampler reads, come back to the host. Carried tensors reach the host only
//! when rows join or leave a batch and are gathered there (`host_readable`).

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynTensorValueType, DynValue};

use super::providers::Provider;
use super::step::RunError;

/// The memory a provider's runs read and write: the host's for the CPU, the GPU's for CUDA.
pub fn device_memory(provider: Provider) -> ort::Result<MemoryInfo<'static>> {
    match provider {
        Provider::Cpu => Ok(MemoryInfo::default()),
        Provider::Cuda { device } => MemoryInfo::new(
            AllocationDevice::CUDA,
            device,
            AllocatorType::Device,
            MemoryType::Default,
        ),
    }
}

/// Which outputs of a run to return, and where.
pub struct Placement<'a> {
    /// Outputs the host reads (logits).
    pub host: &'a [&'a str],
    /// Outputs fed to later runs, left in the memory of the provider that runs them.
    pub device: &'a [&'a str],
    pub provider: Provider,
}

/// The outputs of one run, by name.
pub struct PlacedOutputs(Vec<(String, DynValue)>);

impl PlacedOutputs {
    pub fn get(&self, name: &str) -> Result<&DynValue, RunError> {
        self.0
            .iter()
            .find(|(output, _)| output == name)
            .map(|(_, value)| value)
            .ok_or_else(|| RunError::MissingOutput(name.to_owned()))
    }

    pub fn take(&mut self, name: &str) -> Result<DynValue, RunError> {
        let at = self
            .0
            .iter()
            .position(|(output, _)| output == name)
            .ok_or_else(|| RunError::MissingOutput(name.to_owned()))?;
        Ok(self.0.swap_remove(at).1)
    }
}

/// Runs `session` on `feed`, returning the outputs `placement` names where it names them.
/// Inputs are fed from wherever they are; ONNX Runtime copies any that its kernels need
/// elsewhere.
pub fn run_placed(
    session: &mut Session,
    feed: &[(String, SessionInputValue<'_>)],
    placement: &Placement<'_>,
) -> Result<PlacedOutputs, RunError> {
    let mut binding = session.create_binding()?;
    for (name, value) in feed {
        binding.bind_input(name.as_str(), &**value)?;
    }
    let host = MemoryInfo::default();
    for &name in placement.host {
        binding.bind_output_to_device(name, &host)?;
    }
    let device = device_memory(placement.provider)?;
    for &name in placement.device {
        binding.bind_output_to_device(name, &device)?;
    }
    let outputs = session.run_binding(&binding)?;
    Ok(PlacedOutputs(
        outputs
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect(),
    ))
}

/// A host copy of `value` when it lives where the host cannot read it (a GPU), else `None`:
/// `value` itself is readable.
pub fn host_readable(value: &DynValue) -> Result<Option<DynValue>, RunError> {
    let tensor = value.view().downcast::<DynTensorValueType>()?;
    if tensor.memory_info().is_cpu_accessible() {
        return Ok(None);
    }
    Ok(Some(tensor.to(AllocationDevice::CPU, 0)?.into_dyn()))
}

#[cfg(test)]
mod tests {
    use ort::value::Tensor;

    use super::*;

    #[test]
    fn cuda_runs_keep_state_where_the_host_cannot_read_it() {
        let cuda = device_memory(Provider::Cuda { device: 1 }).unwrap();
        assert_eq!(cuda.allocation_device(), AllocationDevice::CUDA);
        assert_eq!(cuda.device_id(), 1);
        assert!(!cuda.is_cpu_accessible());
        assert!(device_memory(Provider::Cpu).unwrap().is_cpu_accessible());
    }

    #[test]
    fn host_tensors_are_read_where_they_are() {
        let value = Tensor::from_array(([2_usize], vec![1.0_f32, 2.0]))
            .unwrap()
            .into_dyn();
        assert!(host_readable(&value).unwrap().is_none());
    }
}
