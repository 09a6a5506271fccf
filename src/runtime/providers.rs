//! Execution providers named in config (`cpu`, `cuda:0`), parsed and registered one at a time so
//! the server knows — and reports — which one actually runs a model.

use std::fmt;

use ort::ep::{self, ExecutionProviderDispatch};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Cpu,
    Cuda { device: i32 },
}

impl Provider {
    pub fn parse(name: &str) -> Result<Self, String> {
        let name = name.trim().to_ascii_lowercase();
        match name.split_once(':') {
            None if name == "cpu" => Ok(Provider::Cpu),
            None if name == "cuda" => Ok(Provider::Cuda { device: 0 }),
            Some(("cuda", device)) => device
                .parse::<i32>()
                .ok()
                .filter(|device| *device >= 0)
                .map(|device| Provider::Cuda { device })
                .ok_or_else(|| format!("`{name}`: the CUDA device must be a number, e.g. cuda:0")),
            _ => Err(format!(
                "unknown execution provider `{name}`; known: cpu, cuda, cuda:N"
            )),
        }
    }

    /// The dispatch ort registers; it fails loudly so a fallback is always our decision, not ort's.
    pub fn dispatch(self) -> ExecutionProviderDispatch {
        match self {
            Provider::Cpu => ep::CPU::default().build().error_on_failure(),
            Provider::Cuda { device } => ep::CUDA::default()
                .with_device_id(device)
                .build()
                .error_on_failure(),
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Provider::Cpu => f.write_str("cpu"),
            Provider::Cuda { device } => write!(f, "cuda:{device}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!(Provider::parse("cpu"), Ok(Provider::Cpu));
        assert_eq!(Provider::parse("CUDA:1"), Ok(Provider::Cuda { device: 1 }));
        assert_eq!(Provider::parse("cuda"), Ok(Provider::Cuda { device: 0 }));
        assert!(Provider::parse("cuda:x").is_err());
        assert!(Provider::parse("tpu").is_err());
    }
}
