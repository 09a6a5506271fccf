//! `lmserve inspect DIR`: what the server makes of a model folder, without starting a server —
//! the graph's inputs and outputs, the manifest it reads (or, when there is none, the one it
//! would infer from the graph), every effective setting with its source, and whether the
//! version loads.

use std::fmt::Write;
use std::path::Path;

use super::hf::HfFiles;
use super::manifest::{Family, MANIFEST_FILE, Manifest};
use super::settings::{ModelSettings, SettingRow};
use super::{loader, seq2seq};
use crate::config::ModelRuntime;
use crate::error::Task;
use crate::runtime::{GraphIo, TensorSpec};

/// The report, and whether the folder would load.
pub struct Report {
    pub text: String,
    pub loads: bool,
}

pub fn inspect(environment: &ort::environment::Environment, dir: &Path) -> anyhow::Result<Report> {
    // One session on the CPU is enough to read the graph and warm it up once.
    let runtime = ModelRuntime {
        intra_threads: 1,
        sessions: 1,
        narrow_lanes: 0,
        execution_providers: vec!["cpu".into()],
        required_provider: None,
    };
    if seq2seq::is_encoder_decoder(dir) {
        return inspect_encoder_decoder(environment, dir, &runtime);
    }
    let pool = loader::open_graph(environment, dir, &runtime)?;
    let graph = pool.graph().clone();
    let mut text = String::new();
    writeln!(text, "folder: {}", dir.display())?;
    write_tensors(&mut text, "graph inputs", &graph.inputs);
    write_tensors(&mut text, "graph outputs", &graph.outputs);

    let manifest = if dir.join(MANIFEST_FILE).is_file() {
        writeln!(text, "\nmanifest ({MANIFEST_FILE}):")?;
        let written = std::fs::read_to_string(dir.join(MANIFEST_FILE))?;
        for line in written.lines() {
            writeln!(text, "  {line}")?;
        }
        Manifest::read(dir)
    } else {
        match infer_manifest(&graph) {
            Some(inferred) => {
                writeln!(
                    text,
                    "\nmanifest (none in the folder; inferred from the graph, save it as {MANIFEST_FILE}):"
                )?;
                for line in inferred.lines() {
                    writeln!(text, "  {line}")?;
                }
                Manifest::parse(&inferred)
            }
            None => Err(anyhow::anyhow!(
                "no {MANIFEST_FILE}, and the graph is neither an optimum decoder (logits, present.N.*) nor an encoder (last_hidden_state, sentence_embedding, logits [batch, classes]); write one (see models/README.md)"
            )),
        }
    };

    let prepared = manifest.and_then(|manifest| {
        let files = HfFiles::read(dir)?;
        let tokenizer = loader::read_tokenizer(dir, &manifest, &files)?;
        Ok(loader::prepare(manifest, files, tokenizer, pool)?.settings)
    });
    finish(text, prepared)
}

/// Ends a report with the settings and "loads", or with why the folder does not load.
fn finish(mut text: String, prepared: anyhow::Result<ModelSettings>) -> anyhow::Result<Report> {
    let loads = match prepared {
        Ok(settings) => {
            writeln!(text, "\nsettings:")?;
            write_settings(&mut text, &settings.rows());
            writeln!(text, "\nresult: loads and runs")?;
            true
        }
        Err(error) => {
            writeln!(text, "\nresult: does not load: {error:#}")?;
            false
        }
    };
    Ok(Report { text, loads })
}

/// An encoder-decoder's folder: every graph its layout uses, its manifest (or the two lines an
/// optimum export needs), its settings and whether it loads.
fn inspect_encoder_decoder(
    environment: &ort::environment::Environment,
    dir: &Path,
    runtime: &ModelRuntime,
) -> anyhow::Result<Report> {
    let mut text = String::new();
    writeln!(text, "folder: {}", dir.display())?;
    let manifest = if dir.join(MANIFEST_FILE).is_file() {
        writeln!(text, "\nmanifest ({MANIFEST_FILE}):")?;
        for line in std::fs::read_to_string(dir.join(MANIFEST_FILE))?.lines() {
            writeln!(text, "  {line}")?;
        }
        Manifest::read(dir)
    } else {
        let inferred = "family = \"encoder-decoder\"\ntasks = [\"generate\"]\n";
        writeln!(
            text,
            "\nmanifest (none in the folder; an optimum seq2seq export needs only this, save it as {MANIFEST_FILE}):"
        )?;
        for line in inferred.lines() {
            writeln!(text, "  {line}")?;
        }
        Manifest::parse(inferred)
    };
    let pools = manifest.and_then(|manifest| {
        let pools = seq2seq::open(environment, &manifest, dir, runtime)?;
        Ok((manifest, pools))
    });
    let (manifest, pools) = match pools {
        Ok(opened) => opened,
        Err(error) => {
            writeln!(text, "\nresult: does not load: {error:#}")?;
            return Ok(Report { text, loads: false });
        }
    };
    for (role, graph) in pools.graphs() {
        writeln!(text)?;
        write_tensors(&mut text, &format!("{role} inputs"), &graph.inputs);
        write_tensors(&mut text, &format!("{role} outputs"), &graph.outputs);
    }
    let prepared = HfFiles::read(dir).and_then(|files| {
        let tokenizer = loader::read_tokenizer(dir, &manifest, &files)?;
        Ok(seq2seq::prepare(&manifest, &files, &tokenizer, pools)?.2)
    });
    finish(text, prepared)
}

/// The two-line manifest for a graph in one of the standard layouts, if it is in one.
pub fn infer_manifest(graph: &GraphIo) -> Option<String> {
    let output = |name: &str| graph.outputs.iter().find(|spec| spec.name == name);
    let has_cache = graph
        .outputs
        .iter()
        .any(|spec| spec.name.starts_with("present."))
        || graph
            .inputs
            .iter()
            .any(|spec| spec.name.starts_with("past_key_values."));
    let logits_rank = output("logits").map(|spec| spec.shape.len());
    let (family, tasks) = if has_cache || logits_rank == Some(3) {
        (Family::Decoder, vec![Task::Generate])
    } else {
        let mut tasks = Vec::new();
        if [
            "last_hidden_state",
            "token_embeddings",
            "sentence_embedding",
        ]
        .iter()
        .any(|name| output(name).is_some())
        {
            tasks.push(Task::Embed);
        }
        if logits_rank == Some(2) {
            tasks.push(Task::Classify);
        }
        if tasks.is_empty() {
            return None;
        }
        (Family::Encoder, tasks)
    };
    let family = family.as_str();
    let tasks: Vec<String> = tasks.iter().map(|task| format!("\"{task}\"")).collect();
    Some(format!(
        "family = \"{family}\"\ntasks = [{}]\n",
        tasks.join(", ")
    ))
}

fn write_tensors(text: &mut String, title: &str, specs: &[TensorSpec]) {
    let _ = writeln!(text, "{title}:");
    let width = specs.iter().map(|spec| spec.name.len()).max().unwrap_or(0);
    for spec in specs {
        let dims: Vec<String> = spec
            .shape
            .iter()
            .map(|&dim| if dim < 0 { "?".into() } else { dim.to_string() })
            .collect();
        let _ = writeln!(
            text,
            "  {:width$}  {:8} [{}]",
            spec.name,
            spec.dtype,
            dims.join(", ")
        );
    }
}

fn write_settings(text: &mut String, rows: &[SettingRow]) {
    let name_width = rows.iter().map(|row| row.name.len()).max().unwrap_or(0);
    let value_width = rows
        .iter()
        .map(|row| row.value.len())
        .max()
        .unwrap_or(0)
        .min(48);
    for row in rows {
        let _ = writeln!(
            text,
            "  {:name_width$}  {:value_width$}  ({})",
            row.name, row.value, row.source
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infers_the_standard_layouts() {
        let decoder = GraphIo {
            inputs: vec![
                TensorSpec::float32("input_ids", &[-1, -1]),
                TensorSpec::float32("past_key_values.0.key", &[-1, 2, -1, 8]),
            ],
            outputs: vec![
                TensorSpec::float32("logits", &[-1, -1, 9]),
                TensorSpec::float32("present.0.key", &[-1, 2, -1, 8]),
            ],
        };
        assert_eq!(
            infer_manifest(&decoder).unwrap(),
            "family = \"decoder\"\ntasks = [\"generate\"]\n"
        );
        let classifier = GraphIo {
            inputs: vec![TensorSpec::float32("input_ids", &[-1, -1])],
            outputs: vec![
                TensorSpec::float32("last_hidden_state", &[-1, -1, 8]),
                TensorSpec::float32("logits", &[-1, 2]),
            ],
        };
        assert_eq!(
            infer_manifest(&classifier).unwrap(),
            "family = \"encoder\"\ntasks = [\"embed\", \"classify\"]\n"
        );
        let unknown = GraphIo {
            inputs: vec![TensorSpec::float32("pixel_values", &[-1, 3, 224, 224])],
            outputs: vec![TensorSpec::float32("image_embeds", &[-1, 512])],
        };
        assert_eq!(infer_manifest(&unknown), None);
    }
}
