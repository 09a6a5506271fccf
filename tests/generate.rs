//! Generation against the committed references: greedy decoding is token-identical for all
//! three families, alone and in a busy batch, and for a cache written in place in float32 and
//! float16; sampling, streaming, stops and cancellation.

mod common;

use std::time::Duration;

use common::{TestServer, reference};
use futures::StreamExt;
use futures::future::join_all;
use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::inference_client::InferenceClient;
use lmserve::api::proto::{
    FinishReason, GenerateRequest, GenerateResponse, GenerationParameters, TokenIds,
};
use tonic::Code;
use tonic::transport::Channel;

const GENERATORS: [&str; 4] = [
    "tiny-gpt2",
    "tiny-llama",
    "tiny-lstm",
    "tiny-transformer-lm",
];

fn request(model: &str, prompt: &str, parameters: GenerationParameters) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        prompt: Some(Prompt::Text(prompt.into())),
        parameters: Some(parameters),
        ..Default::default()
    }
}

fn greedy(max_new_tokens: u32) -> GenerationParameters {
    GenerationParameters {
        max_new_tokens: Some(max_new_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

/// A server with one `[generation]` setting changed, e.g. ("MAX_BATCH_SIZE", "2").
async fn server_with_generation(key: &str, value: &str) -> TestServer {
    TestServer::start_with(common::ServerOptions {
        env: vec![(format!("LMSERVE_GENERATION__{key}"), value.into())],
        ..Default::default()
    })
    .await
}

fn ids(response: &GenerateResponse, index: usize) -> Vec<u64> {
    response.sequences[index]
        .tokens
        .iter()
        .map(|t| t.id as u64)
        .collect()
}

fn expected_ids(value: &serde_json::Value) -> Vec<u64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn greedy_output_matches_the_reference_for_every_family() {
    let server = TestServer::start().await;
    let client = server.inference().await;
    for model in GENERATORS {
        greedy_as_reference(&client, model, &reference(model)).await;
    }
}

/// tiny-llama converted to the layout that writes its KV cache in place, in float32 and in
/// float16 (tests/fixtures/in_place.py), decodes tiny-llama's PyTorch greedy tokens.
#[tokio::test]
async fn caches_written_in_place_decode_as_the_pytorch_reference() {
    let server = TestServer::start_with(common::ServerOptions {
        repository: common::root().join("tests/fixtures/in-place"),
        ..Default::default()
    })
    .await;
    let client = server.inference().await;
    for model in ["tiny-llama-in-place", "tiny-llama-in-place-fp16"] {
        greedy_as_reference(&client, model, &reference("tiny-llama")).await;
    }
}

/// `model`'s greedy tokens against `reference`'s: each case alone with its first step's top
/// five, and the batch's prompts of different lengths sent at once.
async fn greedy_as_reference(
    client: &InferenceClient<Channel>,
    model: &str,
    reference: &serde_json::Value,
) {
    let generate = &reference["generate"];
    let steps = generate["max_new_tokens"].as_u64().unwrap() as u32;
    // One prompt at a time.
    for case in generate["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let response = client
            .clone()
            .generate(request(model, prompt, greedy(steps)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            ids(&response, 0),
            expected_ids(&case["greedy_ids"]),
            "{model} {prompt:?}"
        );
        assert_eq!(
            response.prompt_tokens as usize,
            case["prompt_ids"].as_array().unwrap().len()
        );
        assert_eq!(
            response.sequences[0].finish_reason,
            FinishReason::Length as i32
        );
        // The first step's top five, as logprobs of the same logits: same ids, same order.
        let top5: Vec<u64> = case["first_step_top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect();
        let params = GenerationParameters {
            top_logprobs: 5,
            ..greedy(1)
        };
        let first = client
            .clone()
            .generate(request(model, prompt, params))
            .await
            .unwrap()
            .into_inner();
        let got: Vec<u64> = first.sequences[0].tokens[0]
            .top_logprobs
            .iter()
            .map(|t| t.id as u64)
            .collect();
        assert_eq!(got, top5, "{model} {prompt:?} top-5");
    }
    // Prompts of different lengths sent at once.
    let batch = &generate["batch"];
    let prompts: Vec<&str> = batch["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let responses = join_all(prompts.iter().map(|prompt| {
        let mut client = client.clone();
        let request = request(model, prompt, greedy(steps));
        async move { client.generate(request).await.unwrap().into_inner() }
    }))
    .await;
    for (i, response) in responses.iter().enumerate() {
        assert_eq!(
            ids(response, 0),
            expected_ids(&batch["greedy_ids"][i]),
            "{model} batch prompt {i}"
        );
    }
}

/// A request decodes the same tokens alone and while other sequences join and leave the batch.
#[tokio::test]
async fn batching_never_changes_results() {
    let server = TestServer::start().await;
    let client = server.inference().await;
    for model in GENERATORS {
        let prompt = "What light through yonder window breaks";
        let alone = client
            .clone()
            .generate(request(model, prompt, greedy(40)))
            .await
            .unwrap()
            .into_inner();
        let mut busy = Vec::new();
        for i in 0..12 {
            let mut client = client.clone();
            let noise = request(
                model,
                &format!("{} my lord", "O ".repeat(i + 1)),
                greedy(5 + 7 * i as u32),
            );
            busy.push(tokio::spawn(async move {
                client.generate(noise).await.unwrap().into_inner()
            }));
        }
        let during = client
            .clone()
            .generate(request(model, prompt, greedy(40)))
            .await
            .unwrap()
            .into_inner();
        for task in busy {
            task.await.unwrap();
        }
        assert_eq!(
            ids(&during, 0),
            ids(&alone, 0),
            "{model}: batching changed the tokens"
        );
        assert_eq!(during.sequences[0].text, alone.sequences[0].text);
    }
}

/// A decoder with no cache and no inputs to mask padding, as a plain export of a causal LM can
/// be, runs rows of different lengths apart: left-padded into one run, a short row would read
/// its pad tokens as text. Each prompt decodes as the model's definition says (greedy tokens
/// computed with numpy from its weights, tests/fixtures/build.py), however the rows are batched.
#[tokio::test]
async fn a_decoder_that_cannot_mask_padding_runs_rows_of_different_lengths_apart() {
    let repository = tempfile::tempdir().unwrap();
    common::copy_dir(
        &common::fixtures().join("unmasked-decoder"),
        &repository.path().join("unmasked-decoder"),
    );
    let server = TestServer::start_with(common::ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let client = server.inference().await;
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join("tests/fixtures/reference.json")).unwrap(),
    )
    .unwrap();
    let cases = reference["unmasked_decoder"].as_array().unwrap();
    let calls = cases.iter().cycle().take(3 * cases.len()).map(|case| {
        let mut client = client.clone();
        let prompt: Vec<u32> = expected_ids(&case["prompt"])
            .into_iter()
            .map(|id| id as u32)
            .collect();
        let expected = expected_ids(&case["greedy"]);
        async move {
            let request = GenerateRequest {
                model: "unmasked-decoder".into(),
                prompt: Some(Prompt::TokenIds(TokenIds {
                    ids: prompt.clone(),
                })),
                parameters: Some(greedy(expected.len() as u32)),
                ..Default::default()
            };
            let response = client.generate(request).await.unwrap().into_inner();
            (prompt, ids(&response, 0), expected)
        }
    });
    for (prompt, got, expected) in join_all(calls).await {
        assert_eq!(got, expected, "prompt {prompt:?}");
    }
}

#[tokio::test]
async fn seeded_sampling_is_reproducible_and_n_sequences_differ() {
    let server = TestServer::start().await;
    let mut client = server.inference().await;
    let params = |seed: u64| GenerationParameters {
        max_new_tokens: Some(30),
        do_sample: Some(true),
        temperature: Some(1.2),
        top_k: Some(50),
        top_p: Some(0.95),
        seed: Some(seed),
        n: 3,
        ignore_eos: true,
        ..Default::default()
    };
    let a = client
        .generate(request("tiny-gpt2", "ROMEO.", params(7)))
        .await
        .unwrap()
        .into_inner();
    let b = client
        .generate(request("tiny-gpt2", "ROMEO.", params(7)))
        .await
        .unwrap()
        .into_inner();
    let c = client
        .generate(request("tiny-gpt2", "ROMEO.", params(8)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.sequences.len(), 3);
    for i in 0..3 {
        assert_eq!(ids(&a, i), ids(&b, i), "same seed, same sequence {i}");
    }
    assert_ne!(
        ids(&a, 0),
        ids(&a, 1),
        "sequences of one request are independent"
    );
    assert_ne!(ids(&a, 0), ids(&c, 0), "another seed, another sample");
    assert_eq!(a.generated_tokens, 90);
    // Sequence i of seed s is sequence 0 of seed s + i.
    let shifted = client
        .generate(request(
            "tiny-gpt2",
            "ROMEO.",
            GenerationParameters { n: 1, ..params(8) },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&shifted, 0), ids(&a, 1));
}

#[tokio::test]
async fn streamed_deltas_concatenate_to_the_unary_text() {
    let server = TestServer::start().await;
    let mut client = server.inference().await;
    for model in GENERATORS {
        for params in [
            greedy(48),
            GenerationParameters {
                do_sample: Some(true),
                seed: Some(3),
                temperature: Some(0.9),
                ..greedy(48)
            },
        ] {
            let unary = client
                .generate(request(model, "My lord,", params.clone()))
                .await
                .unwrap()
                .into_inner();
            let mut stream = client
                .generate_stream(request(model, "My lord,", params))
                .await
                .unwrap()
                .into_inner();
            let mut text = String::new();
            let mut tokens = Vec::new();
            let mut messages = Vec::new();
            while let Some(message) = stream.next().await {
                let message = message.unwrap();
                text.push_str(&message.text);
                if let Some(token) = &message.token {
                    tokens.push(token.id as u64);
                }
                messages.push(message);
            }
            assert_eq!(text, unary.sequences[0].text, "{model}");
            assert_eq!(tokens, ids(&unary, 0), "{model}");
            let first = &messages[0];
            assert_eq!(first.served_by.as_ref().unwrap().model, model);
            assert!(first.prompt_tokens > 0);
            let last = messages.last().unwrap();
            assert_eq!(last.finish_reason, FinishReason::Length as i32);
            assert_eq!(last.generated_tokens, 48);
            assert!(
                messages[1..].iter().all(|m| m.served_by.is_none()),
                "served_by is on the first message only, as the proto says"
            );
            assert!(last.timings.unwrap().total_seconds > 0.0);
        }
    }
}

#[tokio::test]
async fn stop_sequences_stop_ids_and_min_new_tokens() {
    let server = TestServer::start().await;
    let mut client = server.inference().await;
    let free = client
        .generate(request("tiny-gpt2", "To be, or not to be", greedy(40)))
        .await
        .unwrap()
        .into_inner();
    let full = free.sequences[0].text.clone();
    // Stop on a piece of text the model is known to produce; it must not appear in any output.
    let stop: String = full.trim_start().chars().skip(6).take(3).collect();
    assert_eq!(stop.chars().count(), 3, "{full:?}");
    let params = GenerationParameters {
        stop: vec![stop.clone()],
        ..greedy(40)
    };
    let unary = client
        .generate(request("tiny-gpt2", "To be, or not to be", params.clone()))
        .await
        .unwrap()
        .into_inner();
    let sequence = &unary.sequences[0];
    assert_eq!(sequence.finish_reason, FinishReason::StopSequence as i32);
    assert_eq!(sequence.stop_sequence, stop);
    assert_eq!(
        sequence.text,
        full[..full.find(&stop).unwrap()],
        "text ends right before the stop sequence"
    );
    let mut stream = client
        .generate_stream(request("tiny-gpt2", "To be, or not to be", params))
        .await
        .unwrap()
        .into_inner();
    let mut streamed = String::new();
    while let Some(message) = stream.next().await {
        streamed.push_str(&message.unwrap().text);
        assert!(!streamed.contains(&stop));
    }
    assert_eq!(streamed, sequence.text);

    // A stop token id: generation ends at its first occurrence, which is reported as EOS.
    let third = free.sequences[0].tokens[2].id;
    let params = GenerationParameters {
        stop_token_ids: vec![third],
        ..greedy(40)
    };
    let stopped = client
        .generate(request("tiny-gpt2", "To be, or not to be", params))
        .await
        .unwrap()
        .into_inner();
    let first_at = free.sequences[0]
        .tokens
        .iter()
        .position(|t| t.id == third)
        .unwrap();
    assert_eq!(stopped.sequences[0].tokens.len(), first_at + 1);
    assert_eq!(stopped.sequences[0].finish_reason, FinishReason::Eos as i32);

    // min_new_tokens: the stop id cannot end the sequence before it.
    let params = GenerationParameters {
        stop_token_ids: vec![third],
        min_new_tokens: 10,
        ..greedy(40)
    };
    let longer = client
        .generate(request("tiny-gpt2", "To be, or not to be", params))
        .await
        .unwrap()
        .into_inner();
    assert!(longer.sequences[0].tokens.len() > 10);
    assert!(
        longer.sequences[0].tokens[..10]
            .iter()
            .all(|t| t.id != third)
    );
}

#[tokio::test]
async fn prompts_as_token_ids_and_left_truncation() {
    let server = TestServer::start().await;
    let mut client = server.inference().await;
    let case = &reference("tiny-gpt2")["generate"]["cases"][0];
    let prompt_ids: Vec<u32> = case["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let by_ids = GenerateRequest {
        model: "tiny-gpt2".into(),
        prompt: Some(Prompt::TokenIds(lmserve::api::proto::TokenIds {
            ids: prompt_ids,
        })),
        parameters: Some(greedy(24)),
        ..Default::default()
    };
    let response = client.generate(by_ids).await.unwrap().into_inner();
    assert_eq!(ids(&response, 0), expected_ids(&case["greedy_ids"]));

    let long = "and so ".repeat(400);
    let error = client
        .generate(request("tiny-gpt2", &long, greedy(4)))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("prompt") && error.message().contains("truncate_prompt"),
        "{}",
        error.message()
    );
    let truncated = GenerateRequest {
        truncate_prompt: true,
        ..request("tiny-gpt2", &long, greedy(4))
    };
    let response = client.generate(truncated).await.unwrap().into_inner();
    assert_eq!(
        response.prompt_tokens, 255,
        "the context (256) minus room for one new token"
    );
    assert_eq!(
        response.sequences[0].tokens.len(),
        1,
        "max_new_tokens is lowered to what the context holds"
    );
}

#[tokio::test]
async fn invalid_parameters_are_rejected_with_their_field() {
    let server = TestServer::start().await;
    let mut client = server.inference().await;
    let cases: Vec<(GenerationParameters, &str)> = vec![
        (
            GenerationParameters {
                max_new_tokens: Some(0),
                ..Default::default()
            },
            "max_new_tokens",
        ),
        (
            GenerationParameters {
                max_new_tokens: Some(1_000_000),
                ..Default::default()
            },
            "max_new_tokens",
        ),
        (
            GenerationParameters {
                max_new_tokens: Some(4),
                min_new_tokens: 9,
                ..Default::default()
            },
            "min_new_tokens",
        ),
        (
            GenerationParameters {
                temperature: Some(0.0),
                do_sample: Some(true),
                ..Default::default()
            },
            "temperature",
        ),
        (
            GenerationParameters {
                temperature: Some(-1.0),
                ..Default::default()
            },
            "temperature",
        ),
        (
            GenerationParameters {
                top_p: Some(0.0),
                ..Default::default()
            },
            "top_p",
        ),
        (
            GenerationParameters {
                top_p: Some(1.01),
                ..Default::default()
            },
            "top_p",
        ),
        (
            GenerationParameters {
                typical_p: Some(2.0),
                ..Default::default()
            },
            "typical_p",
        ),
        (
            GenerationParameters {
                repetition_penalty: Some(0.0),
                ..Default::default()
            },
            "repetition_penalty",
        ),
        (
            GenerationParameters {
                frequency_penalty: 2.5,
                ..Default::default()
            },
            "frequency_penalty",
        ),
        (
            GenerationParameters {
                presence_penalty: -3.0,
                ..Default::default()
            },
            "presence_penalty",
        ),
        (
            GenerationParameters {
                stop: vec!["x".into(); 9],
                ..Default::default()
            },
            "stop",
        ),
        (
            GenerationParameters {
                stop: vec![String::new()],
                ..Default::default()
            },
            "stop[0]",
        ),
        (
            GenerationParameters {
                n: 100,
                ..Default::default()
            },
            "parameters.n",
        ),
        (
            GenerationParameters {
                top_logprobs: 100,
                ..Default::default()
            },
            "top_logprobs",
        ),
        (
            GenerationParameters {
                stop_token_ids: vec![0, 4_000_000],
                ..Default::default()
            },
            "stop_token_ids[1]: 4000000 is outside the vocabulary",
        ),
    ];
    for (parameters, field) in cases {
        let error = client
            .generate(request("tiny-gpt2", "Hello", parameters.clone()))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{parameters:?}");
        assert!(
            error.message().contains(field),
            "{field}: {}",
            error.message()
        );
    }
    let bad_id = GenerateRequest {
        model: "tiny-gpt2".into(),
        prompt: Some(Prompt::TokenIds(lmserve::api::proto::TokenIds {
            ids: vec![1, 4_000_000],
        })),
        ..Default::default()
    };
    let error = client.generate(bad_id).await.unwrap_err();
    assert!(
        error.message().contains("prompt.token_ids[1]") && error.message().contains("4000000"),
        "{}",
        error.message()
    );
    let no_prompt = GenerateRequest {
        model: "tiny-gpt2".into(),
        ..Default::default()
    };
    assert_eq!(
        client.generate(no_prompt).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let encoder = client
        .generate(request("tiny-encoder", "Hello", greedy(3)))
        .await
        .unwrap_err();
    assert_eq!(encoder.code(), Code::FailedPrecondition);
    // Still serving.
    client
        .generate(request("tiny-gpt2", "Hello", greedy(3)))
        .await
        .unwrap();
}

/// A cancelled stream frees its slot: with room for two sequences, two abandoned long streams
/// must not keep later requests waiting.
#[tokio::test]
async fn cancelling_a_stream_frees_its_slot() {
    let server = server_with_generation("MAX_BATCH_SIZE", "2").await;
    let client = server.inference().await;
    for _ in 0..2 {
        let mut client = client.clone();
        let long = request(
            "tiny-gpt2",
            "To be",
            GenerationParameters {
                max_new_tokens: Some(250),
                ignore_eos: true,
                ..Default::default()
            },
        );
        let mut stream = client.generate_stream(long).await.unwrap().into_inner();
        // Read the first token, then hang up.
        assert!(stream.next().await.unwrap().unwrap().token.is_some());
        drop(stream);
    }
    // Both slots must be free again within a few decode steps.
    let started = std::time::Instant::now();
    let short = |client: &mut lmserve::api::proto::inference_client::InferenceClient<
        tonic::transport::Channel,
    >| {
        let mut client = client.clone();
        async move {
            client
                .generate(request("tiny-gpt2", "Hello", greedy(3)))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let mut c = client.clone();
    let both = tokio::time::timeout(
        Duration::from_secs(20),
        join_all([short(&mut c), short(&mut c)]),
    )
    .await
    .expect("slots freed");
    assert!(both.iter().all(|r| r.sequences[0].tokens.len() == 3));
    // If the cancelled streams still held their slots, these would have waited for 250 tokens each.
    let ratio = started.elapsed().as_secs_f64();
    let long_alone = client
        .clone()
        .generate(request("tiny-gpt2", "To be", greedy(250)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        ratio < long_alone.timings.unwrap().total_seconds,
        "short requests ({ratio:.3}s) waited as long as a 250-token generation"
    );

    // A deadline that passes mid-generation also ends it.
    let mut deadline_request = tonic::Request::new(request("tiny-gpt2", "To be", greedy(250)));
    deadline_request.set_timeout(Duration::from_millis(30));
    let error = client.clone().generate(deadline_request).await.unwrap_err();
    assert!(
        matches!(error.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{error:?}"
    );
    let after = tokio::time::timeout(Duration::from_secs(20), short(&mut c))
        .await
        .expect("slot freed after a deadline");
    assert_eq!(after.sequences[0].tokens.len(), 3);
}

/// A stream whose deadline passes ends with DEADLINE_EXCEEDED and frees its slot even when the
/// client keeps reading instead of cancelling (tonic's client, for one, does not cancel).
#[tokio::test]
async fn a_stream_past_its_deadline_ends_and_frees_its_slot() {
    let server = server_with_generation("MAX_BATCH_SIZE", "1").await;
    let client = server.inference().await;
    let long = || request("tiny-gpt2", "To be", greedy(250));
    let alone = client.clone().generate(long()).await.unwrap().into_inner();
    let alone_seconds = alone.timings.unwrap().total_seconds;

    let mut timed = tonic::Request::new(long());
    timed.set_timeout(Duration::from_secs_f64(alone_seconds / 5.0));
    let mut stream = client
        .clone()
        .generate_stream(timed)
        .await
        .unwrap()
        .into_inner();
    let mut tokens = 0;
    let error = loop {
        match stream.next().await {
            Some(Ok(message)) => tokens += usize::from(message.token.is_some()),
            Some(Err(error)) => break error,
            None => panic!("the stream ended without an error after {tokens} tokens"),
        }
    };
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error:?}");
    assert!(
        error.message().contains("grpc-timeout"),
        "{}",
        error.message()
    );
    assert!(tokens < 250, "{tokens} tokens streamed past the deadline");

    // With one slot, a request sent now waits for whatever still holds it.
    let short = client
        .clone()
        .generate(request("tiny-gpt2", "Hello", greedy(3)))
        .await
        .unwrap()
        .into_inner();
    let waited = short.timings.unwrap().queue_seconds;
    assert!(
        waited < alone_seconds / 2.0,
        "waited {waited:.3}s for the slot; a whole generation takes {alone_seconds:.3}s"
    );
}

/// A short request admitted while a long generation runs finishes first: it joins the batch
/// between steps instead of waiting for the long one to end.
#[tokio::test]
async fn a_long_generation_never_blocks_a_short_one() {
    let server = TestServer::start().await;
    let mut client = server.inference().await;
    let long = request("tiny-gpt2", "To be", greedy(250));
    let mut stream = client.generate_stream(long).await.unwrap().into_inner();
    assert!(stream.next().await.unwrap().unwrap().token.is_some());
    let short = client
        .generate(request("tiny-lstm", "Hello", greedy(3)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(short.sequences[0].tokens.len(), 3);
    let short_same_model = client
        .generate(request("tiny-gpt2", "Hello", greedy(3)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(short_same_model.sequences[0].tokens.len(), 3);
    // The long generation is still going.
    let mut remaining = 0;
    while let Some(message) = stream.next().await {
        if message.unwrap().token.is_some() {
            remaining += 1;
        }
    }
    assert!(
        remaining > 100,
        "the long stream had only {remaining} tokens left; the short one waited for it"
    );
}

#[tokio::test]
async fn a_full_generation_queue_is_resource_exhausted() {
    let server = server_with_generation("QUEUE_CAPACITY", "2").await;
    let mut client = server.inference().await;
    let error = client
        .generate(request(
            "tiny-gpt2",
            "Hello",
            GenerationParameters {
                n: 3,
                do_sample: Some(true),
                ..greedy(3)
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(
        error.message().contains("tiny-gpt2") && error.message().contains('2'),
        "{}",
        error.message()
    );
    let fine = client
        .generate(request(
            "tiny-gpt2",
            "Hello",
            GenerationParameters {
                n: 2,
                do_sample: Some(true),
                ..greedy(3)
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fine.sequences.len(), 2);
}

/// With `runtime.decode_cpus`, each model's decode thread runs on those CPUs and every other
/// thread of the server on the rest, and greedy decoding gives the reference tokens.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn decode_threads_run_on_their_reserved_cpus() {
    use lmserve::config::CpuList;
    use lmserve::runtime::placement::allowed_cpus;

    let allowed = allowed_cpus().unwrap();
    if allowed.ids().len() < 2 {
        eprintln!("skipped: this process may use one CPU only, so none is left to reserve");
        return;
    }
    let decode_cpu = allowed.ids()[0];
    // Two intra-op threads, so that ONNX Runtime's helper threads exist and are checked too.
    let server = TestServer::start_with(common::ServerOptions {
        env: vec![
            (
                "LMSERVE_RUNTIME__DECODE_CPUS".into(),
                decode_cpu.to_string(),
            ),
            ("LMSERVE_RUNTIME__INTRA_THREADS".into(), "2".into()),
        ],
        ..Default::default()
    })
    .await;

    let mut decode_threads = 0;
    for task in std::fs::read_dir(format!("/proc/{}/task", server.pid())).unwrap() {
        let path = task.unwrap().path();
        // An idle blocking-pool thread may exit between the listing and the read.
        let (Ok(name), Ok(status)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("status")),
        ) else {
            continue;
        };
        let cpus: CpuList = status
            .lines()
            .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        if name.starts_with("decode-") {
            decode_threads += 1;
            assert_eq!(cpus.ids(), [decode_cpu], "{}", name.trim());
        } else {
            assert!(
                !cpus.ids().contains(&decode_cpu),
                "{} on {cpus}",
                name.trim()
            );
        }
    }
    // And tiny-translator's, whose tests are in tests/seq2seq.rs.
    assert_eq!(
        decode_threads,
        GENERATORS.len() + 1,
        "one decode thread per generating model"
    );

    let reference = reference("tiny-gpt2");
    let case = &reference["generate"]["cases"][0];
    let steps = reference["generate"]["max_new_tokens"].as_u64().unwrap() as u32;
    let response = server
        .inference()
        .await
        .generate(request(
            "tiny-gpt2",
            case["prompt"].as_str().unwrap(),
            greedy(steps),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&response, 0), expected_ids(&case["greedy_ids"]));
}
