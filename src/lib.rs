//! lmserve: a gRPC model server for ONNX language models.
//!
//! The request path runs down this list; dependencies point down it only:
//! `api` (tonic) → `tasks` → `registry` → `scheduling` → `runtime` (ort).
//! `config`, `telemetry`, `error`, `kinds` and `paths` are leaves anyone may use.

pub mod api;
pub mod app;
pub mod config;
pub mod engine;
pub mod error;
pub mod kinds;
pub mod paths;
pub mod registry;
pub mod runtime;
pub mod tasks;
pub mod telemetry;
