//! What kinds of model and work exist: the task a request asks for, the family a model belongs
//! to, and how an encoder pools. Plain names every layer shares, so this module imports nothing
//! of the crate.

use std::fmt;

use serde::Deserialize;

/// The work a request asks of a model.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Generate,
    Embed,
    Classify,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Generate => "generate",
            Task::Embed => "embed",
            Task::Classify => "classify",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a model's graphs turn tokens into results; it decides which engine serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Causal language model, with a KV cache when the graph carries one.
    Decoder,
    /// Recurrent language model carrying a hidden state from step to step.
    Rnn,
    /// Bidirectional encoder for embeddings and classification.
    Encoder,
    /// An encoder read once per request and a decoder that generates from its outputs
    /// (translation, summarization).
    #[serde(rename = "encoder-decoder")]
    EncoderDecoder,
}

impl Family {
    /// The name `model.toml` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Decoder => "decoder",
            Family::Rnn => "rnn",
            Family::Encoder => "encoder",
            Family::EncoderDecoder => "encoder-decoder",
        }
    }

    /// Whether the family generates text token by token.
    pub fn generates(self) -> bool {
        !matches!(self, Family::Encoder)
    }
}

/// How per-token states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Average over the real (unpadded) tokens.
    Mean,
    /// The first token's state.
    Cls,
    /// The last real token's state.
    Last,
    /// The largest value of each dimension over the real tokens.
    Max,
}

/// When a beam search may end (transformers' `early_stopping`: `true`, `false` or `"never"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "WrittenEarlyStopping")]
pub enum EarlyStopping {
    /// As soon as `num_beams` candidates have finished (`true`).
    FirstBeams,
    /// When the best running beam, scored at its current length, cannot beat the worst
    /// finished candidate (`false`, the default).
    Heuristic,
    /// When no running beam can beat the finished ones at any length (`"never"`).
    Never,
}

/// `early_stopping` as generation_config.json and model.toml write it.
#[derive(Deserialize)]
#[serde(untagged)]
enum WrittenEarlyStopping {
    Flag(bool),
    Word(String),
}

impl TryFrom<WrittenEarlyStopping> for EarlyStopping {
    type Error = String;

    fn try_from(written: WrittenEarlyStopping) -> Result<Self, String> {
        match written {
            WrittenEarlyStopping::Flag(true) => Ok(EarlyStopping::FirstBeams),
            WrittenEarlyStopping::Flag(false) => Ok(EarlyStopping::Heuristic),
            WrittenEarlyStopping::Word(word) if word == "never" => Ok(EarlyStopping::Never),
            WrittenEarlyStopping::Word(word) => Err(format!(
                "early_stopping is true, false or \"never\"; got \"{word}\""
            )),
        }
    }
}

impl fmt::Display for EarlyStopping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EarlyStopping::FirstBeams => "true",
            EarlyStopping::Heuristic => "false",
            EarlyStopping::Never => "never",
        })
    }
}

/// The function a classifier's logits pass through by default (model.toml's `[classify]
/// activation`; a sentence-transformers CrossEncoder's `activation_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// One distribution over the labels.
    Softmax,
    /// Each label scored on its own, in 0..1.
    Sigmoid,
    /// The logits as they are.
    Identity,
    /// Each logit squashed into -1..1.
    Tanh,
}

impl Activation {
    pub fn as_str(self) -> &'static str {
        match self {
            Activation::Softmax => "softmax",
            Activation::Sigmoid => "sigmoid",
            Activation::Identity => "identity",
            Activation::Tanh => "tanh",
        }
    }

    /// The activation a PyTorch module's dotted path names, as sentence-transformers saves it
    /// (`torch.nn.modules.linear.Identity`; older releases wrote `torch.nn.Identity`).
    pub fn from_torch_path(path: &str) -> Option<Self> {
        let (module, class) = path.rsplit_once('.')?;
        if module != "torch.nn" && !module.starts_with("torch.nn.modules.") {
            return None;
        }
        match class {
            "Softmax" => Some(Activation::Softmax),
            "Sigmoid" => Some(Activation::Sigmoid),
            "Identity" => Some(Activation::Identity),
            "Tanh" => Some(Activation::Tanh),
            _ => None,
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pytorch_activation_paths_in_both_spellings_and_nothing_else() {
        for (path, expected) in [
            (
                "torch.nn.modules.linear.Identity",
                Some(Activation::Identity),
            ),
            ("torch.nn.Identity", Some(Activation::Identity)),
            (
                "torch.nn.modules.activation.Sigmoid",
                Some(Activation::Sigmoid),
            ),
            (
                "torch.nn.modules.activation.Softmax",
                Some(Activation::Softmax),
            ),
            ("torch.nn.modules.activation.Tanh", Some(Activation::Tanh)),
            ("torch.nn.modules.activation.ReLU", None),
            ("my_package.Sigmoid", None),
            ("Sigmoid", None),
        ] {
            assert_eq!(Activation::from_torch_path(path), expected, "{path}");
        }
    }
}
