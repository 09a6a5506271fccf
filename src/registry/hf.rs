//! The Hugging Face files an export folder holds beside its graph: `config.json`,
//! `generation_config.json`, `tokenizer_config.json` (and `chat_template.jinja`), and
//! sentence-transformers' `modules.json`, `sentence_bert_config.json` and pooling config. Read
//! leniently (unknown keys are normal in these files); a file that is present but does not parse
//! fails the load with its name.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::paths::stays_inside;
use crate::runtime::encoder::Pooling;

pub const CONFIG: &str = "config.json";
pub const GENERATION_CONFIG: &str = "generation_config.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE: &str = "chat_template.jinja";
pub const MODULES: &str = "modules.json";
pub const SENTENCE_BERT_CONFIG: &str = "sentence_bert_config.json";
/// The Transformer module's config under the names sentence-transformers tries, in its order:
/// models saved by its early releases name the file after the architecture.
const TRANSFORMER_CONFIGS: [&str; 7] = [
    SENTENCE_BERT_CONFIG,
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
];
pub const SENTENCE_TRANSFORMERS_CONFIG: &str = "config_sentence_transformers.json";
/// The `model_type`s of sentence-transformers' saves that the server reads.
const SENTENCE_TRANSFORMER: &str = "SentenceTransformer";
const CROSS_ENCODER: &str = "CrossEncoder";

/// transformers writes `model_max_length` as 1e30 when a tokenizer has no limit of its own.
const UNBOUNDED_MODEL_MAX_LENGTH: f64 = 1e12;

/// Everything read from the folder; a file that is absent is `None`.
#[derive(Debug, Clone, Default)]
pub struct HfFiles {
    pub config: Option<ModelConfig>,
    pub generation: Option<GenerationConfig>,
    pub tokenizer: Option<TokenizerConfig>,
    /// The chat template: `chat_template.jinja` when present, else tokenizer_config.json's.
    pub chat_template: Option<(String, &'static str)>,
    pub sentence_transformers: Option<SentenceTransformers>,
    /// Set when the folder is a sentence-transformers CrossEncoder's.
    pub cross_encoder: Option<CrossEncoder>,
}

/// transformers' model types whose position ids start after the padding id
/// (`create_position_ids_from_input_ids`).
const POSITIONS_AFTER_PADDING: [&str; 8] = [
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "mpnet",
    "longformer",
    "data2vec-text",
    "ibert",
];

/// `config.json` (transformers' PretrainedConfig), the keys the server uses.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModelConfig {
    pub model_type: Option<String>,
    pub max_position_embeddings: Option<usize>,
    /// GPT-2's name for the same limit.
    pub n_positions: Option<usize>,
    #[serde(default)]
    pub id2label: BTreeMap<String, String>,
    pub problem_type: Option<String>,
    /// How many token types (segments) the embeddings tell apart: BERT's 2, RoBERTa's 1.
    pub type_vocab_size: Option<usize>,
    #[serde(default)]
    pub eos_token_id: TokenIds,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// The token an encoder-decoder's target starts from.
    pub decoder_start_token_id: Option<u32>,
    pub forced_bos_token_id: Option<u32>,
    #[serde(default)]
    pub forced_eos_token_id: TokenIds,
    /// sentence-transformers 4 and 5 keep a CrossEncoder's settings here.
    sentence_transformers: Option<CrossEncoderSection>,
    /// sentence-transformers before 4: a CrossEncoder's activation function.
    sbert_ce_default_activation_function: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct CrossEncoderSection {
    /// `Some(None)` where the key is there but null: sentence-transformers then looks no
    /// further in config.json.
    #[serde(default, deserialize_with = "present")]
    activation_fn: Option<Option<String>>,
}

/// A key that is present, even as null.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

impl ModelConfig {
    /// The most tokens the position table serves. RoBERTa and the models built like it number
    /// positions from the padding id plus one, and count those skipped rows in
    /// `max_position_embeddings` (514 for 512 tokens): a longer text would read past the table.
    pub fn max_positions(&self) -> Option<usize> {
        let table = self.max_position_embeddings.or(self.n_positions)?;
        let skipped = usize::try_from(self.first_position()).unwrap_or(0);
        Some(table.saturating_sub(skipped).max(1))
    }

    /// The position a text's first token takes: the padding id plus one for the model types
    /// transformers numbers that way (`create_position_ids_from_input_ids`), else 0. A graph
    /// that takes `position_ids` as an input must be fed them so.
    pub fn first_position(&self) -> i64 {
        match self.model_type.as_deref() {
            Some(kind) if POSITIONS_AFTER_PADDING.contains(&kind) => {
                self.pad_token_id.map_or(0, |pad| i64::from(pad) + 1)
            }
            _ => 0,
        }
    }

    /// Labels in class order, when `id2label` names every class from 0 up.
    pub fn labels(&self) -> anyhow::Result<Option<Vec<String>>> {
        if self.id2label.is_empty() {
            return Ok(None);
        }
        let mut by_index = BTreeMap::new();
        for (key, label) in &self.id2label {
            let index: usize = key
                .trim()
                .parse()
                .with_context(|| format!("{CONFIG}: id2label key `{key}` is not a class index"))?;
            by_index.insert(index, label.clone());
        }
        if by_index.keys().copied().ne(0..by_index.len()) {
            bail!(
                "{CONFIG}: id2label must name classes 0..{} without gaps; it has {:?}",
                by_index.len(),
                by_index.keys().collect::<Vec<_>>()
            );
        }
        Ok(Some(by_index.into_values().collect()))
    }
}

/// `generation_config.json`: stop ids and the model's own sampling defaults.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub eos_token_id: TokenIds,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub decoder_start_token_id: Option<u32>,
    pub forced_bos_token_id: Option<u32>,
    #[serde(default)]
    pub forced_eos_token_id: TokenIds,
    pub max_new_tokens: Option<u32>,
    /// The longest the whole sequence gets (the prompt, or an encoder-decoder's start token,
    /// included), where `max_new_tokens` is not set.
    pub max_length: Option<u32>,
    pub min_new_tokens: Option<u32>,
    /// The shortest the whole sequence gets, counted as `max_length` is.
    pub min_length: Option<u32>,
    pub no_repeat_ngram_size: Option<u32>,
    pub bad_words_ids: Option<Vec<Vec<u32>>>,
    pub suppress_tokens: Option<Vec<u32>>,
    pub begin_suppress_tokens: Option<Vec<u32>>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// `Some(None)` where the key is there but null: transformers then samples with no top-k
    /// limit, where an absent key gives its default of 50.
    #[serde(default, deserialize_with = "present")]
    pub top_k: Option<Option<u32>>,
    pub repetition_penalty: Option<f32>,
    pub do_sample: Option<bool>,
    pub num_beams: Option<u32>,
    pub length_penalty: Option<f32>,
    pub early_stopping: Option<crate::kinds::EarlyStopping>,
}

/// One id or a list of ids, as transformers allows for `eos_token_id`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    #[default]
    None,
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Option<Vec<u32>> {
        match self {
            TokenIds::None => None,
            TokenIds::One(id) => Some(vec![*id]),
            TokenIds::Many(ids) => Some(ids.clone()),
        }
    }
}

/// `tokenizer_config.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenizerConfig {
    pub model_max_length: Option<f64>,
    pub bos_token: Option<SpecialToken>,
    pub eos_token: Option<SpecialToken>,
    pub pad_token: Option<SpecialToken>,
    pub add_bos_token: Option<bool>,
    /// The inputs transformers' tokenizer returns; without `token_type_ids` it passes the model
    /// no type ids, whatever its template assigns.
    pub model_input_names: Option<Vec<String>>,
    chat_template: Option<ChatTemplates>,
}

impl TokenizerConfig {
    /// The tokenizer's own length limit; `None` when it declares none (transformers' 1e30).
    pub fn max_length(&self) -> Option<usize> {
        self.model_max_length
            .filter(|length| (1.0..UNBOUNDED_MODEL_MAX_LENGTH).contains(length))
            .map(|length| length as usize)
    }

    /// Whether the tokenizer says the model takes no token type ids.
    pub fn omits_token_types(&self) -> bool {
        self.model_input_names
            .as_ref()
            .is_some_and(|names| !names.iter().any(|name| name == "token_type_ids"))
    }
}

/// A special token as tokenizer_config.json writes it: its text, or an AddedToken object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    pub fn content(&self) -> &str {
        match self {
            SpecialToken::Text(text) | SpecialToken::Added { content: text } => text,
        }
    }
}

/// transformers allows one template, or named templates of which "default" is the chat one.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ChatTemplates {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Clone, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// What sentence-transformers' module files say about embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceTransformers {
    /// The Pooling module's mode, when the pipeline has one, with the file it is read from;
    /// an error where it names no mode this server pools by, which only matters when
    /// model.toml's `[embed] pooling` does not override it.
    pub pooling: Option<(Result<Pooling, String>, String)>,
    /// Whether the pipeline ends in a Normalize module (one that a later module undoes does
    /// not count).
    pub normalize: bool,
    /// Modules after the Pooling one that change the vector and that the server does not run
    /// (a `Dense` projection, a `LayerNorm`), as "path (type)": only a graph that returns the
    /// pipeline's own `sentence_embedding` gives what the model's authors define.
    pub after_pooling: Vec<String>,
    /// The Transformer module's `max_seq_length`, with the file it is read from
    /// (`sentence_bert_config.json` or an older name, in the module's folder: `0_Transformer/`
    /// in models saved by early releases).
    pub max_seq_length: Option<(usize, String)>,
    /// The Transformer module's `do_lower_case`: sentence-transformers then lowercases every
    /// text ahead of the tokenizer's own normalizer.
    pub lowercase: bool,
    /// Texts put before an input, by name (`config_sentence_transformers.json`), as
    /// `encode(prompt_name=...)` puts them.
    pub prompts: BTreeMap<String, String>,
    /// The prompt `encode` uses when it is given none; always one of `prompts`.
    pub default_prompt_name: Option<String>,
    /// Whether pooling counts a prompt's tokens (the Pooling config's `include_prompt`);
    /// INSTRUCTOR-style models leave them out.
    pub prompt_in_pooling: bool,
    /// How many leading values of each embedding `encode` keeps (`truncate_dim` in
    /// `config_sentence_transformers.json`).
    pub truncate_dim: Option<usize>,
}

/// A sentence-transformers CrossEncoder: `CrossEncoder.predict` applies its activation
/// function to the logits, which need not be what transformers' pipeline applies (rerankers
/// trained on MS MARCO keep the raw logit).
#[derive(Debug, Clone, PartialEq)]
pub struct CrossEncoder {
    /// The activation paths sentence-transformers tries, in its order, each a dotted path
    /// (`torch.nn.modules.linear.Identity`) with the file naming it: the first it trusts wins,
    /// and where none is named or trusted the CrossEncoder's default applies.
    pub activation_fns: Vec<(String, &'static str)>,
    /// The prompt `predict` puts before each text when given none (its default prompt's).
    pub prompt: Option<String>,
}

/// sentence-transformers' `config_sentence_transformers.json`: what changes a vector, and a
/// CrossEncoder's activation.
#[derive(Debug, Default, Deserialize)]
struct SentenceTransformersConfig {
    #[serde(default)]
    prompts: BTreeMap<String, String>,
    default_prompt_name: Option<String>,
    /// "SentenceTransformer", "CrossEncoder", ... (sentence-transformers 6).
    model_type: Option<String>,
    activation_fn: Option<String>,
    /// How many leading values of each embedding `encode` keeps (a Matryoshka model's).
    truncate_dim: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// sentence-transformers' `<pooling path>/config.json`.
#[derive(Debug, Default, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    /// sentence-transformers 5's form: one mode, or a list of modes to concatenate.
    pooling_mode: Option<PoolingModes>,
    /// Unset: true, as in sentence-transformers.
    include_prompt: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PoolingModes {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

impl HfFiles {
    /// Reads whichever of the files `dir` holds.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let tokenizer: Option<TokenizerConfig> = read_json(dir, TOKENIZER_CONFIG)?;
        let chat_template = match std::fs::read_to_string(dir.join(CHAT_TEMPLATE)) {
            Ok(template) => Some((template, CHAT_TEMPLATE)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => tokenizer
                .as_ref()
                .and_then(|config| config.chat_template.clone())
                .and_then(|templates| match templates {
                    ChatTemplates::One(template) => Some(template),
                    ChatTemplates::Named(named) => named
                        .into_iter()
                        .find(|entry| entry.name == "default")
                        .map(|entry| entry.template),
                })
                .map(|template| (template, TOKENIZER_CONFIG)),
            Err(error) => {
                return Err(error).with_context(|| format!("reading {CHAT_TEMPLATE}"));
            }
        };
        let config: Option<ModelConfig> = read_json(dir, CONFIG)?;
        // sentence-transformers reads its config only beside a modules.json (so a broken one
        // elsewhere is not read, here either), and only into the class the save was made by
        // (`model_type`, SentenceTransformer where absent): a reranker's prompts do not reach
        // an embedder, nor an embedder's a reranker.
        let has_modules = dir.join(MODULES).is_file();
        let st_config: SentenceTransformersConfig = match has_modules {
            true => read_json(dir, SENTENCE_TRANSFORMERS_CONFIG)?.unwrap_or_default(),
            false => SentenceTransformersConfig::default(),
        };
        let saved_as: Option<String> = has_modules.then(|| {
            st_config
                .model_type
                .clone()
                .unwrap_or_else(|| SENTENCE_TRANSFORMER.to_owned())
        });
        let (for_embed, for_cross_encoder) = match saved_as.as_deref() {
            Some(SENTENCE_TRANSFORMER) => (st_config, SentenceTransformersConfig::default()),
            Some(CROSS_ENCODER) => (SentenceTransformersConfig::default(), st_config),
            _ => Default::default(),
        };
        check_default_prompt(&for_embed)?;
        check_default_prompt(&for_cross_encoder)?;
        let cross_encoder = cross_encoder(config.as_ref(), saved_as.as_deref(), &for_cross_encoder);
        Ok(Self {
            config,
            generation: read_json(dir, GENERATION_CONFIG)?,
            tokenizer,
            chat_template,
            sentence_transformers: read_sentence_transformers(dir, for_embed)?,
            cross_encoder,
        })
    }
}

/// The CrossEncoder the files describe, where they describe one. sentence-transformers takes
/// the activation from `config_sentence_transformers.json` (version 6), else from config.json:
/// `sentence_transformers.activation_fn` where that key is there (version 4 on), else
/// `sbert_ce_default_activation_function` (before 4).
fn cross_encoder(
    config: Option<&ModelConfig>,
    saved_as: Option<&str>,
    st_config: &SentenceTransformersConfig,
) -> Option<CrossEncoder> {
    let section = config.and_then(|c| c.sentence_transformers.as_ref());
    let old = config.and_then(|c| c.sbert_ce_default_activation_function.as_ref());
    let is_cross_encoder = saved_as == Some(CROSS_ENCODER) || section.is_some() || old.is_some();
    if !is_cross_encoder {
        return None;
    }
    let from_config = match section.and_then(|s| s.activation_fn.as_ref()) {
        Some(named) => named.as_ref(),
        None => old,
    };
    let activation_fns = [
        (
            st_config.activation_fn.as_ref(),
            SENTENCE_TRANSFORMERS_CONFIG,
        ),
        (from_config, CONFIG),
    ]
    .into_iter()
    .filter_map(|(path, file)| path.map(|path| (path.clone(), file)))
    .collect();
    let prompt = st_config
        .default_prompt_name
        .as_ref()
        .and_then(|name| st_config.prompts.get(name))
        .filter(|prompt| !prompt.is_empty())
        .cloned();
    Some(CrossEncoder {
        activation_fns,
        prompt,
    })
}

/// sentence-transformers refuses to load a save whose default prompt is not one of its prompts
/// (`_validate_prompts`), whichever class it was saved by.
fn check_default_prompt(config: &SentenceTransformersConfig) -> anyhow::Result<()> {
    if let Some(name) = &config.default_prompt_name
        && !config.prompts.contains_key(name)
    {
        bail!(
            "{SENTENCE_TRANSFORMERS_CONFIG}: default_prompt_name `{name}` is not one of its prompts ({})",
            config
                .prompts
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// The first of the Transformer module's config files its folder (`module`, in `dir`) holds, as
/// sentence-transformers looks for it, and its path in `dir`.
fn read_transformer_config(
    dir: &Path,
    module: &str,
) -> anyhow::Result<(SentenceBertConfig, Option<String>)> {
    if !stays_inside(Path::new(module)) {
        bail!("{MODULES}: the Transformer module's path `{module}` leaves the model folder");
    }
    for name in TRANSFORMER_CONFIGS {
        let file = Path::new(module).join(name).display().to_string();
        if let Some(config) = read_json::<SentenceBertConfig>(dir, &file)? {
            return Ok((config, Some(file)));
        }
    }
    Ok((SentenceBertConfig::default(), None))
}

fn read_sentence_transformers(
    dir: &Path,
    config: SentenceTransformersConfig,
) -> anyhow::Result<Option<SentenceTransformers>> {
    let Some(modules) = read_json::<Vec<Module>>(dir, MODULES)? else {
        return Ok(None);
    };
    let mut pooling = None;
    let mut prompt_in_pooling = true;
    let mut normalize = false;
    let mut after_pooling = Vec::new();
    let mut transformer_path = "";
    for module in &modules {
        match module.kind.rsplit('.').next().unwrap_or_default() {
            "Pooling" => {
                let file = Path::new(&module.path).join("config.json");
                let name = file.display().to_string();
                if !stays_inside(&file) {
                    bail!(
                        "{MODULES}: the Pooling module's path `{}` leaves the model folder",
                        module.path
                    );
                }
                let config: PoolingConfig = read_json(dir, &name)?.unwrap_or_default();
                prompt_in_pooling = config.include_prompt.unwrap_or(true);
                let mode = pooling_mode(&config, &name).map_err(|error| error.to_string());
                pooling = Some((mode, name));
            }
            // Only as the last module: a Dense or LayerNorm after it changes the length again.
            "Normalize" => normalize = true,
            // What produces the per-token states the graph computes, under its name in early
            // releases too, which had a module class per architecture.
            "Transformer" | "BERT" | "RoBERTa" | "DistilBERT" | "CamemBERT" | "ALBERT"
            | "XLMRoBERTa" | "XLNet" => transformer_path = &module.path,
            _ if pooling.is_some() => {
                normalize = false;
                after_pooling.push(format!("{} ({})", module.path, module.kind));
            }
            _ => {}
        }
    }
    let (transformer, transformer_file) = read_transformer_config(dir, transformer_path)?;
    let max_seq_length = transformer.max_seq_length.zip(transformer_file);
    Ok(Some(SentenceTransformers {
        pooling,
        normalize,
        after_pooling,
        max_seq_length,
        lowercase: transformer.do_lower_case,
        prompts: config.prompts,
        default_prompt_name: config.default_prompt_name,
        prompt_in_pooling,
        truncate_dim: config.truncate_dim,
    }))
}

/// The mode a Pooling config names, in either form: sentence-transformers 5's `pooling_mode`,
/// or the older `pooling_mode_*` switches. Naming none means mean pooling in both.
fn pooling_mode(config: &PoolingConfig, file: &str) -> anyhow::Result<Pooling> {
    if let Some(modes) = &config.pooling_mode {
        let names: Vec<&str> = match modes {
            PoolingModes::One(name) => vec![name.as_str()],
            PoolingModes::Many(names) => names.iter().map(String::as_str).collect(),
        };
        return match names.as_slice() {
            [] => Ok(Pooling::Mean),
            [name] => match *name {
                "cls" => Ok(Pooling::Cls),
                "mean" => Ok(Pooling::Mean),
                "max" => Ok(Pooling::Max),
                "lasttoken" => Ok(Pooling::Last),
                other => bail!(
                    "{file}: pooling mode `{other}` is not supported (cls, mean, max and lasttoken are); set [embed] pooling in model.toml to override"
                ),
            },
            several => bail!(
                "{file} names several pooling modes ({}), whose concatenation is not supported; set [embed] pooling in model.toml to pick one",
                several.join(", ")
            ),
        };
    }
    let modes = [
        (
            config.pooling_mode_cls_token,
            Some(Pooling::Cls),
            "cls_token",
        ),
        (
            config.pooling_mode_mean_tokens,
            Some(Pooling::Mean),
            "mean_tokens",
        ),
        (
            config.pooling_mode_max_tokens,
            Some(Pooling::Max),
            "max_tokens",
        ),
        (
            config.pooling_mode_lasttoken,
            Some(Pooling::Last),
            "lasttoken",
        ),
        (
            config.pooling_mode_mean_sqrt_len_tokens,
            None,
            "mean_sqrt_len_tokens",
        ),
        (
            config.pooling_mode_weightedmean_tokens,
            None,
            "weightedmean_tokens",
        ),
    ];
    let chosen: Vec<_> = modes.iter().filter(|(on, _, _)| *on).collect();
    match chosen.as_slice() {
        [(_, Some(pooling), _)] => Ok(*pooling),
        [(_, None, name)] => bail!(
            "{file}: pooling mode `{name}` is not supported (cls, mean, max and last token are); set [embed] pooling in model.toml to override"
        ),
        [] => Ok(Pooling::Mean),
        several => bail!(
            "{file} turns on several pooling modes ({}), whose concatenation is not supported; set [embed] pooling in model.toml to pick one",
            several
                .iter()
                .map(|(_, _, name)| *name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Parses `dir/name` as JSON; `None` when the file does not exist.
fn read_json<T: DeserializeOwned>(dir: &Path, name: &str) -> anyhow::Result<Option<T>> {
    let text = match std::fs::read_to_string(dir.join(name)) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("reading {name}")),
    };
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("{name} does not parse"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the sentence-transformers files in `dir` say, which the test expects them to say.
    fn sentence_transformers(dir: &tempfile::TempDir) -> SentenceTransformers {
        HfFiles::read(dir.path())
            .unwrap()
            .sentence_transformers
            .unwrap()
    }

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    #[test]
    fn roberta_style_positions_leave_out_the_rows_before_the_first() {
        let config = |json: &str| serde_json::from_str::<ModelConfig>(json).unwrap();
        let roberta = config(
            r#"{"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1}"#,
        );
        assert_eq!(roberta.max_positions(), Some(512));
        let bert =
            config(r#"{"model_type": "bert", "max_position_embeddings": 512, "pad_token_id": 0}"#);
        assert_eq!(bert.max_positions(), Some(512));
        assert_eq!(
            config(r#"{"n_positions": 1024}"#).max_positions(),
            Some(1024)
        );
    }

    #[test]
    fn reads_sentence_transformers_prompts_and_refuses_a_default_it_lacks() {
        let modules = r#"[{"path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#;
        let prompts = r#"{"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": "query"}"#;
        let dir = folder(&[
            (MODULES, modules),
            (
                "1_Pooling/config.json",
                r#"{"pooling_mode": "mean", "include_prompt": false}"#,
            ),
            (SENTENCE_TRANSFORMERS_CONFIG, prompts),
        ]);
        let st = sentence_transformers(&dir);
        assert_eq!(st.prompts["query"], "query: ");
        assert_eq!(st.default_prompt_name.as_deref(), Some("query"));
        assert!(!st.prompt_in_pooling);

        let dir = folder(&[
            (MODULES, modules),
            (
                SENTENCE_TRANSFORMERS_CONFIG,
                r#"{"prompts": {"query": "query: "}, "default_prompt_name": "passage"}"#,
            ),
        ]);
        let error = format!("{:#}", HfFiles::read(dir.path()).unwrap_err());
        assert!(
            error.contains("default_prompt_name `passage` is not one of its prompts (query)"),
            "{error}"
        );
        // No config, or one without prompts (all-MiniLM-L6-v2's): none, and pooling counts them.
        let dir = folder(&[(MODULES, modules)]);
        let st = sentence_transformers(&dir);
        assert!(st.prompts.is_empty() && st.default_prompt_name.is_none() && st.prompt_in_pooling);
    }

    #[test]
    fn reads_a_sentence_transformers_folder() {
        let dir = folder(&[
            (
                MODULES,
                r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                    {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
                    {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
            ),
            (
                "1_Pooling/config.json",
                r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true}"#,
            ),
            (
                SENTENCE_BERT_CONFIG,
                r#"{"max_seq_length": 256, "do_lower_case": false}"#,
            ),
            (
                TOKENIZER_CONFIG,
                r#"{"model_max_length": 512, "cls_token": "[CLS]", "pad_token": {"content": "[PAD]", "lstrip": false}}"#,
            ),
            (
                CONFIG,
                r#"{"max_position_embeddings": 512, "pad_token_id": 0, "architectures": ["BertModel"]}"#,
            ),
        ]);
        let files = HfFiles::read(dir.path()).unwrap();
        let st = files.sentence_transformers.unwrap();
        assert_eq!(st.pooling.unwrap().0, Ok(Pooling::Mean));
        assert!(st.normalize);
        assert_eq!(
            st.max_seq_length,
            Some((256, SENTENCE_BERT_CONFIG.to_owned()))
        );
        assert!(!st.lowercase);
        let tokenizer = files.tokenizer.unwrap();
        assert_eq!(tokenizer.max_length(), Some(512));
        assert_eq!(tokenizer.pad_token.unwrap().content(), "[PAD]");
        assert_eq!(files.config.unwrap().max_positions(), Some(512));
        assert!(files.generation.is_none());
    }

    #[test]
    fn reads_both_forms_of_a_pooling_config_and_no_mode_as_mean() {
        let mode = |json: &str| {
            let config: PoolingConfig = serde_json::from_str(json).unwrap();
            pooling_mode(&config, "1_Pooling/config.json").map_err(|error| error.to_string())
        };
        let current =
            r#"{"embedding_dimension": 384, "pooling_mode": "cls", "include_prompt": true}"#;
        assert_eq!(mode(current), Ok(Pooling::Cls));
        assert_eq!(
            mode(r#"{"pooling_mode": ["lasttoken"]}"#),
            Ok(Pooling::Last)
        );
        assert_eq!(
            mode(r#"{"word_embedding_dimension": 384}"#),
            Ok(Pooling::Mean)
        );
        let legacy_none = r#"{"pooling_mode_cls_token": false, "pooling_mode_mean_tokens": false}"#;
        assert_eq!(mode(legacy_none), Ok(Pooling::Mean));
        let several = mode(r#"{"pooling_mode": ["mean", "max"]}"#).unwrap_err();
        assert!(several.contains("mean, max"), "{several}");
        let unsupported = mode(r#"{"pooling_mode": "weightedmean"}"#).unwrap_err();
        assert!(unsupported.contains("`weightedmean`"), "{unsupported}");
    }

    #[test]
    fn modules_after_pooling_are_listed_and_normalize_is_not() {
        let dir = folder(&[
            (
                MODULES,
                r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                    {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
                    {"idx":2,"name":"2","path":"2_Dense","type":"sentence_transformers.models.Dense"},
                    {"idx":3,"name":"3","path":"3_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
            ),
            ("1_Pooling/config.json", r#"{"pooling_mode": "cls"}"#),
        ]);
        let st = sentence_transformers(&dir);
        assert_eq!(
            st.after_pooling,
            ["2_Dense (sentence_transformers.models.Dense)"]
        );
        assert!(st.normalize);

        // A Dense after the Normalize leaves the vector at another length.
        let dir = folder(&[(
            MODULES,
            r#"[{"path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
                {"path":"2_Normalize","type":"sentence_transformers.models.Normalize"},
                {"path":"3_Dense","type":"sentence_transformers.models.Dense"}]"#,
        )]);
        let st = sentence_transformers(&dir);
        assert!(!st.normalize);
    }

    #[test]
    fn reads_the_transformer_config_under_its_older_names_and_its_lowercasing() {
        let modules = r#"[{"path":"","type":"sentence_transformers.models.Transformer"}]"#;
        let dir = folder(&[
            (MODULES, modules),
            (
                "sentence_xlm-roberta_config.json",
                r#"{"max_seq_length": 128, "do_lower_case": true}"#,
            ),
        ]);
        let st = sentence_transformers(&dir);
        assert_eq!(
            st.max_seq_length,
            Some((128, "sentence_xlm-roberta_config.json".to_owned()))
        );
        assert!(st.lowercase);
        // The current name wins, as sentence-transformers tries it first.
        let dir = folder(&[
            (MODULES, modules),
            ("sentence_roberta_config.json", r#"{"max_seq_length": 128}"#),
            (SENTENCE_BERT_CONFIG, r#"{"max_seq_length": 256}"#),
        ]);
        let st = sentence_transformers(&dir);
        assert_eq!(
            st.max_seq_length,
            Some((256, SENTENCE_BERT_CONFIG.to_owned()))
        );
        assert!(!st.lowercase);
    }

    #[test]
    fn reads_the_transformer_config_from_the_module_folder_early_releases_saved() {
        // As sentence-transformers 0.x saved bert-base-nli-mean-tokens: each module in a folder
        // of its own, the Transformer's config in `0_BERT`.
        let modules = r#"[{"idx":0,"name":"0","path":"0_BERT","type":"sentence_transformers.models.BERT"},
            {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#;
        let dir = folder(&[
            (MODULES, modules),
            (
                "0_BERT/sentence_bert_config.json",
                r#"{"max_seq_length": 128, "do_lower_case": true}"#,
            ),
            (SENTENCE_BERT_CONFIG, r#"{"max_seq_length": 512}"#),
            (
                "1_Pooling/config.json",
                r#"{"pooling_mode_mean_tokens": true}"#,
            ),
        ]);
        let st = sentence_transformers(&dir);
        assert_eq!(
            st.max_seq_length,
            Some((128, "0_BERT/sentence_bert_config.json".to_owned()))
        );
        assert!(st.lowercase);

        let escaping =
            r#"[{"path":"../elsewhere","type":"sentence_transformers.models.Transformer"}]"#;
        let dir = folder(&[(MODULES, escaping)]);
        let error = HfFiles::read(dir.path()).unwrap_err().to_string();
        assert!(error.contains("leaves the model folder"), "{error}");
    }

    #[test]
    fn reads_eos_ids_as_one_or_many_and_labels_in_order() {
        let dir = folder(&[
            (
                GENERATION_CONFIG,
                r#"{"eos_token_id": [2, 7], "do_sample": true, "top_p": 0.9}"#,
            ),
            (
                CONFIG,
                r#"{"eos_token_id": 2, "id2label": {"1": "POSITIVE", "0": "NEGATIVE"}, "model_max_length": 1e30}"#,
            ),
            (
                TOKENIZER_CONFIG,
                r#"{"model_max_length": 1000000000000000019884624838656, "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ messages }}"}]}"#,
            ),
        ]);
        let files = HfFiles::read(dir.path()).unwrap();
        let generation = files.generation.unwrap();
        assert_eq!(generation.eos_token_id.to_vec(), Some(vec![2, 7]));
        assert_eq!(generation.do_sample, Some(true));
        let config = files.config.unwrap();
        assert_eq!(config.eos_token_id.to_vec(), Some(vec![2]));
        assert_eq!(config.labels().unwrap().unwrap(), ["NEGATIVE", "POSITIVE"]);
        assert_eq!(
            files.tokenizer.unwrap().max_length(),
            None,
            "1e30 means no limit"
        );
        assert_eq!(
            files.chat_template.unwrap(),
            ("{{ messages }}".to_string(), TOKENIZER_CONFIG)
        );
    }

    #[test]
    fn files_that_do_not_parse_or_disagree_are_named() {
        let dir = folder(&[(CONFIG, "{ not json")]);
        let error = format!("{:#}", HfFiles::read(dir.path()).unwrap_err());
        assert!(error.contains(CONFIG), "{error}");

        let dir = folder(&[(CONFIG, r#"{"id2label": {"0": "a", "2": "c"}}"#)]);
        let error = HfFiles::read(dir.path())
            .unwrap()
            .config
            .unwrap()
            .labels()
            .unwrap_err();
        assert!(error.to_string().contains("without gaps"), "{error}");

        let dir = folder(&[
            (
                MODULES,
                r#"[{"path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#,
            ),
            (
                "1_Pooling/config.json",
                r#"{"pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": true}"#,
            ),
        ]);
        // Kept with the files, not failed on: model.toml's [embed] pooling may override it.
        let st = HfFiles::read(dir.path()).unwrap().sentence_transformers;
        let error = st.unwrap().pooling.unwrap().0.unwrap_err();
        assert!(
            error.contains("several pooling modes") && error.contains("[embed] pooling"),
            "{error}"
        );

        let dir = folder(&[(
            MODULES,
            r#"[{"path":"../elsewhere","type":"sentence_transformers.models.Pooling"}]"#,
        )]);
        let error = format!("{:#}", HfFiles::read(dir.path()).unwrap_err());
        assert!(error.contains("leaves the model folder"), "{error}");
    }

    /// sentence-transformers reads a CrossEncoder's activation from its own config first, then
    /// from config.json as versions 4-5 and earlier ones wrote it; a plain transformers
    /// classifier is no CrossEncoder.
    #[test]
    fn reads_a_cross_encoders_activation_where_sentence_transformers_does() {
        // As CrossEncoder.save writes them since version 6: a modules.json beside the config.
        let transformer = r#"[{"path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"}]"#;
        let activations = |files: &[(&str, &str)]| {
            let dir = folder(&[files, &[(MODULES, transformer)]].concat());
            HfFiles::read(dir.path())
                .unwrap()
                .cross_encoder
                .map(|model| model.activation_fns)
        };
        let named = |path: &str, file: &'static str| (path.to_owned(), file);
        let identity = "torch.nn.modules.linear.Identity";
        let tanh = "torch.nn.modules.activation.Tanh";
        let sigmoid = "torch.nn.modules.activation.Sigmoid";
        let v6 = r#"{"model_type": "CrossEncoder", "activation_fn": "torch.nn.modules.linear.Identity"}"#;
        let v4 =
            r#"{"sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Tanh"}}"#;
        let v3 =
            r#"{"sbert_ce_default_activation_function": "torch.nn.modules.activation.Sigmoid"}"#;
        // Version 6's file first; config.json's after it, for when the first is not trusted.
        assert_eq!(
            activations(&[(SENTENCE_TRANSFORMERS_CONFIG, v6), (CONFIG, v4)]),
            Some(vec![
                named(identity, SENTENCE_TRANSFORMERS_CONFIG),
                named(tanh, CONFIG)
            ])
        );
        assert_eq!(
            activations(&[(CONFIG, v4)]),
            Some(vec![named(tanh, CONFIG)])
        );
        assert_eq!(
            activations(&[(CONFIG, v3)]),
            Some(vec![named(sigmoid, CONFIG)])
        );
        // Version 4's key, there but null, hides the older one, as sentence-transformers'
        // if/elif does.
        let both = r#"{"sentence_transformers": {"activation_fn": null},
                       "sbert_ce_default_activation_function": "torch.nn.modules.activation.Sigmoid"}"#;
        assert_eq!(activations(&[(CONFIG, both)]), Some(Vec::new()));
        // A CrossEncoder that names none gets its default, chosen by the label count.
        let unnamed = r#"{"model_type": "CrossEncoder", "activation_fn": null}"#;
        assert_eq!(
            activations(&[(SENTENCE_TRANSFORMERS_CONFIG, unnamed)]),
            Some(Vec::new())
        );
        assert_eq!(
            activations(&[(CONFIG, r#"{"problem_type": "regression"}"#)]),
            None
        );
        let embedder = r#"{"model_type": "SentenceTransformer", "prompts": {}}"#;
        assert_eq!(
            activations(&[(SENTENCE_TRANSFORMERS_CONFIG, embedder)]),
            None
        );
        // Without a modules.json sentence-transformers reads no config of its own, so one it
        // could not parse does not fail the load either.
        let dir = folder(&[(SENTENCE_TRANSFORMERS_CONFIG, v6)]);
        assert_eq!(HfFiles::read(dir.path()).unwrap().cross_encoder, None);
        let dir = folder(&[(SENTENCE_TRANSFORMERS_CONFIG, "{not json")]);
        assert!(HfFiles::read(dir.path()).is_ok());
        let modules = r#"[{"path": "", "type": "sentence_transformers.models.Transformer"}]"#;
        let dir = folder(&[
            (MODULES, modules),
            (SENTENCE_TRANSFORMERS_CONFIG, "{not json"),
        ]);
        let error = format!("{:#}", HfFiles::read(dir.path()).unwrap_err());
        assert!(error.contains(SENTENCE_TRANSFORMERS_CONFIG), "{error}");
    }

    /// Prompts and truncate_dim reach the class the save was made by: a CrossEncoder's prompt
    /// is its own, an embedder's (model_type absent or SentenceTransformer) Embed's.
    #[test]
    fn a_saves_prompts_go_to_the_class_it_was_saved_as() {
        let modules = r#"[{"path": "", "type": "sentence_transformers.models.Transformer"}]"#;
        let config = |model_type: &str| {
            format!(
                r#"{{{model_type}"prompts": {{"query": "query: "}}, "default_prompt_name": "query", "truncate_dim": 8}}"#
            )
        };
        let read = |st_config: &str| {
            let dir = folder(&[
                (MODULES, modules),
                (SENTENCE_TRANSFORMERS_CONFIG, st_config),
            ]);
            HfFiles::read(dir.path()).unwrap()
        };
        let reranker = read(&config(r#""model_type": "CrossEncoder", "#));
        assert_eq!(
            reranker.cross_encoder.unwrap().prompt.as_deref(),
            Some("query: ")
        );
        let st = reranker.sentence_transformers.unwrap();
        assert!(st.prompts.is_empty() && st.truncate_dim.is_none(), "{st:?}");
        // A default prompt the CrossEncoder lacks fails the load, as in sentence-transformers.
        let lacking =
            r#"{"model_type": "CrossEncoder", "prompts": {}, "default_prompt_name": "query"}"#;
        let dir = folder(&[(MODULES, modules), (SENTENCE_TRANSFORMERS_CONFIG, lacking)]);
        let error = HfFiles::read(dir.path()).unwrap_err().to_string();
        assert!(error.contains("default_prompt_name `query`"), "{error}");
        for model_type in ["", r#""model_type": "SentenceTransformer", "#] {
            let embedder = read(&config(model_type));
            assert_eq!(embedder.cross_encoder, None);
            let st = embedder.sentence_transformers.unwrap();
            assert_eq!(st.default_prompt_name.as_deref(), Some("query"));
            assert_eq!(st.truncate_dim, Some(8));
        }
    }

    #[test]
    fn a_null_top_k_is_told_apart_from_an_absent_one() {
        let top_k = |json: &str| {
            serde_json::from_str::<GenerationConfig>(json)
                .unwrap()
                .top_k
        };
        assert_eq!(top_k("{}"), None);
        assert_eq!(top_k(r#"{"top_k": null}"#), Some(None));
        assert_eq!(top_k(r#"{"top_k": 5}"#), Some(Some(5)));
    }

    #[test]
    fn a_tokenizer_without_token_type_ids_in_its_inputs_omits_them() {
        let config = |json: &str| serde_json::from_str::<TokenizerConfig>(json).unwrap();
        assert!(
            config(r#"{"model_input_names": ["input_ids", "attention_mask"]}"#).omits_token_types()
        );
        assert!(
            !config(r#"{"model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}"#)
                .omits_token_types()
        );
        assert!(!config("{}").omits_token_types());
    }
}
