//! The manifest `model.toml` beside each `model.onnx`: what the model is and how its tensors
//! map to roles. Parsing and self-consistency only; matching it to the graph is `bindings`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::paths::stays_inside;

pub use crate::kinds::{Activation, Family, Pooling, Task};

pub const MANIFEST_FILE: &str = "model.toml";
pub const MODEL_FILE: &str = "model.onnx";
pub const DEFAULT_TOKENIZER_FILE: &str = "tokenizer.json";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub family: Family,
    pub tasks: Vec<Task>,
    #[serde(default)]
    pub description: String,
    /// Longest token sequence the model sees, special tokens included. Unset: the Hugging Face
    /// files' limit (see `settings`).
    pub max_length: Option<usize>,
    #[serde(default = "default_tokenizer")]
    pub tokenizer: PathBuf,
    /// Whether inputs get the special tokens the tokenizer's post-processor adds (`[CLS] … [SEP]`,
    /// a BOS). Unset: yes, as the model's authors tokenize.
    pub add_special_tokens: Option<bool>,
    pub eos_token_ids: Option<Vec<u32>>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub tensors: TensorNames,
    /// Carried state: output name = input name.
    #[serde(default)]
    pub state: BTreeMap<String, String>,
    pub embed: Option<EmbedSection>,
    pub classify: Option<ClassifySection>,
    /// The model's own defaults for a Generate request's unset parameters.
    pub generation: Option<GenerationSection>,
    /// An encoder-decoder's graph files; unset, optimum's file names are looked for.
    pub graphs: Option<GraphFiles>,
    /// Encoder outputs fed to every decoder step: encoder output = decoder input.
    #[serde(default)]
    pub encoder_outputs: BTreeMap<String, String>,
    /// The token an encoder-decoder's target starts from. Unset: the Hugging Face files'.
    pub decoder_start_token_id: Option<u32>,
    /// The token an encoder-decoder's target must begin with (mBART's target language, BART's
    /// `<s>`). Unset: the Hugging Face files'.
    pub forced_bos_token_id: Option<u32>,
    /// The token a sequence must end with when it reaches its length limit; `[]` forces none.
    /// Unset: the Hugging Face files'.
    pub forced_eos_token_ids: Option<Vec<u32>>,
}

/// The graphs of an encoder-decoder, as files in the version folder.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphFiles {
    /// Reads the source once per request (optimum: `encoder_model.onnx`).
    pub encoder: Option<PathBuf>,
    /// One decoder step fed the encoder's outputs, or with `decoder_with_past`, optimum's
    /// first step, which reads the encoder's hidden states (`decoder_model.onnx`).
    pub decoder: Option<PathBuf>,
    /// optimum's later steps, fed the cross-attention keys and values the first step made
    /// (`decoder_with_past_model.onnx`).
    pub decoder_with_past: Option<PathBuf>,
    /// optimum's merged decoder, both steps in one graph chosen by `use_cache_branch`
    /// (`decoder_model_merged.onnx`).
    pub decoder_merged: Option<PathBuf>,
}

impl GraphFiles {
    pub fn named(&self) -> impl Iterator<Item = &Path> {
        [
            &self.encoder,
            &self.decoder,
            &self.decoder_with_past,
            &self.decoder_merged,
        ]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
    }
}

/// Graph names for each role; unset roles fall back to the standard optimum names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorNames {
    pub input_ids: Option<String>,
    pub attention_mask: Option<String>,
    pub position_ids: Option<String>,
    pub token_type_ids: Option<String>,
    pub logits: Option<String>,
    pub hidden_states: Option<String>,
    /// An encoder-decoder's source mask, fed to the decoder steps.
    pub encoder_attention_mask: Option<String>,
    /// An encoder-decoder's encoder graph inputs: the source's token ids and its mask.
    pub source_ids: Option<String>,
    pub source_mask: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedSection {
    pub pooling: Option<Pooling>,
    pub normalize: Option<bool>,
    /// A graph output that is already one vector per text (`[batch, dim]`), returned as is.
    pub pooled_output: Option<String>,
    /// How many leading values of each vector an Embed request that names no `dimensions` gets.
    pub truncate_dim: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifySection {
    pub labels: Option<Vec<String>>,
    pub multi_label: Option<bool>,
    /// What an unset `scores` returns: the logits through this function.
    pub activation: Option<Activation>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSection {
    pub max_new_tokens: Option<u32>,
    pub max_length: Option<u32>,
    pub min_new_tokens: Option<u32>,
    pub min_length: Option<u32>,
    pub no_repeat_ngram_size: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub repetition_penalty: Option<f32>,
    pub do_sample: Option<bool>,
    /// Beam search by default, for requests that neither sample nor ask for what beams cannot
    /// give (top_logprobs, stop sequences, penalties).
    pub num_beams: Option<u32>,
    pub length_penalty: Option<f32>,
    pub early_stopping: Option<crate::kinds::EarlyStopping>,
}

impl GenerationSection {
    /// The same ranges a request's parameters must keep, so a default never fails a request.
    fn check(&self) -> anyhow::Result<()> {
        let positive = |name: &str, value: Option<f32>| match value {
            Some(v) if !(v > 0.0 && v.is_finite()) => {
                bail!("[generation].{name} must be > 0; got {v}")
            }
            _ => Ok(()),
        };
        positive("temperature", self.temperature)?;
        positive("repetition_penalty", self.repetition_penalty)?;
        if let Some(top_p) = self.top_p
            && !(top_p > 0.0 && top_p <= 1.0)
        {
            bail!("[generation].top_p must be in (0, 1]; got {top_p}");
        }
        if self.max_new_tokens == Some(0) {
            bail!("[generation].max_new_tokens must be at least 1; got 0");
        }
        if let Some(penalty) = self.length_penalty
            && !penalty.is_finite()
        {
            bail!("[generation].length_penalty must be a finite number; got {penalty}");
        }
        Ok(())
    }
}

fn default_tokenizer() -> PathBuf {
    PathBuf::from(DEFAULT_TOKENIZER_FILE)
}

impl Manifest {
    pub fn read(version_dir: &Path) -> anyhow::Result<Self> {
        let path = version_dir.join(MANIFEST_FILE);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("reading {MANIFEST_FILE}"))?;
        Self::parse(&text).with_context(|| format!("in {MANIFEST_FILE}"))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        // toml's own message quotes the offending line; the reason reaches clients, so it says
        // where instead.
        let manifest: Manifest = toml::from_str(text).map_err(|error| {
            let line = error
                .span()
                .and_then(|span| text.get(..span.start))
                .map(|before| before.matches('\n').count() + 1);
            match line {
                Some(line) => anyhow::anyhow!("line {line}: {}", error.message()),
                None => anyhow::anyhow!("{}", error.message()),
            }
        })?;
        manifest.check()?;
        Ok(manifest)
    }

    pub fn serves(&self, task: Task) -> bool {
        self.tasks.contains(&task)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.tasks.is_empty() {
            bail!("`tasks` is empty; list what the model serves, e.g. [\"embed\"]");
        }
        if self.max_length == Some(0) {
            bail!("`max_length` must be at least 1");
        }
        if !stays_inside(&self.tokenizer) {
            bail!(
                "`tokenizer` must be a file name inside the version folder, got {}",
                self.tokenizer.display()
            );
        }
        let generates = self.serves(Task::Generate);
        if generates && self.family == Family::Encoder {
            bail!(
                "an encoder cannot serve `generate`; use family \"decoder\", \"rnn\" or \"encoder-decoder\""
            );
        }
        if let Some(graphs) = &self.graphs {
            if self.family != Family::EncoderDecoder {
                bail!("[graphs] is for family \"encoder-decoder\"; other families read model.onnx");
            }
            if let Some(file) = graphs.named().find(|file| !stays_inside(file)) {
                bail!(
                    "[graphs] files must be names inside the version folder, got {}",
                    file.display()
                );
            }
            if graphs.decoder_merged.is_some()
                && (graphs.decoder.is_some() || graphs.decoder_with_past.is_some())
            {
                bail!("[graphs] names decoder_merged and a split decoder; keep one layout");
            }
        }
        if !self.encoder_outputs.is_empty() && self.family != Family::EncoderDecoder {
            bail!("[encoder_outputs] is for family \"encoder-decoder\"");
        }
        if (self.serves(Task::Embed) || self.serves(Task::Classify))
            && self.family != Family::Encoder
        {
            bail!("only family \"encoder\" serves embed or classify");
        }
        if self.family == Family::Rnn && self.state.is_empty() {
            bail!(
                "an rnn model needs [state] mapping each state output to its input, e.g. hn = \"h0\""
            );
        }
        if let Some(ClassifySection {
            labels: Some(labels),
            ..
        }) = &self.classify
            && labels.is_empty()
        {
            bail!(
                "[classify].labels is empty; list the class names or leave it out to use config.json's id2label"
            );
        }
        if let Some(generation) = &self.generation {
            generation.check()?;
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
        assert_eq!(manifest.max_length, Some(128));
        assert_eq!(manifest.tokenizer, PathBuf::from("tokenizer.json"));
        let two_lines = Manifest::parse("family = \"encoder\"\ntasks = [\"embed\"]").unwrap();
        assert_eq!(two_lines.max_length, None);
    }

    #[test]
    fn rejects_inconsistent_manifests() {
        let cases = [
            ("family = \"encoder\"\ntasks = []\nmax_length = 8", "tasks"),
            (
                "family = \"encoder\"\ntasks = [\"classify\"]\n[classify]\nlabels = []",
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
            (
                "family = \"decoder\"\ntasks = [\"generate\"]\n[generation]\ntemperature = 0.0",
                "[generation].temperature must be > 0",
            ),
            (
                "family = \"decoder\"\ntasks = [\"generate\"]\n[generation]\ntop_p = 1.5",
                "top_p",
            ),
            (
                "family = \"decoder\"\ntasks = [\"generate\"]\nsecret = [",
                "line 3",
            ),
        ];
        for (text, expected) in cases {
            let error = format!("{:#}", Manifest::parse(text).unwrap_err());
            assert!(
                !error.contains("secret = ["),
                "the file's text is not quoted: {error}"
            );
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
