//! A request's `parameters` map read into lmserve's settings: each key taken once with its
//! type checked; whatever no task reads is refused, so a misspelt `temprature` is an error
//! rather than silently the default. Names follow Triton's vLLM backend where lmserve has
//! the setting (`max_tokens`, `temperature`, `top_k`, `top_p`, `seed`, `stop`, ...).

use std::collections::HashMap;

use super::proto::InferParameter;
use super::proto::infer_parameter::ParameterChoice;
use crate::error::{Error, Result, bounded};
use crate::runtime::encoder::Pooling;
use crate::tasks::generate::params::GenerateParams;
use crate::tasks::text::Truncate;

/// Longest parameter name an error message repeats.
const MAX_KEY_BYTES: usize = 100;

pub struct Parameters {
    values: HashMap<String, InferParameter>,
    /// The keys read so far, in order: what a refusal of an unknown key lists.
    known: Vec<&'static str>,
    /// lmserve's name of a setting and the name the client sent it under, where they differ.
    renamed: Vec<(&'static str, &'static str)>,
}

fn field(key: &str) -> String {
    format!("parameters.{}", bounded(key, MAX_KEY_BYTES))
}

fn kind(choice: &ParameterChoice) -> &'static str {
    match choice {
        ParameterChoice::BoolParam(_) => "a bool_param",
        ParameterChoice::Int64Param(_) => "an int64_param",
        ParameterChoice::StringParam(_) => "a string_param",
        ParameterChoice::DoubleParam(_) => "a double_param",
        ParameterChoice::Uint64Param(_) => "a uint64_param",
    }
}

fn wrong_type(key: &str, wanted: &str, got: &ParameterChoice) -> Error {
    Error::invalid(field(key), format!("must be {wanted}; got {}", kind(got)))
}

impl Parameters {
    pub fn new(values: HashMap<String, InferParameter>) -> Self {
        Self {
            values,
            known: Vec::new(),
            renamed: Vec::new(),
        }
    }

    fn take(&mut self, key: &'static str) -> Result<Option<ParameterChoice>> {
        self.known.push(key);
        match self.values.remove(key) {
            None => Ok(None),
            Some(InferParameter {
                parameter_choice: None,
            }) => Err(Error::invalid(field(key), "is set but holds no value")),
            Some(InferParameter {
                parameter_choice: Some(choice),
            }) => Ok(Some(choice)),
        }
    }

    pub fn bool(&mut self, key: &'static str) -> Result<Option<bool>> {
        match self.take(key)? {
            None => Ok(None),
            Some(ParameterChoice::BoolParam(value)) => Ok(Some(value)),
            Some(other) => Err(wrong_type(key, "a bool_param", &other)),
        }
    }

    pub fn string(&mut self, key: &'static str) -> Result<Option<String>> {
        match self.take(key)? {
            None => Ok(None),
            Some(ParameterChoice::StringParam(value)) => Ok(Some(value)),
            Some(other) => Err(wrong_type(key, "a string_param", &other)),
        }
    }

    /// A whole number from 0 to `max`, sent as int64 or uint64.
    pub fn unsigned(&mut self, key: &'static str, max: u64) -> Result<Option<u64>> {
        let value = match self.take(key)? {
            None => return Ok(None),
            Some(ParameterChoice::Uint64Param(value)) => i128::from(value),
            Some(ParameterChoice::Int64Param(value)) => i128::from(value),
            Some(other) => return Err(wrong_type(key, "an int64_param or uint64_param", &other)),
        };
        u64::try_from(value)
            .ok()
            .filter(|value| *value <= max)
            .map(Some)
            .ok_or_else(|| {
                Error::invalid(field(key), format!("must be in [0, {max}]; got {value}"))
            })
    }

    /// A number, sent as double, int64 or uint64; the task checks its range.
    pub fn number(&mut self, key: &'static str) -> Result<Option<f32>> {
        match self.take(key)? {
            None => Ok(None),
            Some(ParameterChoice::DoubleParam(value)) => Ok(Some(value as f32)),
            Some(ParameterChoice::Int64Param(value)) => Ok(Some(value as f32)),
            Some(ParameterChoice::Uint64Param(value)) => Ok(Some(value as f32)),
            Some(other) => Err(wrong_type(
                key,
                "a double_param (or int64_param, uint64_param)",
                &other,
            )),
        }
    }

    /// One of two names for the same setting (`max_tokens`, `max_new_tokens`); sending both is
    /// refused. lmserve's own name is `ours`.
    fn either<T>(
        &mut self,
        ours: &'static str,
        alias: &'static str,
        read: impl Fn(&mut Self, &'static str) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        match (read(self, ours)?, read(self, alias)?) {
            (Some(_), Some(_)) => Err(Error::invalid(
                field(alias),
                format!("names the same setting as {ours}; send one of them"),
            )),
            (Some(value), None) => Ok(Some(value)),
            (None, Some(value)) => {
                self.renamed.push((ours, alias));
                Ok(Some(value))
            }
            (None, None) => Ok(None),
        }
    }

    /// Pairs of lmserve's setting name and the name the client used for it.
    pub fn renamed(&self) -> &[(&'static str, &'static str)] {
        &self.renamed
    }

    /// Refuses the first key (in sorted order) that nothing read.
    pub fn finish(&self, task: &str) -> Result<()> {
        let mut unknown: Vec<&String> = self.values.keys().collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(key) => Err(Error::invalid(
                field(key),
                format!(
                    "is not a parameter of {task} requests; known: {}",
                    self.known.join(", ")
                ),
            )),
        }
    }
}

/// Truncation of a text input: `none` (refuse what is too long), `right` or `left`.
pub fn truncate(parameters: &mut Parameters) -> Result<Truncate> {
    match parameters.string("truncate")?.as_deref() {
        None | Some("none") => Ok(Truncate::None),
        Some("right") => Ok(Truncate::Right),
        Some("left") => Ok(Truncate::Left),
        Some(other) => Err(Error::invalid(
            field("truncate"),
            format!(
                "must be none, right or left; got {}",
                crate::error::echo(other)
            ),
        )),
    }
}

pub fn pooling(parameters: &mut Parameters) -> Result<Option<Pooling>> {
    match parameters.string("pooling")?.as_deref() {
        None => Ok(None),
        Some("mean") => Ok(Some(Pooling::Mean)),
        Some("cls") => Ok(Some(Pooling::Cls)),
        Some("last_token") => Ok(Some(Pooling::Last)),
        Some("max") => Ok(Some(Pooling::Max)),
        Some(other) => Err(Error::invalid(
            field("pooling"),
            format!(
                "must be mean, cls, last_token or max; got {}",
                crate::error::echo(other)
            ),
        )),
    }
}

/// Most stop sequences a `stop` array is read to: far past `generation.max_stop_sequences`,
/// which refuses the request later, naming its own limit. Reading stops here, so that an array
/// of millions of empty strings in one parameter costs no memory beyond this many.
const MOST_LISTED_STOP_SEQUENCES: usize = 1024;

/// `stop` as one stop sequence, or as a JSON array of them (`["\n\n", "END"]`).
fn stop_sequences(value: String) -> Result<Vec<String>> {
    if !value.starts_with('[') {
        return Ok(vec![value]);
    }
    match serde_json::from_str::<Listed>(&value) {
        Ok(Listed(Some(list))) => Ok(list),
        Ok(Listed(None)) => Err(Error::invalid(
            field("stop"),
            format!(
                "lists more than {MOST_LISTED_STOP_SEQUENCES} stop sequences ({} bytes)",
                value.len()
            ),
        )),
        // Not a JSON array of strings: one stop sequence that starts with `[`.
        Err(_) => Ok(vec![value]),
    }
}

/// A JSON array of strings, or `None` where it holds more than `MOST_LISTED_STOP_SEQUENCES`
/// (the rest is skipped over, not kept).
struct Listed(Option<Vec<String>>);

impl<'de> serde::Deserialize<'de> for Listed {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Strings;
        impl<'de> serde::de::Visitor<'de> for Strings {
            type Value = Listed;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of strings")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Listed, A::Error> {
                let mut list = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    if list.len() == MOST_LISTED_STOP_SEQUENCES {
                        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                        return Ok(Listed(None));
                    }
                    list.push(item);
                }
                Ok(Listed(Some(list)))
            }
        }
        deserializer.deserialize_seq(Strings)
    }
}

/// The generation settings among `parameters`, into `params`. Triton's convention that a
/// temperature of 0 means greedy decoding and a positive one means sampling is kept, where
/// lmserve.v1 asks for `do_sample` instead.
pub fn generation(parameters: &mut Parameters, params: &mut GenerateParams) -> Result<()> {
    let count = u64::from(u32::MAX);
    let narrow = |value: Option<u64>| value.map(|v| v as u32);
    params.max_new_tokens =
        narrow(parameters.either("max_new_tokens", "max_tokens", |p, key| {
            p.unsigned(key, count)
        })?);
    params.min_new_tokens =
        narrow(parameters.either("min_new_tokens", "min_tokens", |p, key| {
            p.unsigned(key, count)
        })?)
        .unwrap_or(0);
    params.do_sample = parameters.bool("do_sample")?;
    params.temperature = match parameters.number("temperature")? {
        Some(0.0) if params.do_sample == Some(true) => {
            return Err(Error::invalid(
                field("temperature"),
                "0 asks for greedy decoding, which do_sample true contradicts",
            ));
        }
        Some(0.0) => {
            params.do_sample = Some(false);
            None
        }
        Some(temperature) => {
            params.do_sample = params.do_sample.or(Some(true));
            Some(temperature)
        }
        None => None,
    };
    params.top_k = narrow(parameters.unsigned("top_k", count)?);
    params.top_p = parameters.number("top_p")?;
    params.typical_p = parameters.number("typical_p")?;
    // A filter that narrows sampling asks for sampling, as Triton's TensorRT-LLM backend reads
    // top_k above 1 or top_p below 1: with neither do_sample nor a temperature it would
    // otherwise be ignored on a model that decodes greedily. A temperature of 0 stays greedy.
    let narrows = params.top_k.is_some_and(|k| k > 1)
        || params.top_p.is_some_and(|p| p < 1.0)
        || params.typical_p.is_some_and(|p| p < 1.0);
    if narrows && params.do_sample.is_none() {
        params.do_sample = Some(true);
    }
    params.repetition_penalty = parameters.number("repetition_penalty")?;
    params.frequency_penalty = parameters.number("frequency_penalty")?.unwrap_or(0.0);
    params.presence_penalty = parameters.number("presence_penalty")?.unwrap_or(0.0);
    params.stop = match parameters.string("stop")? {
        Some(value) => stop_sequences(value)?,
        None => Vec::new(),
    };
    params.ignore_eos = parameters.bool("ignore_eos")?.unwrap_or(false);
    // vLLM's sampling parameter, and its default.
    params.keep_special_tokens = !parameters.bool("skip_special_tokens")?.unwrap_or(true);
    params.seed = parameters.unsigned("seed", u64::MAX)?;
    params.truncate_prompt = parameters.bool("truncate_prompt")?.unwrap_or(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, ParameterChoice)]) -> Parameters {
        Parameters::new(
            pairs
                .iter()
                .map(|(key, choice)| {
                    (
                        key.to_string(),
                        InferParameter {
                            parameter_choice: Some(choice.clone()),
                        },
                    )
                })
                .collect(),
        )
    }

    fn message(result: Result<impl std::fmt::Debug>) -> String {
        match result {
            Err(Error::InvalidArgument { field, message }) => format!("{field}: {message}"),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn maps_triton_names_to_generation_settings() {
        let mut parameters = values(&[
            ("max_tokens", ParameterChoice::Int64Param(12)),
            ("temperature", ParameterChoice::DoubleParam(0.5)),
            ("top_k", ParameterChoice::Uint64Param(5)),
            ("seed", ParameterChoice::Int64Param(7)),
            ("stop", ParameterChoice::StringParam(r#"["a", "b"]"#.into())),
        ]);
        let mut params = GenerateParams::default();
        generation(&mut parameters, &mut params).unwrap();
        parameters.finish("generate").unwrap();
        assert_eq!(params.max_new_tokens, Some(12));
        assert_eq!(
            (params.do_sample, params.temperature),
            (Some(true), Some(0.5))
        );
        assert_eq!((params.top_k, params.seed), (Some(5), Some(7)));
        assert_eq!(params.stop, ["a", "b"]);
        assert_eq!(parameters.renamed(), [("max_new_tokens", "max_tokens")]);
    }

    #[test]
    fn a_narrowing_filter_asks_for_sampling_unless_greedy_is_asked_for() {
        let sampled = |pairs: &[(&str, ParameterChoice)]| {
            let mut params = GenerateParams::default();
            generation(&mut values(pairs), &mut params).unwrap();
            params.do_sample
        };
        assert_eq!(
            sampled(&[("top_k", ParameterChoice::Int64Param(40))]),
            Some(true)
        );
        assert_eq!(
            sampled(&[("top_p", ParameterChoice::DoubleParam(0.9))]),
            Some(true)
        );
        // No narrowing: the model's default decides.
        assert_eq!(sampled(&[("top_k", ParameterChoice::Int64Param(1))]), None);
        assert_eq!(
            sampled(&[("top_p", ParameterChoice::DoubleParam(1.0))]),
            None
        );
        let greedy = [
            ("top_k", ParameterChoice::Int64Param(40)),
            ("temperature", ParameterChoice::DoubleParam(0.0)),
        ];
        assert_eq!(sampled(&greedy), Some(false));
        let told = [
            ("top_p", ParameterChoice::DoubleParam(0.9)),
            ("do_sample", ParameterChoice::BoolParam(false)),
        ];
        assert_eq!(sampled(&told), Some(false));
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let mut parameters = values(&[("temperature", ParameterChoice::Int64Param(0))]);
        let mut params = GenerateParams::default();
        generation(&mut parameters, &mut params).unwrap();
        assert_eq!((params.do_sample, params.temperature), (Some(false), None));
        let mut contradicting = values(&[
            ("temperature", ParameterChoice::DoubleParam(0.0)),
            ("do_sample", ParameterChoice::BoolParam(true)),
        ]);
        assert!(
            message(generation(&mut contradicting, &mut params))
                .starts_with("parameters.temperature: 0 asks for greedy")
        );
    }

    #[test]
    fn wrong_types_unknown_keys_and_ranges_are_named() {
        let mut parameters = values(&[("temperature", ParameterChoice::StringParam("hot".into()))]);
        assert_eq!(
            message(generation(&mut parameters, &mut GenerateParams::default())),
            "parameters.temperature: must be a double_param (or int64_param, uint64_param); got a string_param"
        );
        let mut parameters = values(&[("max_tokens", ParameterChoice::Int64Param(-1))]);
        assert!(
            message(generation(&mut parameters, &mut GenerateParams::default()))
                .starts_with("parameters.max_tokens: must be in [0, 4294967295]; got -1")
        );
        let mut parameters = values(&[
            ("max_tokens", ParameterChoice::Int64Param(1)),
            ("max_new_tokens", ParameterChoice::Int64Param(1)),
        ]);
        assert!(
            message(generation(&mut parameters, &mut GenerateParams::default()))
                .contains("send one of them")
        );
        let mut parameters = values(&[("temprature", ParameterChoice::DoubleParam(1.0))]);
        generation(&mut parameters, &mut GenerateParams::default()).unwrap();
        let refused = message(parameters.finish("generate"));
        assert!(
            refused.starts_with("parameters.temprature: is not a parameter of generate requests; known: max_new_tokens, max_tokens"),
            "{refused}"
        );
        let mut parameters = Parameters::new(
            [("seed".to_string(), InferParameter::default())]
                .into_iter()
                .collect(),
        );
        assert!(message(parameters.unsigned("seed", 9)).contains("holds no value"));
    }

    #[test]
    fn a_plain_stop_string_is_one_sequence() {
        assert_eq!(stop_sequences("\n".into()).unwrap(), ["\n"]);
        assert_eq!(stop_sequences("[not json".into()).unwrap(), ["[not json"]);
        assert_eq!(stop_sequences(r#"["a", "b"]"#.into()).unwrap(), ["a", "b"]);
    }

    #[test]
    fn a_stop_array_is_read_no_further_than_its_limit() {
        let listed = |n: usize| format!("[{}]", vec![r#""""#; n].join(","));
        let most = MOST_LISTED_STOP_SEQUENCES;
        assert_eq!(stop_sequences(listed(most)).unwrap().len(), most);
        let long = listed(2_000_000);
        let error = stop_sequences(long.clone()).unwrap_err().to_string();
        let expected = format!(
            "parameters.stop: lists more than {most} stop sequences ({} bytes)",
            long.len()
        );
        assert_eq!(error, expected);
    }

    #[test]
    fn truncate_and_pooling_take_their_names() {
        let mut parameters = values(&[
            ("truncate", ParameterChoice::StringParam("left".into())),
            ("pooling", ParameterChoice::StringParam("cls".into())),
        ]);
        assert_eq!(truncate(&mut parameters).unwrap(), Truncate::Left);
        assert_eq!(pooling(&mut parameters).unwrap(), Some(Pooling::Cls));
        let mut parameters = values(&[("truncate", ParameterChoice::StringParam("up".into()))]);
        assert!(message(truncate(&mut parameters)).contains("got `up`"));
    }
}
