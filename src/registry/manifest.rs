//! The manifest `model.toml` beside each `model.onnx`: what the model is and how its tensors
//! map to roles. Parsing and self-consistency only; matching it to the graph is `bindings`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::error::Task;
pub use crate::runtime::encoder::Pooling;

pub const MANIFEST_FILE: &str = "model.toml";
pub const MODEL_FILE: &str = "model.onnx";
pub const DEFAULT_TOKENIZER_FILE: &str = "tokenizer.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Causal language model, with a KV cache when the graph carries one.
    Decoder,
    /// Recurrent language model carrying a hidden state from step to step.
    Rnn,
    /// Bidirectional encoder for embeddings and classification.
    Encoder,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub family: Family,
    pub tasks: Vec<Task>,
    #[serde(default)]
    pub description: String,
    /// Longest token sequence the model accepts.
    pub max_length: usize,
    #[serde(default = "default_tokenizer")]
    pub tokenizer: PathBuf,
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub tensors: TensorNames,
    /// Carried state: output name = input name.
    #[serde(default)]
    pub state: BTreeMap<String, String>,
    pub embed: Option<EmbedSettings>,
    pub classify: Option<ClassifySettings>,
}

/// Graph names for each role; unset roles fall back to the standard optimum names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorNames {
    pub input_ids: Option<String>,
    pub attention_mask: Option<String>,
    pub position_ids: Option<String>,
    pub logits: Option<String>,
    pub hidden_states: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedSettings {
    #[serde(default = "default_pooling")]
    pub pooling: Pooling,
    #[serde(default = "default_true")]
    pub normalize: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifySettings {
    pub labels: Vec<String>,
    #[serde(default)]
    pub multi_label: bool,
}

fn default_tokenizer() -> PathBuf {
    PathBuf::from(DEFAULT_TOKENIZER_FILE)
}

fn default_pooling() -> Pooling {
    Pooling::Mean
}

fn default_true() -> bool {
    true
}

impl Manifest {
    pub fn read(version_dir: &Path) -> anyhow::Result<Self> {
        let path = version_dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let manifest: Manifest = toml::from_str(text)?;
        manifest.check()?;
        Ok(manifest)
    }

    pub fn serves(&self, task: Task) -> bool {
        self.tasks.contains(&task)
    }

    /// The embedding settings, defaulting to mean pooling with normalisation.
    pub fn embed_settings(&self) -> EmbedSettings {
        self.embed.clone().unwrap_or(EmbedSettings {
            pooling: Pooling::Mean,
            normalize: true,
        })
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.tasks.is_empty() {
            bail!("`tasks` is empty; list what the model serves, e.g. [\"embed\"]");
        }
        if self.max_length == 0 {
            bail!("`max_length` must be at least 1");
        }
        if self
            .tokenizer
            .components()
            .any(|part| !matches!(part, std::path::Component::Normal(_)))
        {
            bail!(
                "`tokenizer` must be a file name inside the version folder, got {}",
                self.tokenizer.display()
            );
        }
        let generates = self.serves(Task::Generate);
        if generates && self.family == Family::Encoder {
            bail!("an encoder cannot serve `generate`; use family \"decoder\" or \"rnn\"");
        }
        if (self.serves(Task::Embed) || self.serves(Task::Classify))
            && self.family != Family::Encoder
        {
            bail!("only family \"encoder\" serves embed or classify");
        }
        if generates && self.eos_token_ids.is_empty() {
            tracing::debug!(
                "manifest lists no eos_token_ids; generation stops only on length or stop conditions"
            );
        }
        if self.family == Family::Rnn && self.state.is_empty() {
            bail!(
                "an rnn model needs [state] mapping each state output to its input, e.g. hn = \"h0\""
            );
        }
        match (&self.classify, self.serves(Task::Classify)) {
            (None, true) => {
                bail!("the model serves classify but has no [classify] section with labels")
            }
            (Some(classify), true) if classify.labels.is_empty() => {
                bail!("[classify].labels is empty")
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENCODER: &str = r#"
        family = "encoder"
        tasks = ["embed", "classify"]
        max_length = 128
        [classify]
        labels = ["ham", "spam"]
    "#;

    #[test]
    fn parses_a_minimal_encoder() {
        let manifest = Manifest::parse(ENCODER).unwrap();
        assert_eq!(manifest.family, Family::Encoder);
        assert!(manifest.serves(Task::Classify));
        assert_eq!(manifest.embed_settings().pooling, Pooling::Mean);
        assert_eq!(manifest.tokenizer, PathBuf::from("tokenizer.json"));
    }

    #[test]
    fn rejects_inconsistent_manifests() {
        let cases = [
            ("family = \"encoder\"\ntasks = []\nmax_length = 8", "tasks"),
            (
                "family = \"encoder\"\ntasks = [\"classify\"]\nmax_length = 8",
                "labels",
            ),
            (
                "family = \"encoder\"\ntasks = [\"generate\"]\nmax_length = 8",
                "cannot serve",
            ),
            (
                "family = \"rnn\"\ntasks = [\"generate\"]\nmax_length = 8",
                "[state]",
            ),
            (
                "family = \"encoder\"\ntasks = [\"embed\"]\nmax_length = 8\ntokenizer = \"../x.json\"",
                "inside",
            ),
            (
                "family = \"encoder\"\ntasks = [\"embed\"]\nmax_length = 8\nbogus = 1",
                "bogus",
            ),
        ];
        for (text, expected) in cases {
            let error = format!("{:#}", Manifest::parse(text).unwrap_err());
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
