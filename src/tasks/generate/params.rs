//! Generation parameters as a client sends them, and their validation: every bad value is an
//! INVALID_ARGUMENT naming the field, the limit and the value.

use super::beam::{BeamConfig, EarlyStopping};
use super::sampling::SamplingConfig;
use crate::config::GenerationConfig;
use crate::error::{Error, Result};
use crate::registry::chat::ChatMessage;
use crate::registry::settings::{GenerationDefaults, Sourced};

#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    /// A conversation, rendered with the model's chat template.
    Messages(Vec<ChatMessage>),
}

/// Everything a Generate request asks for, before validation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateParams {
    pub model: String,
    pub prompt: Option<Prompt>,
    pub truncate_prompt: bool,
    pub max_new_tokens: Option<u32>,
    pub min_new_tokens: u32,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub typical_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub keep_special_tokens: bool,
    pub seed: Option<u64>,
    pub n: u32,
    pub top_logprobs: u32,
    pub num_beams: u32,
    pub length_penalty: Option<f32>,
    /// The wire's `EarlyStopping` value, checked with the rest.
    pub early_stopping: i32,
}

/// The model-independent part of a request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub sampling: SamplingConfig,
    /// As asked, already within the server's limit; the model's context may lower it.
    pub max_new_tokens: usize,
    /// Whether `max_new_tokens` is the server's default: neither the request nor the model's
    /// `max_new_tokens` set it, so a model's `max_length` may.
    pub length_unset: bool,
    pub min_new_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Special tokens stay in the text (they are always in the ids).
    pub keep_special_tokens: bool,
    pub seed: Option<u64>,
    pub n: usize,
    pub top_logprobs: usize,
    /// Beam search instead of one token at a time, when asked for with more than one beam.
    pub beams: Option<BeamConfig>,
}

fn check_unit_interval(field: &str, value: Option<f32>) -> Result<f32> {
    match value {
        None => Ok(1.0),
        Some(v) if v > 0.0 && v <= 1.0 => Ok(v),
        Some(v) => Err(Error::invalid(field, format!("must be in (0, 1]; got {v}"))),
    }
}

fn check_penalty(field: &str, value: f32) -> Result<f32> {
    if (-2.0..=2.0).contains(&value) {
        Ok(value)
    } else {
        Err(Error::invalid(
            field,
            format!("must be in [-2, 2]; got {value}"),
        ))
    }
}

fn value<T: Copy>(setting: &Option<Sourced<T>>) -> Option<T> {
    setting.as_ref().map(|setting| setting.value)
}

impl GenerateParams {
    /// The request with the model's own defaults in the parameters it left unset. The sampling
    /// ones apply only when the request samples, as transformers ignores them otherwise; a
    /// default length over the server's limit is lowered to it.
    pub fn with_model_defaults(
        mut self,
        defaults: &GenerationDefaults,
        limits: &GenerationConfig,
    ) -> Self {
        // A temperature of 0 is how many clients say "greedy": the model's sampling does not
        // apply to it.
        if self.temperature == Some(0.0) && self.do_sample.is_none() {
            self.do_sample = Some(false);
        }
        // A beam search asked for does not take the model's sampling: beams here choose the
        // most likely tokens, and a model whose generation_config.json samples (as most chat
        // models' do) must still give the beams a request asks for.
        if self.num_beams <= 1 {
            self.do_sample = self.do_sample.or(value(&defaults.do_sample));
        }
        self.repetition_penalty = self
            .repetition_penalty
            .or(value(&defaults.repetition_penalty));
        self.apply_beam_defaults(defaults);
        let limit = u32::try_from(limits.max_new_tokens).unwrap_or(u32::MAX);
        self.max_new_tokens = self
            .max_new_tokens
            .or(value(&defaults.max_new_tokens).map(|default| default.min(limit)));
        if self.do_sample == Some(true) {
            self.temperature = self.temperature.or(value(&defaults.temperature));
            self.top_p = self.top_p.or(value(&defaults.top_p));
            self.top_k = self.top_k.or(value(&defaults.top_k));
        }
        self
    }

    /// The request's own values, before a model is chosen: an unset `max_new_tokens` may
    /// still take a model's default, up to the server's limit, so `min_new_tokens` is held to
    /// that limit here and to the resolved length by `check`.
    pub fn check_own(&self, limits: &GenerationConfig) -> Result<Checked> {
        self.check_with(limits, limits.max_new_tokens, "the server's limit", false)
    }

    /// Every value, once the model's defaults have joined (`with_model_defaults`).
    pub fn check(&self, limits: &GenerationConfig) -> Result<Checked> {
        self.check_with(
            limits,
            limits.default_max_new_tokens,
            "the server's default length",
            true,
        )
    }

    /// As `check`, on a model whose `max_length` gives an unset `max_new_tokens` what it leaves
    /// after the prompt: before tokenizing, at most `max_length - 1`.
    pub fn check_under_max_length(
        &self,
        limits: &GenerationConfig,
        max_length: usize,
    ) -> Result<Checked> {
        let longest = max_length.saturating_sub(1).clamp(1, limits.max_new_tokens);
        let origin = format!("the model's max_length of {max_length}");
        self.check_with(limits, longest, &origin, true)
    }

    /// `unset_length`: what an unset `max_new_tokens` stands for, and `unset_origin` where
    /// that length comes from, for the error that refuses a longer `min_new_tokens`.
    /// `with_defaults`: the model's defaults have joined, so whether the request samples or
    /// searches beams is known.
    fn check_with(
        &self,
        limits: &GenerationConfig,
        unset_length: usize,
        unset_origin: &str,
        with_defaults: bool,
    ) -> Result<Checked> {
        let max_new_tokens = match self.max_new_tokens {
            None => unset_length,
            Some(0) => {
                return Err(Error::invalid(
                    "parameters.max_new_tokens",
                    "must be at least 1; got 0",
                ));
            }
            Some(v) if v as usize > limits.max_new_tokens => {
                return Err(Error::invalid(
                    "parameters.max_new_tokens",
                    format!(
                        "{v} is over the server's limit of {}",
                        limits.max_new_tokens
                    ),
                ));
            }
            Some(v) => v as usize,
        };
        let min_new_tokens = self.min_new_tokens as usize;
        if min_new_tokens > max_new_tokens {
            let why = match self.max_new_tokens {
                Some(_) => {
                    format!("{min_new_tokens} is more than max_new_tokens ({max_new_tokens})")
                }
                None => format!(
                    "{min_new_tokens} is more than the {max_new_tokens} new tokens {unset_origin} \
                     allows; set max_new_tokens to ask for more"
                ),
            };
            return Err(Error::invalid("parameters.min_new_tokens", why));
        }
        let temperature = match self.temperature {
            None => 1.0,
            Some(t) if t > 0.0 && t.is_finite() => t,
            // Greedy decoding reads no temperature, and 0 is how many clients say "greedy".
            Some(0.0) if self.do_sample != Some(true) => 1.0,
            Some(t) => {
                return Err(Error::invalid(
                    "parameters.temperature",
                    format!("must be > 0; got {t} (for greedy decoding leave do_sample false)"),
                ));
            }
        };
        let repetition_penalty = match self.repetition_penalty {
            None => 1.0,
            Some(p) if p > 0.0 && p.is_finite() => p,
            Some(p) => {
                return Err(Error::invalid(
                    "parameters.repetition_penalty",
                    format!("must be > 0; got {p}"),
                ));
            }
        };
        let n = match self.n {
            0 => 1,
            n if n as usize > limits.max_sequences => {
                return Err(Error::invalid(
                    "parameters.n",
                    format!(
                        "{n} is over the limit of {} sequences",
                        limits.max_sequences
                    ),
                ));
            }
            n => n as usize,
        };
        if self.top_logprobs as usize > limits.max_top_logprobs {
            return Err(Error::invalid(
                "parameters.top_logprobs",
                format!(
                    "{} is over the limit of {}",
                    self.top_logprobs, limits.max_top_logprobs
                ),
            ));
        }
        if self.stop.len() > limits.max_stop_sequences {
            return Err(Error::invalid(
                "parameters.stop",
                format!(
                    "{} stop sequences is over the limit of {}",
                    self.stop.len(),
                    limits.max_stop_sequences
                ),
            ));
        }
        for (index, stop) in self.stop.iter().enumerate() {
            if stop.is_empty() {
                return Err(Error::invalid(
                    format!("parameters.stop[{index}]"),
                    "is empty",
                ));
            }
            if stop.len() > limits.max_stop_sequence_bytes {
                return Err(Error::invalid(
                    format!("parameters.stop[{index}]"),
                    format!(
                        "{} bytes is over the limit of {}",
                        stop.len(),
                        limits.max_stop_sequence_bytes
                    ),
                ));
            }
        }
        if self.stop_token_ids.len() > limits.max_stop_sequences {
            return Err(Error::invalid(
                "parameters.stop_token_ids",
                format!(
                    "{} ids is over the limit of {}",
                    self.stop_token_ids.len(),
                    limits.max_stop_sequences
                ),
            ));
        }
        let sampling = SamplingConfig {
            do_sample: self.do_sample.unwrap_or(false),
            temperature,
            top_k: self.top_k.unwrap_or(0) as usize,
            top_p: check_unit_interval("parameters.top_p", self.top_p)?,
            typical_p: check_unit_interval("parameters.typical_p", self.typical_p)?,
            repetition_penalty,
            frequency_penalty: check_penalty(
                "parameters.frequency_penalty",
                self.frequency_penalty,
            )?,
            presence_penalty: check_penalty("parameters.presence_penalty", self.presence_penalty)?,
        };
        let beams = self.check_beams(&sampling, n, limits, with_defaults)?;
        Ok(Checked {
            beams,
            sampling,
            max_new_tokens,
            length_unset: self.max_new_tokens.is_none(),
            min_new_tokens,
            stop: self.stop.clone(),
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            keep_special_tokens: self.keep_special_tokens,
            seed: self.seed,
            n,
            top_logprobs: self.top_logprobs as usize,
        })
    }
}

impl GenerateParams {
    /// The model's beam search (generation_config.json's `num_beams`, as transformers'
    /// `generate` uses it), for a request that leaves `num_beams` unset and asks for nothing a
    /// beam search cannot give; such a request decodes as it asked instead.
    fn apply_beam_defaults(&mut self, defaults: &GenerationDefaults) {
        if self.length_penalty.is_none() {
            self.length_penalty = value(&defaults.length_penalty);
        }
        if self.early_stopping == 0
            && let Some(stopping) = value(&defaults.early_stopping)
        {
            self.early_stopping = match stopping {
                EarlyStopping::FirstBeams => 1,
                EarlyStopping::Heuristic => 2,
                EarlyStopping::Never => 3,
            };
        }
        let Some(beams) = value(&defaults.num_beams) else {
            return;
        };
        let beam_compatible = self.do_sample != Some(true)
            && self.top_logprobs == 0
            && self.stop.is_empty()
            && self.frequency_penalty == 0.0
            && self.presence_penalty == 0.0
            && self.n <= beams;
        if self.num_beams == 0 && beam_compatible {
            self.num_beams = beams;
        }
    }

    /// A beam search's settings, and what it cannot be combined with.
    fn check_beams(
        &self,
        sampling: &SamplingConfig,
        n: usize,
        limits: &GenerationConfig,
        with_defaults: bool,
    ) -> Result<Option<BeamConfig>> {
        let early_stopping = match self.early_stopping {
            0 | 2 => EarlyStopping::Heuristic,
            1 => EarlyStopping::FirstBeams,
            3 => EarlyStopping::Never,
            other => {
                return Err(Error::invalid(
                    "parameters.early_stopping",
                    format!("unknown value {other}; known: 0 to 3"),
                ));
            }
        };
        let length_penalty = match self.length_penalty {
            None => 1.0,
            Some(p) if p.is_finite() => p,
            Some(p) => {
                return Err(Error::invalid(
                    "parameters.length_penalty",
                    format!("must be a finite number; got {p}"),
                ));
            }
        };
        let num_beams = self.num_beams as usize;
        if num_beams <= 1 {
            // As transformers refuses num_return_sequences > 1 without sampling or beams (which
            // the model's defaults may still bring).
            if n > 1 && !sampling.do_sample && with_defaults {
                return Err(Error::invalid(
                    "parameters.n",
                    format!(
                        "{n} sequences by greedy decoding would all be the same; set do_sample \
                         to sample them, or num_beams to at least {n} for the best {n} beams"
                    ),
                ));
            }
            return Ok(None);
        }
        let beam = |field: &str, message: String| Err(Error::invalid(field, message));
        if num_beams > limits.max_sequences {
            return beam(
                "parameters.num_beams",
                format!("{num_beams} is over the limit of {}", limits.max_sequences),
            );
        }
        if n > num_beams {
            return beam(
                "parameters.n",
                format!("{n} sequences from {num_beams} beams: n is at most num_beams"),
            );
        }
        if sampling.do_sample {
            return beam(
                "parameters.do_sample",
                format!(
                    "beam search ({num_beams} beams) chooses the most likely tokens; leave do_sample false"
                ),
            );
        }
        let unsupported = [
            ("parameters.top_logprobs", self.top_logprobs != 0),
            ("parameters.stop", !self.stop.is_empty()),
            (
                "parameters.frequency_penalty",
                sampling.frequency_penalty != 0.0,
            ),
            (
                "parameters.presence_penalty",
                sampling.presence_penalty != 0.0,
            ),
        ];
        if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
            return beam(
                field,
                format!("is not available with beam search ({num_beams} beams); leave it unset"),
            );
        }
        Ok(Some(BeamConfig {
            num_beams,
            length_penalty,
            early_stopping,
            repetition_penalty: sampling.repetition_penalty,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(params: GenerateParams) -> String {
        match params.check(&GenerationConfig::default()) {
            Err(Error::InvalidArgument { field, message }) => format!("{field}: {message}"),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_greedy_with_the_default_length() {
        let checked = GenerateParams::default()
            .check(&GenerationConfig::default())
            .unwrap();
        assert!(!checked.sampling.do_sample);
        assert_eq!(
            checked.max_new_tokens,
            GenerationConfig::default().default_max_new_tokens
        );
        assert_eq!(checked.n, 1);
    }

    #[test]
    fn each_bad_value_names_its_field_limit_and_value() {
        let base = GenerateParams::default();
        let cases = [
            (
                GenerateParams {
                    max_new_tokens: Some(0),
                    ..base.clone()
                },
                "parameters.max_new_tokens: must be at least 1; got 0",
            ),
            (
                GenerateParams {
                    max_new_tokens: Some(100_000),
                    ..base.clone()
                },
                "100000 is over the server's limit of",
            ),
            (
                GenerateParams {
                    max_new_tokens: Some(5),
                    min_new_tokens: 6,
                    ..base.clone()
                },
                "parameters.min_new_tokens: 6 is more than max_new_tokens (5)",
            ),
            (
                GenerateParams {
                    do_sample: Some(true),
                    temperature: Some(0.0),
                    ..base.clone()
                },
                "parameters.temperature: must be > 0; got 0",
            ),
            (
                GenerateParams {
                    temperature: Some(-1.0),
                    ..base.clone()
                },
                "parameters.temperature: must be > 0; got -1",
            ),
            (
                GenerateParams {
                    n: 3,
                    ..base.clone()
                },
                "parameters.n: 3 sequences by greedy decoding would all be the same",
            ),
            (
                GenerateParams {
                    top_p: Some(1.5),
                    ..base.clone()
                },
                "parameters.top_p: must be in (0, 1]; got 1.5",
            ),
            (
                GenerateParams {
                    top_p: Some(0.0),
                    ..base.clone()
                },
                "parameters.top_p: must be in (0, 1]; got 0",
            ),
            (
                GenerateParams {
                    typical_p: Some(-1.0),
                    ..base.clone()
                },
                "parameters.typical_p",
            ),
            (
                GenerateParams {
                    repetition_penalty: Some(0.0),
                    ..base.clone()
                },
                "parameters.repetition_penalty: must be > 0; got 0",
            ),
            (
                GenerateParams {
                    frequency_penalty: 3.0,
                    ..base.clone()
                },
                "parameters.frequency_penalty: must be in [-2, 2]; got 3",
            ),
            (
                GenerateParams {
                    presence_penalty: -2.5,
                    ..base.clone()
                },
                "parameters.presence_penalty",
            ),
            (
                GenerateParams {
                    n: 1000,
                    ..base.clone()
                },
                "parameters.n: 1000 is over the limit",
            ),
            (
                GenerateParams {
                    top_logprobs: 1000,
                    ..base.clone()
                },
                "parameters.top_logprobs: 1000 is over the limit",
            ),
            (
                GenerateParams {
                    stop: vec!["a".into(); 100],
                    ..base.clone()
                },
                "parameters.stop: 100 stop sequences",
            ),
            (
                GenerateParams {
                    stop: vec![String::new()],
                    ..base.clone()
                },
                "parameters.stop[0]: is empty",
            ),
        ];
        for (params, expected) in cases {
            let error = error_of(params);
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }

    #[test]
    fn greedy_decoding_takes_a_temperature_of_0_and_sampling_takes_n() {
        let limits = GenerationConfig::default();
        let greedy = GenerateParams {
            temperature: Some(0.0),
            ..Default::default()
        };
        assert!(!greedy.check(&limits).unwrap().sampling.do_sample);
        let sampled = GenerateParams {
            do_sample: Some(true),
            n: 3,
            ..Default::default()
        };
        assert_eq!(sampled.check(&limits).unwrap().n, 3);
    }

    /// Before the model is chosen, whether a request samples or searches beams is not known:
    /// its defaults decide that, and a temperature of 0 overrides a default that samples.
    #[test]
    fn n_and_temperature_are_judged_with_the_models_defaults() {
        use crate::registry::settings::{Source, Sourced};
        fn model<T>(value: T) -> Option<Sourced<T>> {
            Some(Sourced {
                value,
                source: Source::Manifest,
            })
        }
        let limits = GenerationConfig::default();
        let checked = |params: &GenerateParams, defaults: &GenerationDefaults| {
            params.check_own(&limits)?;
            params
                .clone()
                .with_model_defaults(defaults, &limits)
                .check(&limits)
        };
        let sampling = GenerationDefaults {
            do_sample: model(true),
            ..Default::default()
        };
        let beams = GenerationDefaults {
            num_beams: model(4),
            ..Default::default()
        };
        let three = GenerateParams {
            n: 3,
            ..Default::default()
        };
        assert!(checked(&three, &sampling).unwrap().sampling.do_sample);
        assert_eq!(checked(&three, &beams).unwrap().beams.unwrap().num_beams, 4);
        let error = checked(&three, &GenerationDefaults::default()).unwrap_err();
        assert!(error.to_string().contains("parameters.n"), "{error}");
        let greedy = GenerateParams {
            temperature: Some(0.0),
            ..Default::default()
        };
        assert!(!checked(&greedy, &sampling).unwrap().sampling.do_sample);
    }

    #[test]
    fn a_models_beam_search_applies_where_the_request_allows_it() {
        use crate::registry::settings::{Source, Sourced};
        fn model<T>(value: T) -> Option<Sourced<T>> {
            Some(Sourced {
                value,
                source: Source::Manifest,
            })
        }
        let defaults = GenerationDefaults {
            num_beams: model(4),
            length_penalty: model(0.5),
            early_stopping: model(EarlyStopping::FirstBeams),
            ..Default::default()
        };
        let limits = GenerationConfig::default();
        let beams = |params: GenerateParams| {
            params
                .with_model_defaults(&defaults, &limits)
                .check(&limits)
                .unwrap()
                .beams
        };
        assert_eq!(
            beams(GenerateParams::default()),
            Some(BeamConfig {
                num_beams: 4,
                length_penalty: 0.5,
                early_stopping: EarlyStopping::FirstBeams,
                repetition_penalty: 1.0,
            })
        );
        // What beams cannot give keeps the request on one row, as it asked.
        for params in [
            GenerateParams {
                do_sample: Some(true),
                ..Default::default()
            },
            GenerateParams {
                top_logprobs: 2,
                ..Default::default()
            },
            GenerateParams {
                stop: vec!["\n".into()],
                ..Default::default()
            },
            GenerateParams {
                num_beams: 1,
                ..Default::default()
            },
        ] {
            assert_eq!(beams(params.clone()), None, "{params:?}");
        }
        // More sequences than the model's beams, without sampling: greedy copies, refused.
        let more = GenerateParams {
            n: 5,
            ..Default::default()
        };
        let error = more
            .with_model_defaults(&defaults, &limits)
            .check(&limits)
            .unwrap_err()
            .to_string();
        assert!(error.contains("num_beams to at least 5"), "{error}");
        // A repetition penalty the model sets by default applies to its beams, as in
        // transformers, and to beams the request asks for.
        let penalising = GenerationDefaults {
            repetition_penalty: model(1.2),
            ..defaults.clone()
        };
        let beams_of = |params: GenerateParams| {
            let checked = params
                .with_model_defaults(&penalising, &limits)
                .check(&limits);
            checked.unwrap().beams.unwrap()
        };
        let own = beams_of(GenerateParams::default());
        assert_eq!((own.num_beams, own.repetition_penalty), (4, 1.2));
        let asked = GenerateParams {
            num_beams: 2,
            ..Default::default()
        };
        let requested = beams_of(asked.clone());
        assert_eq!(
            (requested.num_beams, requested.repetition_penalty),
            (2, 1.2)
        );
        // So does sampling the model does by default (a chat model's generation_config.json).
        let sampling = GenerationDefaults {
            do_sample: model(true),
            temperature: model(0.7),
            ..Default::default()
        };
        let checked = asked
            .with_model_defaults(&sampling, &limits)
            .check(&limits)
            .unwrap();
        assert_eq!(checked.beams.map(|b| b.num_beams), Some(2));
        assert!(!checked.sampling.do_sample);
    }

    #[test]
    fn a_models_max_length_bounds_an_unset_length_before_tokenizing() {
        let limits = GenerationConfig::default();
        let asking = |min_new_tokens: u32| GenerateParams {
            min_new_tokens,
            ..GenerateParams::default()
        };
        // max_length counts at least one token before the new ones.
        let checked = asking(100).check_under_max_length(&limits, 101).unwrap();
        assert_eq!(checked.max_new_tokens, 100);
        assert!(checked.length_unset);
        let error = asking(101)
            .check_under_max_length(&limits, 101)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("101 is more than the 100 new tokens the model's max_length of 101"),
            "{error}"
        );
        // A length the request sets is its own.
        let set = GenerateParams {
            max_new_tokens: Some(5),
            ..asking(3)
        };
        assert_eq!(
            set.check_under_max_length(&limits, 101)
                .unwrap()
                .max_new_tokens,
            5
        );
    }

    #[test]
    fn min_new_tokens_is_held_to_the_length_a_models_default_gives() {
        use crate::registry::settings::{Source, Sourced};
        let limits = GenerationConfig::default();
        let long_default = GenerationDefaults {
            max_new_tokens: Some(Sourced {
                value: limits.default_max_new_tokens as u32 * 2,
                source: Source::Manifest,
            }),
            ..Default::default()
        };
        let params = GenerateParams {
            min_new_tokens: limits.default_max_new_tokens as u32 + 1,
            ..GenerateParams::default()
        };
        // Before a model is chosen the request may still get a longer default length.
        params.check_own(&limits).unwrap();
        let checked = params
            .clone()
            .with_model_defaults(&long_default, &limits)
            .check(&limits)
            .unwrap();
        assert_eq!(checked.min_new_tokens, limits.default_max_new_tokens + 1);
        // Without that default it is more than the length it gets.
        let error = params.check(&limits).unwrap_err().to_string();
        assert!(
            error.contains("more than the 64 new tokens the server's default length allows"),
            "{error}"
        );
    }
}
