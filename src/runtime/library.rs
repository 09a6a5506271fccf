//! Finds and loads `libonnxruntime.so` once per process (ort's `load-dynamic` feature).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// The command that fetches the library, quoted in the error when none is found.
pub const FETCH_COMMAND: &str = "make onnxruntime";

static ENVIRONMENT: OnceLock<ort::environment::Environment> = OnceLock::new();

/// Loads ONNX Runtime from the first candidate path that exists and creates the process-wide
/// environment, with an intra-op pool of `shared_threads` that every session without a pool of
/// its own runs on. Later calls return the same environment.
pub fn init(
    candidates: &[PathBuf],
    shared_threads: usize,
) -> anyhow::Result<&'static ort::environment::Environment> {
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
    let environment = build_environment(path, shared_threads)?;
    tracing::info!(library = %path.display(), shared_threads, "ONNX Runtime loaded");
    Ok(ENVIRONMENT.get_or_init(|| environment))
}

fn build_environment(
    path: &Path,
    shared_threads: usize,
) -> anyhow::Result<ort::environment::Environment> {
    // `init_from`'s error type does not convert into ort::Error, so it is mapped by hand.
    let builder = ort::init_from(path)
        .map_err(|error| anyhow::anyhow!("cannot load {}: {error}", path.display()))?;
    // One pool for every session: a request alone gets all its threads, and runs of different
    // models take turns on the same cores instead of each bringing threads of its own and
    // oversubscribing the host. Measured on all-MiniLM-L6-v2 (bench/RESULTS.md): one request
    // at a time went from 0.52x of the in-process one-per-run rate (two sessions of one own
    // thread) to 0.8-0.9x. Its threads spin between the operators of a run, which a decode
    // step's hundreds of small operators need, and every session stops them when its run ends
    // (`session.force_spinning_stop`, runtime::session).
    let pool = ort::environment::GlobalThreadPoolOptions::default()
        .with_intra_threads(shared_threads.max(1))
        .and_then(|options| options.with_spin_control(true))
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    builder
        .with_name("lmserve")
        .with_global_thread_pool(pool)
        .build()
        .map_err(|error| anyhow::anyhow!("{error}"))
        .with_context(|| {
            format!(
                "creating the ONNX Runtime environment from {}",
                path.display()
            )
        })
}
