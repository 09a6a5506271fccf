//! Generate and GenerateStream for the Inference service: proto to parameters, and the
//! generation events to responses (collected, or one message per token).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::Status;

use std::collections::BTreeSet;

use super::closing::{self, Closing};
use super::convert::served_by;
use super::proto;
use crate::error::Error;
use crate::registry::chat::ChatMessage;
use crate::tasks::generate::driver::{Event, FinishReason, GeneratedToken, TokenChoice};
use crate::tasks::generate::params::{GenerateParams, Prompt};
use crate::tasks::generate::{GenerateOutput, GenerationStream, Timings};

pub type GenerateEventStream =
    Pin<Box<dyn Stream<Item = Result<proto::GenerateStreamResponse, Status>> + Send>>;

pub fn params(request: proto::GenerateRequest) -> GenerateParams {
    let p = request.parameters.unwrap_or_default();
    GenerateParams {
        model: request.model,
        prompt: request.prompt.map(|prompt| match prompt {
            proto::generate_request::Prompt::Text(text) => Prompt::Text(text),
            proto::generate_request::Prompt::TokenIds(ids) => Prompt::Ids(ids.ids),
            proto::generate_request::Prompt::Messages(chat) => Prompt::Messages(messages(chat)),
        }),
        truncate_prompt: request.truncate_prompt,
        max_new_tokens: p.max_new_tokens,
        min_new_tokens: p.min_new_tokens,
        do_sample: p.do_sample,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        typical_p: p.typical_p,
        repetition_penalty: p.repetition_penalty,
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        stop: p.stop,
        stop_token_ids: p.stop_token_ids,
        ignore_eos: p.ignore_eos,
        keep_special_tokens: p.keep_special_tokens,
        seed: p.seed,
        n: p.n,
        top_logprobs: p.top_logprobs,
        num_beams: p.num_beams,
        length_penalty: p.length_penalty,
        early_stopping: p.early_stopping,
    }
}

/// A conversation from the wire.
pub fn messages(chat: proto::ChatMessages) -> Vec<ChatMessage> {
    chat.messages
        .into_iter()
        .map(|message| ChatMessage {
            role: message.role,
            content: message.content,
        })
        .collect()
}

fn finish_reason(reason: Option<FinishReason>) -> i32 {
    (match reason {
        None => proto::FinishReason::Unspecified,
        Some(FinishReason::Length) => proto::FinishReason::Length,
        Some(FinishReason::Eos) => proto::FinishReason::Eos,
        Some(FinishReason::StopSequence) => proto::FinishReason::StopSequence,
        Some(FinishReason::Cancelled) => proto::FinishReason::Cancelled,
    }) as i32
}

fn choice(choice: TokenChoice) -> proto::TokenLogprob {
    proto::TokenLogprob {
        id: choice.id,
        text: choice.text,
        logprob: choice.logprob,
    }
}

fn token(token: GeneratedToken) -> proto::GeneratedToken {
    proto::GeneratedToken {
        id: token.choice.id,
        text: token.choice.text,
        logprob: token.choice.logprob,
        top_logprobs: token.top.into_iter().map(choice).collect(),
    }
}

fn timings(timings: Timings) -> Option<proto::Timings> {
    Some(proto::Timings {
        queue_seconds: timings.queue.as_secs_f64(),
        time_to_first_token_seconds: timings.time_to_first_token.as_secs_f64(),
        total_seconds: timings.total.as_secs_f64(),
    })
}

pub fn response(output: GenerateOutput) -> proto::GenerateResponse {
    proto::GenerateResponse {
        sequences: output
            .sequences
            .into_iter()
            .map(|s| proto::GeneratedSequence {
                index: s.index as u32,
                text: s.text,
                tokens: s.tokens.into_iter().map(token).collect(),
                finish_reason: finish_reason(s.finish_reason),
                stop_sequence: s.stop_sequence.unwrap_or_default(),
            })
            .collect(),
        prompt_tokens: output.prompt_tokens as u32,
        generated_tokens: output.generated_tokens as u32,
        timings: timings(output.timings),
        served_by: served_by(output.served_by),
    }
}

/// One message per token as it is produced; each sequence's last message carries its finish
/// reason. Dropping the returned stream (the client went away) cancels the generation. When the
/// server closes streams at the end of a shutdown, each unfinished sequence gets a closing
/// message (finish reason CANCELLED) and the stream ends UNAVAILABLE.
pub fn stream(generation: GenerationStream, closing: Closing) -> GenerateEventStream {
    let open: BTreeSet<usize> = (0..generation.sequences).collect();
    Box::pin(
        futures::stream::unfold(
            Some(Following {
                generation,
                first: true,
                open,
                closing,
            }),
            |following| async move {
                let Following {
                    mut generation,
                    mut first,
                    mut open,
                    mut closing,
                } = following?;
                loop {
                    let event = tokio::select! {
                        event = generation.next() => event?,
                        () = closing.fired() => {
                            let messages = closing_messages(&generation, &open);
                            generation.forget_shadow();
                            drop(generation);
                            let ends = messages.into_iter().map(Ok).chain([Err(closing::status())]);
                            return Some((Box::new(ends) as Pending, None));
                        }
                    };
                    let mut message = match event {
                        Event::Started { .. } => continue,
                        Event::Token {
                            index,
                            token: generated,
                            text,
                        } => proto::GenerateStreamResponse {
                            index: index as u32,
                            text,
                            token: Some(token(generated)),
                            ..Default::default()
                        },
                        Event::Finished {
                            index,
                            reason,
                            text,
                            stop_sequence,
                        } => {
                            open.remove(&index);
                            proto::GenerateStreamResponse {
                                index: index as u32,
                                text,
                                finish_reason: finish_reason(Some(reason)),
                                stop_sequence: stop_sequence.unwrap_or_default(),
                                ..Default::default()
                            }
                        }
                        Event::Failed { error, .. } => {
                            let failed = Err(Status::from(Error::Run(error)));
                            return Some((Box::new(std::iter::once(failed)) as Pending, None));
                        }
                    };
                    if first {
                        message.served_by = served_by(generation.served_by.clone());
                        message.prompt_tokens = generation.prompt_tokens as u32;
                        first = false;
                    }
                    if generation.is_done() {
                        message.generated_tokens = generation.generated_tokens() as u32;
                        message.timings = timings(generation.timings());
                    }
                    let next = Following {
                        generation,
                        first,
                        open,
                        closing,
                    };
                    return Some((
                        Box::new(std::iter::once(Ok(message))) as Pending,
                        Some(next),
                    ));
                }
            },
        )
        .flat_map(futures::stream::iter),
    )
}

/// What `stream` carries from one message to the next.
struct Following {
    generation: GenerationStream,
    first: bool,
    /// Sequences that have not finished.
    open: BTreeSet<usize>,
    closing: Closing,
}

/// Messages produced at one step: usually one, several when the server closes the stream.
type Pending = Box<dyn Iterator<Item = Result<proto::GenerateStreamResponse, Status>> + Send>;

/// One CANCELLED message per unfinished sequence; the last carries the totals.
fn closing_messages(
    generation: &GenerationStream,
    open: &BTreeSet<usize>,
) -> Vec<proto::GenerateStreamResponse> {
    let mut messages: Vec<_> = open
        .iter()
        .map(|&index| proto::GenerateStreamResponse {
            index: index as u32,
            finish_reason: finish_reason(Some(FinishReason::Cancelled)),
            ..Default::default()
        })
        .collect();
    if let Some(last) = messages.last_mut() {
        last.generated_tokens = generation.generated_tokens() as u32;
        last.timings = timings(generation.timings());
    }
    messages
}
