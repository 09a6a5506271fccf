//! Property tests of what handles client data: request conversion and validation, the manifest
//! parser, the incremental detokenizer and stop-sequence matching. Whatever the input, no
//! panic, and the invariants hold. (proptest; 256 cases a property unless set lower.)

use lmserve::api::convert;
use lmserve::api::proto::{ClassifyRequest, EmbedRequest};
use lmserve::config::GenerationConfig;
use lmserve::error::Error;
use lmserve::registry::manifest::Manifest;
use lmserve::tasks::generate::params::GenerateParams;
use lmserve::tasks::generate::text::TextStream;
use proptest::prelude::*;
use tokenizers::Tokenizer;

fn tokenizer() -> Tokenizer {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/repository/tiny-gpt2/1/tokenizer.json"
    );
    Tokenizer::from_file(path).unwrap()
}

/// Streams `ids` through a TextStream; returns the shown text and the stop that ended it.
fn stream(tokenizer: &Tokenizer, ids: &[u32], stops: Vec<String>) -> (String, Option<String>) {
    let mut text = TextStream::new(&[], stops, false);
    let mut shown = String::new();
    for &id in ids {
        let delta = text.push(tokenizer, id);
        shown.push_str(&delta.text);
        if delta.stopped_by.is_some() {
            return (shown, delta.stopped_by);
        }
    }
    shown.push_str(&text.finish(tokenizer));
    (shown, None)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn streamed_text_is_the_whole_decode(text in "\\PC{0,60}") {
        let tokenizer = tokenizer();
        let ids = tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        let (shown, stopped) = stream(&tokenizer, &ids, Vec::new());
        prop_assert_eq!(stopped, None);
        prop_assert_eq!(&shown, &tokenizer.decode(&ids, false).unwrap());
        prop_assert_eq!(shown, text, "byte-level BPE round-trips any text");
    }

    #[test]
    fn a_stop_sequence_ends_the_text_before_it_and_is_never_shown(
        text in "[a-z .,\u{e9}\u{4e16}]{1,40}",
        start in 0usize..40,
        length in 1usize..6,
    ) {
        let tokenizer = tokenizer();
        let chars: Vec<char> = text.chars().collect();
        let start = start % chars.len();
        let stop: String = chars[start..(start + length).min(chars.len())].iter().collect();
        let ids = tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        let (shown, stopped) = stream(&tokenizer, &ids, vec![stop.clone()]);
        let at = text.find(&stop).expect("the stop is taken from the text");
        prop_assert_eq!(stopped, Some(stop.clone()));
        prop_assert_eq!(&shown, &text[..at]);
        prop_assert!(!shown.contains(&stop));
    }

    #[test]
    fn any_manifest_text_parses_or_fails_without_panicking(text in "\\PC{0,200}") {
        let _ = Manifest::parse(&text);
    }

    #[test]
    fn manifests_built_from_parts_parse_as_written(
        family in prop::sample::select(vec!["decoder", "rnn", "encoder", "bogus"]),
        tasks in prop::collection::vec(prop::sample::select(vec!["generate", "embed", "classify", "x"]), 0..3),
        max_length in prop::option::of(0usize..5000),
        temperature in prop::option::of(-1.0f32..3.0),
    ) {
        let mut text = format!("family = \"{family}\"\ntasks = {tasks:?}\n");
        if let Some(max_length) = max_length {
            text.push_str(&format!("max_length = {max_length}\n"));
        }
        if family == "rnn" {
            text.push_str("[state]\nhn = \"h0\"\n");
        }
        if let Some(temperature) = temperature {
            text.push_str(&format!("[generation]\ntemperature = {temperature:?}\n"));
        }
        match Manifest::parse(&text) {
            Ok(manifest) => {
                prop_assert_eq!(manifest.max_length, max_length);
                prop_assert!(!manifest.tasks.is_empty());
                prop_assert!(max_length != Some(0));
                prop_assert!(temperature.is_none_or(|t| t > 0.0));
            }
            Err(error) => {
                let reason = format!("{error:#}");
                prop_assert!(!reason.is_empty());
            }
        }
    }

    #[test]
    fn embed_and_classify_requests_convert_or_name_the_field(
        model in "\\PC{0,20}",
        pooling in any::<i32>(),
        truncate in any::<i32>(),
        scores in any::<i32>(),
        top_k in prop::option::of(any::<u32>()),
    ) {
        let embed = EmbedRequest { model: model.clone(), pooling, truncate, ..Default::default() };
        match convert::embed_params(embed) {
            Ok(params) => prop_assert_eq!(params.model, model.clone()),
            Err(Error::InvalidArgument { field, message }) => {
                prop_assert!(field == "pooling" || field == "truncate");
                prop_assert!(message.contains(&pooling.to_string()) || message.contains(&truncate.to_string()));
            }
            Err(other) => prop_assert!(false, "unexpected {:?}", other),
        }
        let classify = ClassifyRequest { model, scores, truncate, top_k, ..Default::default() };
        match convert::classify_params(classify) {
            Ok(params) => prop_assert_eq!(params.top_k, top_k),
            Err(Error::InvalidArgument { field, .. }) => prop_assert!(field == "scores" || field == "truncate"),
            Err(other) => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    #[test]
    fn generation_parameters_check_or_name_the_field(
        max_new_tokens in prop::option::of(any::<u32>()),
        min_new_tokens in any::<u32>(),
        temperature in prop::option::of(any::<f32>()),
        top_p in prop::option::of(any::<f32>()),
        typical_p in prop::option::of(any::<f32>()),
        repetition_penalty in prop::option::of(any::<f32>()),
        frequency_penalty in any::<f32>(),
        presence_penalty in any::<f32>(),
        n in any::<u32>(),
        top_logprobs in any::<u32>(),
        stop in prop::collection::vec("\\PC{0,300}", 0..10),
        stop_token_ids in prop::collection::vec(any::<u32>(), 0..10),
    ) {
        let params = GenerateParams {
            max_new_tokens, min_new_tokens, temperature, top_p, typical_p, repetition_penalty,
            frequency_penalty, presence_penalty, n, top_logprobs, stop, stop_token_ids,
            ..Default::default()
        };
        let limits = GenerationConfig::default();
        match params.check(&limits) {
            Ok(checked) => {
                prop_assert!(checked.max_new_tokens >= 1 && checked.max_new_tokens <= limits.max_new_tokens);
                prop_assert!(checked.min_new_tokens <= checked.max_new_tokens);
                prop_assert!(checked.sampling.temperature > 0.0 && checked.sampling.temperature.is_finite());
                prop_assert!(checked.n >= 1 && checked.n <= limits.max_sequences);
            }
            Err(Error::InvalidArgument { field, message }) => {
                prop_assert!(field.starts_with("parameters."), "field {}", field);
                prop_assert!(!message.is_empty());
            }
            Err(other) => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}
