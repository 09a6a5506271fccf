//! A model version's effective settings: the manifest where it speaks, else the Hugging Face
//! files beside the graph, else the graph or a default. Each value keeps where it came from, so
//! GetModel and `lmserve inspect` can show why the server does what it does.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use anyhow::bail;
use tokenizers::Tokenizer;

use super::hf::{self, HfFiles};
use super::manifest::{Activation, Family, Manifest};
use crate::error::Task;
use crate::runtime::GraphIo;
use crate::runtime::batch_size::BestBatch;
use crate::runtime::bindings::Bindings;
use crate::runtime::encoder::Pooling;

/// Where an effective setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Manifest,
    /// A Hugging Face file beside the graph, by its path in the version folder.
    File(Cow<'static, str>),
    /// A dimension the graph declares.
    Graph,
    /// The tokenizer's own definition (its post-processor, its special tokens).
    Tokenizer,
    /// Timed on this host when the version loaded.
    Measured,
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Manifest => f.write_str(super::manifest::MANIFEST_FILE),
            Source::File(name) => f.write_str(name),
            Source::Graph => f.write_str("graph"),
            Source::Tokenizer => f.write_str("tokenizer.json"),
            Source::Measured => f.write_str("measured at load"),
            Source::Default => f.write_str("default"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sourced<T> {
    pub value: T,
    pub source: Source,
}

fn sourced<T>(value: T, source: Source) -> Sourced<T> {
    Sourced { value, source }
}

/// The first value found, in order of precedence.
fn first<T>(candidates: impl IntoIterator<Item = Option<Sourced<T>>>) -> Option<Sourced<T>> {
    candidates.into_iter().flatten().next()
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    /// Whether the model generates (and the token ids and defaults of generation apply).
    pub generates: bool,
    /// Longest token sequence the model sees, special tokens included.
    pub max_length: Sourced<usize>,
    /// Whether inputs get the tokenizer's special tokens (its post-processor).
    pub add_special_tokens: Sourced<bool>,
    /// How many tokens the post-processor adds to one text (0 when it adds none).
    pub special_tokens_added: usize,
    pub bos_token_id: Option<Sourced<u32>>,
    /// Generation stops at any of these (unless a request ignores EOS).
    pub eos_token_ids: Sourced<Vec<u32>>,
    pub pad_token_id: Sourced<u32>,
    /// An encoder-decoder's first target token.
    pub decoder_start_token_id: Option<Sourced<u32>>,
    /// The token an encoder-decoder's first generated token is forced to.
    pub forced_bos_token_id: Option<Sourced<u32>>,
    /// The tokens a sequence's last allowed token is forced to (any one of them).
    pub forced_eos_token_ids: Option<Sourced<Vec<u32>>>,
    pub embed: Option<EmbedSettings>,
    pub classify: Option<ClassifySettings>,
    pub generation: GenerationDefaults,
    /// Kept for a chat API: the Jinja template that turns messages into a prompt.
    pub chat_template: Option<Sourced<String>>,
    /// How many token types the model tells apart (config.json's `type_vocab_size`), where known;
    /// 1 where tokenizer_config.json's `model_input_names` leaves type ids out.
    pub token_types: Option<Sourced<usize>>,
    /// An encoder's batch limits with the best rate per row here (runtime::batch_size); the
    /// batcher forms no bigger batches, nor bigger than `[batching]` allows.
    pub best_batch: Option<Sourced<BestBatch>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbedSettings {
    /// How per-token states are pooled (when the graph has them).
    pub pooling: Sourced<Pooling>,
    /// Whether Embed uses the graph's own pooled output rather than pooling states itself.
    pub use_pooled_output: bool,
    /// sentence-transformers modules after pooling that only the pooled output includes
    /// (`hf::SentenceTransformers::after_pooling`): pooling states here would leave them out.
    pub after_pooling: Vec<String>,
    pub normalize: Sourced<bool>,
    /// sentence-transformers' prompts by name, put before a text as `encode` puts them.
    pub prompts: Option<Sourced<BTreeMap<String, String>>>,
    /// The prompt a request that names none gets.
    pub default_prompt_name: Option<Sourced<String>>,
    /// Whether pooling counts a prompt's tokens (the Pooling config's `include_prompt`).
    pub prompt_in_pooling: bool,
    /// How many leading values of each vector a request that names no `dimensions` gets.
    pub truncate_dim: Option<Sourced<usize>>,
}

impl EmbedSettings {
    /// The text put before each input: `name`'s prompt (`""`: none), or the default one. A
    /// name the model lacks is the request's `prompt_name` error.
    pub fn prompt(&self, name: Option<&str>) -> crate::error::Result<Option<&str>> {
        let Some(name) = name.or(self.default_prompt_name.as_ref().map(|d| d.value.as_str()))
        else {
            return Ok(None);
        };
        if name.is_empty() {
            return Ok(None);
        }
        let prompts = self.prompts.as_ref().map(|p| &p.value);
        if let Some(prompt) = prompts.and_then(|prompts| prompts.get(name)) {
            return Ok(Some(prompt.as_str()));
        }
        let known = match prompts {
            Some(prompts) => format!(
                "the model's are {}",
                prompts
                    .keys()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => format!("the model has none ({})", hf::SENTENCE_TRANSFORMERS_CONFIG),
        };
        Err(crate::error::Error::invalid(
            "prompt_name",
            format!("no prompt is named {}; {known}", crate::error::echo(name)),
        ))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClassifySettings {
    pub labels: Sourced<Vec<String>>,
    pub multi_label: Sourced<bool>,
    /// What a request that leaves `scores` unset gets: the logits through this function. A
    /// regression head's values come as they are (config.json's `problem_type`), a
    /// sentence-transformers CrossEncoder's through its `activation_fn`.
    pub activation: Sourced<Activation>,
    /// A sentence-transformers CrossEncoder's default prompt (`default_prompt_name` in
    /// config_sentence_transformers.json), put before each text (a pair's first), as
    /// `CrossEncoder.predict` puts it.
    pub prompt: Option<Sourced<String>>,
}

/// The model's defaults for a Generate request's unset parameters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub max_new_tokens: Option<Sourced<u32>>,
    /// The whole sequence's length limit, the prompt (or start token) included; applies where
    /// neither the request nor `max_new_tokens` sets the length.
    pub max_length: Option<Sourced<u32>>,
    pub min_new_tokens: Option<Sourced<u32>>,
    /// The whole sequence's least length, counted as `max_length` is.
    pub min_length: Option<Sourced<u32>>,
    pub no_repeat_ngram_size: Option<Sourced<u32>>,
    pub bad_words_ids: Option<Sourced<Vec<Vec<u32>>>>,
    pub suppress_tokens: Option<Sourced<Vec<u32>>>,
    pub begin_suppress_tokens: Option<Sourced<Vec<u32>>>,
    pub temperature: Option<Sourced<f32>>,
    pub top_p: Option<Sourced<f32>>,
    pub top_k: Option<Sourced<u32>>,
    pub repetition_penalty: Option<Sourced<f32>>,
    pub do_sample: Option<Sourced<bool>>,
    pub num_beams: Option<Sourced<u32>>,
    pub length_penalty: Option<Sourced<f32>>,
    pub early_stopping: Option<Sourced<crate::kinds::EarlyStopping>>,
}

/// One effective setting, rendered for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingRow {
    pub name: String,
    pub value: String,
    pub source: String,
}

impl ModelSettings {
    /// Works out every setting for a version whose graph and tokenizer are known.
    pub fn resolve(
        manifest: &Manifest,
        files: &HfFiles,
        tokenizer: &Tokenizer,
        graph: &GraphIo,
        bindings: &Bindings,
    ) -> anyhow::Result<Self> {
        let config = files.config.as_ref();
        let generation = files.generation.as_ref();
        let tokenizer_config = files.tokenizer.as_ref();
        let st = files.sentence_transformers.as_ref();
        let file = |name: &'static str| Source::File(Cow::Borrowed(name));
        let special_id = |token: Option<&hf::SpecialToken>| {
            token.and_then(|token| tokenizer.token_to_id(token.content()))
        };

        let max_length = first([
            manifest.max_length.map(|v| sourced(v, Source::Manifest)),
            st.and_then(|st| st.max_seq_length.as_ref())
                .map(|(v, name)| sourced(*v, Source::File(Cow::Owned(name.clone())))),
            smallest(
                tokenizer_config
                    .and_then(|c| c.max_length())
                    .map(|v| sourced(v, file(hf::TOKENIZER_CONFIG))),
                config
                    .and_then(|c| c.max_positions())
                    .map(|v| sourced(v, file(hf::CONFIG))),
            ),
            static_sequence_length(graph, bindings).map(|v| sourced(v, Source::Graph)),
        ])
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot tell the model's maximum length: no config.json (max_position_embeddings), tokenizer_config.json (model_max_length) or fixed input length; set max_length in model.toml"
            )
        })?;

        let add_special_tokens = match manifest.add_special_tokens {
            Some(add) => sourced(add, Source::Manifest),
            None => sourced(true, Source::Tokenizer),
        };
        let special_tokens_added = if add_special_tokens.value {
            tokenizer.get_post_processor().map_or(0, |processor| {
                tokenizers::PostProcessor::added_tokens(processor, false)
            })
        } else {
            0
        };
        if special_tokens_added >= max_length.value {
            bail!(
                "max_length {} leaves no room for text after the {special_tokens_added} special tokens the tokenizer adds",
                max_length.value
            );
        }

        let bos_token_id = first([
            manifest.bos_token_id.map(|v| sourced(v, Source::Manifest)),
            generation
                .and_then(|g| g.bos_token_id)
                .map(|v| sourced(v, file(hf::GENERATION_CONFIG))),
            config
                .and_then(|c| c.bos_token_id)
                .map(|v| sourced(v, file(hf::CONFIG))),
            special_id(tokenizer_config.and_then(|c| c.bos_token.as_ref()))
                .map(|v| sourced(v, file(hf::TOKENIZER_CONFIG))),
        ]);
        let eos_token_ids = first([
            manifest
                .eos_token_ids
                .clone()
                .map(|v| sourced(v, Source::Manifest)),
            generation
                .and_then(|g| g.eos_token_id.to_vec())
                .map(|v| sourced(v, file(hf::GENERATION_CONFIG))),
            config
                .and_then(|c| c.eos_token_id.to_vec())
                .map(|v| sourced(v, file(hf::CONFIG))),
            special_id(tokenizer_config.and_then(|c| c.eos_token.as_ref()))
                .map(|v| sourced(vec![v], file(hf::TOKENIZER_CONFIG))),
        ])
        .unwrap_or(sourced(Vec::new(), Source::Default));
        let pad_token_id = first([
            manifest.pad_token_id.map(|v| sourced(v, Source::Manifest)),
            generation
                .and_then(|g| g.pad_token_id)
                .map(|v| sourced(v, file(hf::GENERATION_CONFIG))),
            config
                .and_then(|c| c.pad_token_id)
                .map(|v| sourced(v, file(hf::CONFIG))),
            special_id(tokenizer_config.and_then(|c| c.pad_token.as_ref()))
                .map(|v| sourced(v, file(hf::TOKENIZER_CONFIG))),
            // transformers pads a decoder with its EOS when it names no pad token.
            eos_token_ids
                .value
                .first()
                .map(|&v| sourced(v, eos_token_ids.source.clone())),
        ])
        .unwrap_or(sourced(0, Source::Default));
        let decoder_start_token_id = if manifest.family == Family::EncoderDecoder {
            let found = first([
                manifest
                    .decoder_start_token_id
                    .map(|v| sourced(v, Source::Manifest)),
                generation
                    .and_then(|g| g.decoder_start_token_id)
                    .map(|v| sourced(v, file(hf::GENERATION_CONFIG))),
                config
                    .and_then(|c| c.decoder_start_token_id)
                    .map(|v| sourced(v, file(hf::CONFIG))),
            ])
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "an encoder-decoder needs the token its targets start from: set decoder_start_token_id in model.toml, generation_config.json or config.json"
                )
            })?;
            Some(found)
        } else {
            None
        };
        let (forced_bos_token_id, forced_eos_token_ids) =
            forced_tokens(manifest, generation, config);
        let vocab = tokenizer.get_vocab_size(true);
        let forced = forced_bos_token_id
            .iter()
            .map(|forced| ("forced_bos_token_id", forced.value, &forced.source))
            .chain(forced_eos_token_ids.iter().flat_map(|forced| {
                let source = &forced.source;
                forced
                    .value
                    .iter()
                    .map(move |&id| ("forced_eos_token_id", id, source))
            }));
        for (name, id, source) in forced {
            if id as usize >= vocab {
                bail!(
                    "{name} {id} (from {source}) is outside the tokenizer's vocabulary of {vocab}"
                );
            }
        }
        if pad_token_id.value as usize >= vocab {
            bail!(
                "pad_token_id {} (from {}) is outside the tokenizer's vocabulary of {vocab}",
                pad_token_id.value,
                pad_token_id.source
            );
        }
        if manifest.serves(Task::Generate) && eos_token_ids.value.is_empty() {
            tracing::warn!(
                "no end-of-sequence id in model.toml, generation_config.json, config.json or tokenizer_config.json: generation stops only on length, stop sequences or stop ids"
            );
        }

        let embed = if manifest.serves(Task::Embed) {
            Some(embed_settings(manifest, files, bindings)?)
        } else {
            None
        };
        let classify = if manifest.serves(Task::Classify) {
            Some(classify_settings(manifest, files, graph, bindings)?)
        } else {
            None
        };

        let generation_defaults = if manifest.serves(Task::Generate) {
            generation_defaults(manifest, generation)
        } else {
            GenerationDefaults::default()
        };

        Ok(Self {
            generates: manifest.serves(Task::Generate),
            max_length,
            add_special_tokens,
            special_tokens_added,
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            decoder_start_token_id,
            forced_bos_token_id,
            forced_eos_token_ids,
            embed,
            classify,
            generation: generation_defaults,
            chat_template: files
                .chat_template
                .clone()
                .map(|(template, name)| sourced(template, file(name))),
            // One type is as good as none: every id is then fed as 0, as transformers feeds
            // the model no type ids when its tokenizer leaves them out.
            token_types: first([
                files
                    .tokenizer
                    .as_ref()
                    .filter(|tokenizer| tokenizer.omits_token_types())
                    .map(|_| sourced(1, file(hf::TOKENIZER_CONFIG))),
                config
                    .and_then(|c| c.type_vocab_size)
                    .map(|types| sourced(types, file(hf::CONFIG))),
            ]),
            best_batch: None,
        })
    }

    /// Every setting as a row of name, value and source, in a stable order.
    pub fn rows(&self) -> Vec<SettingRow> {
        let mut rows = Rows::default();
        rows.add("max_length", &self.max_length);
        rows.push(
            "add_special_tokens",
            format!(
                "{} ({} added per text)",
                self.add_special_tokens.value, self.special_tokens_added
            ),
            &self.add_special_tokens.source,
        );
        if self.generates {
            rows.add_optional("bos_token_id", &self.bos_token_id);
            rows.add_optional("decoder_start_token_id", &self.decoder_start_token_id);
            rows.add_optional("forced_bos_token_id", &self.forced_bos_token_id);
            rows.add_listed("forced_eos_token_ids", &self.forced_eos_token_ids);
            rows.push(
                "eos_token_ids",
                format!("{:?}", self.eos_token_ids.value),
                &self.eos_token_ids.source,
            );
        }
        rows.add("pad_token_id", &self.pad_token_id);
        if !self.generates {
            rows.add_optional("token_types", &self.token_types);
        }
        if let Some(embed) = &self.embed {
            if embed.use_pooled_output {
                rows.push(
                    "embed.pooling",
                    "the graph's pooled output".into(),
                    &Source::Graph,
                );
            } else {
                let pooling = pooling_name(embed.pooling.value).to_owned();
                rows.push("embed.pooling", pooling, &embed.pooling.source);
            }
            rows.add("embed.normalize", &embed.normalize);
            if let Some(prompts) = &embed.prompts {
                rows.push(
                    "embed.prompts",
                    format!("{:?}", prompts.value),
                    &prompts.source,
                );
            }
            rows.add_optional("embed.default_prompt_name", &embed.default_prompt_name);
            rows.add_optional("embed.truncate_dim", &embed.truncate_dim);
        }
        if let Some(classify) = &self.classify {
            rows.push(
                "classify.labels",
                format!("{:?}", classify.labels.value),
                &classify.labels.source,
            );
            rows.add("classify.multi_label", &classify.multi_label);
            rows.add("classify.activation", &classify.activation);
            rows.add_optional("classify.prompt", &classify.prompt);
        }
        let generation = &self.generation;
        rows.add_optional("generation.max_new_tokens", &generation.max_new_tokens);
        rows.add_optional("generation.max_length", &generation.max_length);
        rows.add_optional("generation.min_new_tokens", &generation.min_new_tokens);
        rows.add_optional("generation.min_length", &generation.min_length);
        rows.add_optional(
            "generation.no_repeat_ngram_size",
            &generation.no_repeat_ngram_size,
        );
        rows.add_listed("generation.suppress_tokens", &generation.suppress_tokens);
        rows.add_listed(
            "generation.begin_suppress_tokens",
            &generation.begin_suppress_tokens,
        );
        rows.add_listed("generation.bad_words_ids", &generation.bad_words_ids);
        rows.add_optional("generation.temperature", &generation.temperature);
        rows.add_optional("generation.top_p", &generation.top_p);
        rows.add_optional("generation.top_k", &generation.top_k);
        rows.add_optional(
            "generation.repetition_penalty",
            &generation.repetition_penalty,
        );
        rows.add_optional("generation.do_sample", &generation.do_sample);
        rows.add_optional("generation.num_beams", &generation.num_beams);
        rows.add_optional("generation.length_penalty", &generation.length_penalty);
        rows.add_optional("generation.early_stopping", &generation.early_stopping);
        if let Some(best) = &self.best_batch {
            rows.push(
                "batching.best_batch_size",
                best.value.rows.to_string(),
                &best.source,
            );
            rows.push(
                "batching.best_batch_tokens",
                best.value.tokens.to_string(),
                &best.source,
            );
        }
        if let Some(template) = &self.chat_template {
            let size = format!("{} characters", template.value.chars().count());
            rows.push("chat_template", size, &template.source);
        }
        rows.0
    }
}

#[derive(Default)]
struct Rows(Vec<SettingRow>);

impl Rows {
    fn push(&mut self, name: &str, value: String, source: &Source) {
        self.0.push(SettingRow {
            name: name.to_owned(),
            value,
            source: source.to_string(),
        });
    }

    fn add<T: fmt::Display>(&mut self, name: &str, setting: &Sourced<T>) {
        self.push(name, setting.value.to_string(), &setting.source);
    }

    fn add_optional<T: fmt::Display>(&mut self, name: &str, setting: &Option<Sourced<T>>) {
        if let Some(setting) = setting {
            self.add(name, setting);
        }
    }

    /// A list, written as `[a, b]`.
    fn add_listed<T: fmt::Debug>(&mut self, name: &str, setting: &Option<Sourced<Vec<T>>>) {
        if let Some(setting) = setting {
            self.push(name, format!("{:?}", setting.value), &setting.source);
        }
    }
}

/// The tokens transformers' generate forces (its ForcedBOS and ForcedEOS logits processors).
/// As there, generation_config.json, when present, is the whole generation config: config.json
/// is read only without it. The forced BOS applies to encoder-decoders alone, whose target is
/// one token long (the start token) when the first token is chosen.
fn forced_tokens(
    manifest: &Manifest,
    generation: Option<&hf::GenerationConfig>,
    config: Option<&hf::ModelConfig>,
) -> (Option<Sourced<u32>>, Option<Sourced<Vec<u32>>>) {
    let file = |name: &'static str| Source::File(Cow::Borrowed(name));
    let (bos, eos, from) = match (generation, config) {
        (Some(g), _) => (
            g.forced_bos_token_id,
            g.forced_eos_token_id.to_vec(),
            file(hf::GENERATION_CONFIG),
        ),
        (None, Some(c)) => (
            c.forced_bos_token_id,
            c.forced_eos_token_id.to_vec(),
            file(hf::CONFIG),
        ),
        (None, None) => (None, None, Source::Default),
    };
    let bos = match manifest.forced_bos_token_id {
        Some(id) => Some(sourced(id, Source::Manifest)),
        None => bos.map(|id| sourced(id, from.clone())),
    }
    .filter(|_| manifest.family == Family::EncoderDecoder);
    let eos = match &manifest.forced_eos_token_ids {
        Some(ids) => Some(sourced(ids.clone(), Source::Manifest)),
        None => eos.map(|ids| sourced(ids, from)),
    }
    .filter(|forced| !forced.value.is_empty());
    (bos, eos)
}

/// `GenerationConfig.top_k` in transformers when generation_config.json leaves it out.
const TRANSFORMERS_TOP_K: u32 = 50;

/// The manifest's `[generation]` over generation_config.json. A file's value outside the range
/// a request may use (temperature 0, say) is left out with a warning rather than failing every
/// request that does not set it.
fn generation_defaults(
    manifest: &Manifest,
    file: Option<&hf::GenerationConfig>,
) -> GenerationDefaults {
    fn pick<T: Copy + fmt::Display>(
        name: &str,
        own: Option<T>,
        theirs: Option<T>,
        valid: impl Fn(T) -> bool,
    ) -> Option<Sourced<T>> {
        let theirs = theirs.filter(|&value| {
            let ok = valid(value);
            if !ok {
                tracing::warn!(setting = name, %value, "generation_config.json value out of range; ignored");
            }
            ok
        });
        first([
            own.map(|v| sourced(v, Source::Manifest)),
            theirs.map(|v| sourced(v, Source::File(Cow::Borrowed(hf::GENERATION_CONFIG)))),
        ])
    }
    let own = manifest.generation.clone().unwrap_or_default();
    let has_file = file.is_some();
    let file = file.cloned().unwrap_or_default();
    let positive = |v: f32| v > 0.0 && v.is_finite();
    let from_file = |list: Option<Vec<u32>>| {
        list.filter(|list| !list.is_empty())
            .map(|list| sourced(list, Source::File(Cow::Borrowed(hf::GENERATION_CONFIG))))
    };
    GenerationDefaults {
        max_new_tokens: pick(
            "max_new_tokens",
            own.max_new_tokens,
            file.max_new_tokens,
            |v| v > 0,
        ),
        max_length: pick("max_length", own.max_length, file.max_length, |v| v > 0),
        min_new_tokens: pick(
            "min_new_tokens",
            own.min_new_tokens,
            file.min_new_tokens,
            |_| true,
        ),
        min_length: pick("min_length", own.min_length, file.min_length, |_| true),
        no_repeat_ngram_size: pick(
            "no_repeat_ngram_size",
            own.no_repeat_ngram_size,
            file.no_repeat_ngram_size,
            |_| true,
        ),
        bad_words_ids: file
            .bad_words_ids
            .filter(|words| !words.is_empty())
            .map(|words| sourced(words, Source::File(Cow::Borrowed(hf::GENERATION_CONFIG)))),
        suppress_tokens: from_file(file.suppress_tokens),
        begin_suppress_tokens: from_file(file.begin_suppress_tokens),
        temperature: pick("temperature", own.temperature, file.temperature, positive),
        top_p: pick("top_p", own.top_p, file.top_p, |v| v > 0.0 && v <= 1.0),
        // transformers' GenerationConfig samples among the 50 most likely tokens where the file
        // names no top_k (its class default), so a model described by that file samples so here
        // too; one without the file, or whose file sets it null, has no limit.
        top_k: pick("top_k", own.top_k, file.top_k.flatten(), |_| true).or_else(|| {
            (has_file && file.top_k.is_none()).then(|| sourced(TRANSFORMERS_TOP_K, Source::Default))
        }),
        repetition_penalty: pick(
            "repetition_penalty",
            own.repetition_penalty,
            file.repetition_penalty,
            positive,
        ),
        do_sample: pick("do_sample", own.do_sample, file.do_sample, |_| true),
        num_beams: pick("num_beams", own.num_beams, file.num_beams, |v| v >= 1),
        length_penalty: pick(
            "length_penalty",
            own.length_penalty,
            file.length_penalty,
            f32::is_finite,
        ),
        early_stopping: pick(
            "early_stopping",
            own.early_stopping,
            file.early_stopping,
            |_| true,
        ),
    }
}

pub fn pooling_name(pooling: Pooling) -> &'static str {
    match pooling {
        Pooling::Mean => "mean",
        Pooling::Cls => "cls",
        Pooling::Last => "last",
        Pooling::Max => "max",
    }
}

/// The smaller of two limits: a tokenizer longer than the model's positions still cannot
/// feed more positions than the model has.
fn smallest(a: Option<Sourced<usize>>, b: Option<Sourced<usize>>) -> Option<Sourced<usize>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.value < a.value { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// The sequence axis of `input_ids` when the graph fixes it.
fn static_sequence_length(graph: &GraphIo, bindings: &Bindings) -> Option<usize> {
    graph
        .inputs
        .iter()
        .find(|spec| spec.name == bindings.input_ids)
        .and_then(|spec| spec.shape.get(1).copied())
        .filter(|&dim| dim > 0)
        .map(|dim| dim as usize)
}

fn embed_settings(
    manifest: &Manifest,
    files: &HfFiles,
    bindings: &Bindings,
) -> anyhow::Result<EmbedSettings> {
    let section = manifest.embed.clone().unwrap_or_default();
    let st = files.sentence_transformers.as_ref();
    // A model whose prompts pooling leaves out (`include_prompt: false`) is pooled here where
    // the server can follow its Pooling module: an exported graph pools every token it is fed.
    let pools_prompts_out_here = bindings.hidden_states.is_some()
        && st.is_some_and(|st| {
            !st.prompt_in_pooling
                && !st.prompts.is_empty()
                && st.after_pooling.is_empty()
                && matches!(st.pooling, Some((Ok(_), _)))
        });
    // The graph's pooled output is the authors' own pooling; a manifest that names a pooling
    // mode over per-token states, or a graph with no pooled output, pools here instead.
    let use_pooled_output = bindings.pooled_output.is_some()
        && (section.pooling.is_none() || bindings.hidden_states.is_none())
        && !pools_prompts_out_here;
    // Every request without a prompt name would be refused: the prompt cannot be left out.
    if use_pooled_output
        && let Some(st) = st
        && !st.prompt_in_pooling
        && let Some(name) = &st.default_prompt_name
    {
        anyhow::bail!(
            "{}: default_prompt_name `{name}` is pooled without its tokens (include_prompt false), which this graph's pooled output cannot leave out; export the per-token states (token_embeddings) as well, or drop default_prompt_name",
            hf::SENTENCE_TRANSFORMERS_CONFIG
        );
    }
    // A Pooling module this server cannot follow matters only where nothing overrides it.
    let from_file = match st.and_then(|st| st.pooling.as_ref()) {
        Some((Ok(pooling), file)) => {
            Some(sourced(*pooling, Source::File(Cow::Owned(file.clone()))))
        }
        Some((Err(reason), _)) if section.pooling.is_none() && !use_pooled_output => {
            anyhow::bail!("{reason}")
        }
        Some((Err(_), _)) | None => None,
    };
    let after_pooling = st.map(|st| st.after_pooling.clone()).unwrap_or_default();
    if !use_pooled_output && !after_pooling.is_empty() {
        anyhow::bail!(
            "{} runs {} after pooling, which the server does not; embeddings pooled here from the per-token states would not be the model's. Export the graph with the pipeline's own `sentence_embedding` output (optimum-cli export onnx --library sentence_transformers)",
            hf::MODULES,
            after_pooling.join(", ")
        );
    }
    let pooling = first([
        section.pooling.map(|v| sourced(v, Source::Manifest)),
        from_file,
    ])
    .unwrap_or(sourced(Pooling::Mean, Source::Default));
    let normalize = first([
        section.normalize.map(|v| sourced(v, Source::Manifest)),
        st.map(|st| sourced(st.normalize, Source::File(Cow::Borrowed(hf::MODULES)))),
    ])
    // A pooled output is returned as it is unless told otherwise; pooled states are normalised,
    // as the server always has.
    .unwrap_or(sourced(!use_pooled_output, Source::Default));
    let st_config = || Source::File(Cow::Borrowed(hf::SENTENCE_TRANSFORMERS_CONFIG));
    let truncate_dim = first([
        section.truncate_dim.map(|v| sourced(v, Source::Manifest)),
        st.and_then(|st| st.truncate_dim)
            .map(|v| sourced(v, st_config())),
    ]);
    if let Some(Sourced { value: 0, source }) = &truncate_dim {
        anyhow::bail!("{source}: truncate_dim must be at least 1; got 0");
    }
    Ok(EmbedSettings {
        pooling,
        use_pooled_output,
        after_pooling,
        normalize,
        prompts: st
            .filter(|st| !st.prompts.is_empty())
            .map(|st| sourced(st.prompts.clone(), st_config())),
        default_prompt_name: st
            .and_then(|st| st.default_prompt_name.clone())
            .map(|name| sourced(name, st_config())),
        prompt_in_pooling: st.is_none_or(|st| st.prompt_in_pooling),
        truncate_dim,
    })
}

fn classify_settings(
    manifest: &Manifest,
    files: &HfFiles,
    graph: &GraphIo,
    bindings: &Bindings,
) -> anyhow::Result<ClassifySettings> {
    let section = manifest.classify.clone().unwrap_or_default();
    let config = files.config.as_ref();
    // config.json's id2label is read only where model.toml does not name the labels, so a
    // malformed one can be overridden.
    let from_config = match config {
        Some(config) if section.labels.is_none() => config.labels()?,
        _ => None,
    };
    let labels = first([
        section.labels.map(|v| sourced(v, Source::Manifest)),
        from_config.map(|v| sourced(v, Source::File(Cow::Borrowed(hf::CONFIG)))),
    ])
    .ok_or_else(|| {
        anyhow::anyhow!(
            "the model serves classify but names no labels: set [classify] labels in model.toml, or id2label in config.json"
        )
    })?;
    let width = bindings
        .logits
        .as_ref()
        .and_then(|name| graph.outputs.iter().find(|spec| &spec.name == name))
        .and_then(|spec| spec.shape.last().copied())
        .filter(|&dim| dim > 0);
    if let Some(width) = width
        && width as usize != labels.value.len()
    {
        bail!(
            "the graph's logits have {width} classes but {} names {} labels; make them agree",
            labels.source,
            labels.value.len()
        );
    }
    // One label is scored with a sigmoid whatever problem_type says, as transformers'
    // text-classification pipeline does: a softmax over one logit is always 1.
    let one_label = (labels.value.len() == 1).then(|| sourced(true, labels.source.clone()));
    let multi_label = first([
        section.multi_label.map(|v| sourced(v, Source::Manifest)),
        one_label,
        config.and_then(|c| c.problem_type.as_deref()).map(|kind| {
            let multi = kind == "multi_label_classification";
            sourced(multi, Source::File(Cow::Borrowed(hf::CONFIG)))
        }),
    ])
    .unwrap_or(sourced(false, Source::Default));
    // A model.toml that says how to score the labels speaks for the model: the CrossEncoder's
    // files are then not read, so one naming a function the server lacks still loads.
    let from_manifest = section.activation.or(section.multi_label.map(|multi| {
        if multi {
            Activation::Sigmoid
        } else {
            Activation::Softmax
        }
    }));
    let from_cross_encoder = match (&from_manifest, &files.cross_encoder) {
        (None, Some(model)) => Some(cross_encoder_activation(model, labels.value.len())?),
        _ => None,
    };
    let activation = first([
        from_manifest.map(|v| sourced(v, Source::Manifest)),
        from_cross_encoder,
        // transformers' pipeline checks for regression before anything else.
        config
            .and_then(|c| c.problem_type.as_deref())
            .filter(|&kind| kind == "regression")
            .map(|_| {
                sourced(
                    Activation::Identity,
                    Source::File(Cow::Borrowed(hf::CONFIG)),
                )
            }),
    ])
    .unwrap_or_else(|| {
        let function = if multi_label.value {
            Activation::Sigmoid
        } else {
            Activation::Softmax
        };
        sourced(function, multi_label.source.clone())
    });
    Ok(ClassifySettings {
        labels,
        multi_label,
        activation,
        prompt: cross_encoder_prompt(files),
    })
}

/// The prompt `CrossEncoder.predict` puts before each text when it is given none.
fn cross_encoder_prompt(files: &HfFiles) -> Option<Sourced<String>> {
    let prompt = files.cross_encoder.as_ref()?.prompt.clone()?;
    Some(sourced(
        prompt,
        Source::File(Cow::Borrowed(hf::SENTENCE_TRANSFORMERS_CONFIG)),
    ))
}

/// What `CrossEncoder.predict` applies to the logits: the first activation its files name that
/// sentence-transformers loads (PyTorch's own, without `trust_remote_code`), else a sigmoid
/// for one label and the logits as they are for more. A PyTorch function the server does not
/// apply fails the load, naming it.
fn cross_encoder_activation(
    model: &hf::CrossEncoder,
    labels: usize,
) -> anyhow::Result<Sourced<Activation>> {
    for (path, file) in &model.activation_fns {
        if !path.starts_with("torch.") {
            tracing::warn!(
                activation_fn = %path,
                file,
                "the CrossEncoder names an activation outside PyTorch, which sentence-transformers loads only with trust_remote_code; passing it over"
            );
            continue;
        }
        return match Activation::from_torch_path(path) {
            Some(function) => Ok(sourced(function, Source::File(Cow::Borrowed(file)))),
            None => bail!(
                "{file} names the CrossEncoder activation `{path}`, which the server does not apply (it applies Identity, Sigmoid, Softmax and Tanh); set [classify] activation in model.toml"
            ),
        };
    }
    let function = if labels == 1 {
        Activation::Sigmoid
    } else {
        Activation::Identity
    };
    Ok(sourced(function, Source::Default))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_is_the_named_one_the_default_or_none() {
        let file = || Source::File(Cow::Borrowed(hf::SENTENCE_TRANSFORMERS_CONFIG));
        let mut embed = EmbedSettings {
            pooling: sourced(Pooling::Mean, Source::Default),
            use_pooled_output: false,
            after_pooling: Vec::new(),
            normalize: sourced(true, Source::Default),
            prompts: Some(sourced(
                BTreeMap::from([
                    ("query".to_owned(), "query: ".to_owned()),
                    ("passage".to_owned(), "passage: ".to_owned()),
                ]),
                file(),
            )),
            default_prompt_name: Some(sourced("query".to_owned(), file())),
            prompt_in_pooling: true,
            truncate_dim: None,
        };
        assert_eq!(embed.prompt(None).unwrap(), Some("query: "));
        assert_eq!(embed.prompt(Some("passage")).unwrap(), Some("passage: "));
        assert_eq!(embed.prompt(Some("")).unwrap(), None);
        let error = embed.prompt(Some("doc")).unwrap_err().to_string();
        assert!(
            error.contains("prompt_name") && error.contains("`passage`, `query`"),
            "{error}"
        );
        embed.default_prompt_name = None;
        assert_eq!(embed.prompt(None).unwrap(), None);
        embed.prompts = None;
        let error = embed.prompt(Some("query")).unwrap_err().to_string();
        assert!(error.contains("the model has none"), "{error}");
    }
}
