//! Finds and loads `libonnxruntime.so` once per process (ort's `load-dynamic` feature).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// The command that fetches the library, quoted in the error when none is found.
pub const FETCH_COMMAND: &str = "make onnxruntime";

static ENVIRONMENT: OnceLock<ort::environment::Environment> = OnceLock::new();

/// Loads ONNX Runtime from the first candidate path that exists and creates the process-wide
/// environment. Later calls return the same environment.
pub fn init(candidates: &[PathBuf]) -> anyhow::Result<&'static ort::environment::Environment> {
    if let Some(environment) = ENVIRONMENT.get() {
        return Ok(environment);
    }
    let Some(path) = candidates.iter().find(|path| path.is_file()) else {
        bail!(
            "ONNX Runtime library not found (looked in: {}). Run `{FETCH_COMMAND}` to fetch it, \
             or set runtime.ort_library / ORT_DYLIB_PATH to a libonnxruntime.so 1.31",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let environment = build_environment(path)?;
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    Ok(ENVIRONMENT.get_or_init(|| environment))
}

fn build_environment(path: &Path) -> anyhow::Result<ort::environment::Environment> {
    // `init_from`'s error type does not convert into ort::Error, so it is mapped by hand.
    let builder = ort::init_from(path)
        .map_err(|error| anyhow::anyhow!("cannot load {}: {error}", path.display()))?;
    builder
        .with_name("lmserve")
        .build()
        .map_err(|error| anyhow::anyhow!("{error}"))
        .with_context(|| {
            format!(
                "creating the ONNX Runtime environment from {}",
                path.display()
            )
        })
}
