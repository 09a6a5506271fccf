//! Generate: validate, tokenize the prompt, hand one driver per sequence to the model's
//! continuous scheduler, and follow the events it sends back — as a stream, or collected.

pub mod beam;
pub mod constraints;
pub mod driver;
pub mod events;
pub mod forced;
pub mod params;
pub mod sampling;
mod spans;
pub mod text;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use self::beam::{BeamDriver, BeamSearch};
use self::constraints::Constraints;
use self::driver::{Delivery, Driver, Event, FinishReason, GeneratedToken, StopRules};
use self::events::EventReceiver;
use self::forced::ForcedTokens;
use self::params::{GenerateParams, Prompt};
use self::sampling::Sampler;
use self::text::TextStream;
use super::chat;
use super::limits::{check_messages, check_prompt_text, check_target, check_token_ids};
use super::routing::PendingShadow;
use super::routing::{self, Routing};
use super::text::{self as text_input, EncodeError, Truncate};
use super::{RequestMetrics, ServedBy};
use crate::config::{GenerationConfig, LimitsConfig};
use crate::engine::continuous::{ContinuousScheduler, GenerationJob};
use crate::error::{Error, Result, Task};
use crate::registry::settings::Sourced;
use crate::registry::{ModelVersion, Registry};
use crate::runtime::step::RunError;
use crate::telemetry::metrics;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    pub queue: Duration,
    pub time_to_first_token: Duration,
    pub total: Duration,
}

/// A generation in progress: the events of all its sequences, in the order they happened.
pub struct GenerationStream {
    pub served_by: ServedBy,
    pub prompt_tokens: usize,
    pub sequences: usize,
    events: EventReceiver,
    arrived: Instant,
    started: Option<Instant>,
    first_token: Option<Instant>,
    /// When the whole generation was handed to the scheduler: its queue time starts here.
    submitted: Instant,
    delivery: Delivery,
    /// Each sequence's last token, for the time between tokens.
    last_token: Vec<Option<Instant>>,
    /// Looked up at the second token, then recorded into at every token after it.
    inter_token: Option<metrics::Histogram>,
    finished_sequences: usize,
    generated_tokens: usize,
    metrics: Option<RequestMetrics>,
    model: Arc<ModelVersion>,
    /// A copy to one of the route's own versions: it starts once every sequence of this
    /// generation has started (else it would find this request's own sequences waiting).
    shadow: PendingShadow,
    sequences_started: usize,
}

impl GenerationStream {
    /// Drops a copy still waiting to start: the server is closing, and it would only fail.
    pub fn forget_shadow(&mut self) {
        self.shadow.forget();
    }

    /// The next event, or `None` once every sequence has finished.
    pub async fn next(&mut self) -> Option<Event> {
        if self.finished_sequences == self.sequences {
            return None;
        }
        let event = self.events.recv().await;
        match &event {
            Some(Event::Started { at, .. }) => {
                self.sequences_started += 1;
                if self.sequences_started == self.sequences {
                    self.shadow.start();
                }
                if self.started.is_none() {
                    self.started = Some(*at);
                    let waited = at.saturating_duration_since(self.submitted);
                    metrics::queue_time(&self.model.labels, waited);
                    if let Some(request) = &mut self.metrics {
                        request.queued(waited);
                    }
                }
            }
            Some(Event::Token { index, .. }) => {
                self.generated_tokens += 1;
                let now = Instant::now();
                // A shadow copy (no request metrics) has no route of its own to label its
                // latencies with: they would count among direct traffic's.
                let counted = self.metrics.is_some();
                if self.first_token.is_none() {
                    self.first_token = Some(now);
                    if counted {
                        metrics::time_to_first_token(
                            &self.model.labels,
                            self.served_by.route_labels(),
                            now - self.arrived,
                        );
                    }
                }
                // Only where tokens leave one by one: a collected generation holds them back.
                if counted
                    && self.delivery == Delivery::Stream
                    && let Some(last) = self.last_token.get_mut(*index)
                    && let Some(previous) = last.replace(now)
                {
                    self.inter_token
                        .get_or_insert_with(|| {
                            metrics::inter_token(&self.model.labels, self.served_by.route_labels())
                        })
                        .record(now - previous);
                }
            }
            Some(Event::Finished { .. }) | Some(Event::Failed { .. }) => {
                self.finished_sequences += 1;
                if self.finished_sequences == self.sequences {
                    self.close(&event);
                }
            }
            None => {
                self.finished_sequences = self.sequences;
                let failure = Event::Failed {
                    index: 0,
                    error: Arc::new(RunError::SchedulerStopped),
                };
                self.close(&Some(failure.clone()));
                return Some(failure);
            }
        }
        event
    }

    /// Whether every sequence has finished.
    pub fn is_done(&self) -> bool {
        self.finished_sequences == self.sequences
    }

    /// Tokens generated so far over all sequences.
    pub fn generated_tokens(&self) -> usize {
        self.generated_tokens
    }

    /// Where the time went, as far as it has gone.
    pub fn timings(&self) -> Timings {
        let now = Instant::now();
        Timings {
            queue: self.started.unwrap_or(now) - self.arrived,
            time_to_first_token: self.first_token.unwrap_or(now) - self.arrived,
            total: now - self.arrived,
        }
    }

    fn close(&mut self, last: &Option<Event>) {
        if let Some(mut request) = self.metrics.take() {
            request.tokens(self.prompt_tokens * self.sequences, self.generated_tokens);
            let result = match last {
                Some(Event::Failed { error, .. }) => Err(Error::Run(Arc::clone(error))),
                _ => Ok(()),
            };
            let _ = request.finish(result);
        }
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        // Dropped before the end: the caller cancelled, went away or ran out of time, which
        // the request's metrics tell apart when they are dropped.
        if let Some(mut request) = self.metrics.take() {
            request.tokens(self.prompt_tokens * self.sequences, self.generated_tokens);
        }
    }
}

/// The server's limits on a Generate request.
#[derive(Clone, Copy)]
pub struct Limits<'a> {
    pub request: &'a LimitsConfig,
    pub generation: &'a GenerationConfig,
}

/// Starts generating; the returned stream yields the events, each token as it is produced.
pub async fn start(
    registry: &Registry,
    limits: Limits<'_>,
    params: GenerateParams,
    routing: &Routing,
) -> Result<GenerationStream> {
    start_with(registry, limits, params, routing, Delivery::Stream).await
}

/// The request's own sizes, before anything is looked up or tokenized.
fn check_request(params: &GenerateParams, limits: &LimitsConfig) -> Result<()> {
    check_target("model", &params.model, limits)?;
    match &params.prompt {
        Some(Prompt::Text(text)) => check_prompt_text("prompt.text", text, limits),
        Some(Prompt::Ids(ids)) => check_token_ids("prompt.token_ids", ids.len(), limits),
        Some(Prompt::Messages(messages)) => check_messages("prompt.messages", messages, limits),
        None => Ok(()),
    }
}

async fn start_with(
    registry: &Registry,
    limits: Limits<'_>,
    params: GenerateParams,
    routing: &Routing,
    delivery: Delivery,
) -> Result<GenerationStream> {
    let config = limits.generation;
    let mut request = RequestMetrics::start(Task::Generate.as_str(), routing.call_deadline);
    request.requested(registry, &params.model);
    // The request's own values are checked before any model is chosen; the model's defaults
    // for what it left unset join once the route has picked one.
    let routed = check_request(&params, limits.request)
        .and_then(|()| params.check_own(config))
        .and_then(|_| {
            routing::route(
                registry,
                &params.model,
                Task::Generate,
                routing,
                &mut request,
                |shadow| {
                    let (config, params) = (config.clone(), params.clone());
                    async move {
                        collect(
                            start_on(
                                shadow,
                                ServedBy::default(),
                                &config,
                                params,
                                None,
                                Delivery::Collect,
                                None,
                            )
                            .await?,
                        )
                        .await
                    }
                },
            )
        });
    match routed {
        Ok((model, served_by, shadow)) => {
            let deadline = routing.deadline;
            let started = start_on(
                model,
                served_by,
                config,
                params,
                Some(request),
                delivery,
                deadline,
            )
            .await;
            let mut shadow = shadow;
            // Refused once the model's defaults joined (greedy n > 1, say): a copy would only
            // cost the shadow model work for a request that was refused.
            if let Err(Error::InvalidArgument { .. }) = &started {
                shadow.forget();
            }
            let mut stream = started?;
            stream.shadow = shadow;
            Ok(stream)
        }
        Err(error) => Err(request.finish::<()>(Err(error)).unwrap_err()),
    }
}

/// The length the model's authors set in `max_length`, where it is below the context size
/// (BART-CNN's 142). Many configs set it to the context size, which says nothing of the length
/// wanted: the server's default applies there.
fn authors_max_length(model: &ModelVersion) -> Option<usize> {
    let max_length = model.settings.generation.max_length.as_ref()?.value as usize;
    (max_length < model.settings.max_length.value).then_some(max_length)
}

/// Starts generating on one model version.
async fn start_on(
    model: Arc<ModelVersion>,
    served_by: ServedBy,
    config: &GenerationConfig,
    params: GenerateParams,
    request: Option<RequestMetrics>,
    delivery: Delivery,
    deadline: Option<Instant>,
) -> Result<GenerationStream> {
    let arrived = Instant::now();
    let Some(scheduler) = model.engine.generator() else {
        let error = Error::Internal(format!("{} has no scheduler", model.name));
        return Err(finish_early(request, error));
    };
    let max_length = authors_max_length(&model);
    let with_defaults = params
        .clone()
        .with_model_defaults(&model.settings.generation, config);
    let checked = match max_length {
        Some(max_length) => with_defaults.check_under_max_length(config, max_length),
        None => with_defaults.check(config),
    };
    let checked = match checked {
        Ok(checked) => checked,
        Err(error) => return Err(finish_early(request, error)),
    };
    // Before tokenizing: a request the queue cannot serve in time costs nothing more.
    // A beam search is one sequence of the scheduler, whatever its n.
    let queued = if checked.beams.is_some() {
        1
    } else {
        checked.n
    };
    let place = match scheduler.admit(queued, checked.max_new_tokens, deadline) {
        Ok(place) => place,
        Err(error) => return Err(finish_early(request, error)),
    };
    let is_chat = matches!(params.prompt, Some(Prompt::Messages(_)));
    let prompt = match prompt_ids(&model, params.prompt, params.truncate_prompt)
        .instrument(tracing::info_span!("tokenize"))
        .await
        .and_then(|prompt| {
            // Stop ids the model can never produce would silently never stop anything.
            check_in_vocabulary(
                "parameters.stop_token_ids",
                &checked.stop_token_ids,
                model.vocab_size,
            )?;
            Ok(prompt)
        }) {
        Ok(prompt) => prompt,
        Err(error) => return Err(finish_early(request, error)),
    };
    // What the generated tokens follow: the prompt, or an encoder-decoder's start token (its
    // prompt is the source, read by the encoder). Penalties and detokenization look at it.
    let target_context: Vec<i64> = match &model.settings.decoder_start_token_id {
        Some(start) => vec![i64::from(start.value)],
        None => prompt.clone(),
    };
    let context_left = model
        .settings
        .max_length
        .value
        .saturating_sub(target_context.len());
    let defaults = &model.settings.generation;
    let value = |setting: &Option<Sourced<u32>>| setting.as_ref().map(|s| s.value as usize);
    // The model's max_length and min_length count the prompt (or start token), as
    // transformers counts them.
    let wanted = match max_length {
        Some(max_length) if checked.length_unset => {
            let left = max_length
                .saturating_sub(target_context.len())
                .clamp(1, config.max_new_tokens);
            if checked.min_new_tokens > left {
                let error = Error::invalid(
                    "parameters.min_new_tokens",
                    format!(
                        "{} is more than the {left} new tokens the model's max_length of \
                         {max_length} allows after this prompt; set max_new_tokens to ask for more",
                        checked.min_new_tokens
                    ),
                );
                return Err(finish_early(request, error));
            }
            left
        }
        _ => checked.max_new_tokens,
    };
    let max_new_tokens = wanted.min(context_left);
    let model_min = value(&defaults.min_new_tokens).unwrap_or(0).max(
        value(&defaults.min_length)
            .unwrap_or(0)
            .saturating_sub(target_context.len()),
    );
    let mut stop_ids: Vec<i64> = checked
        .stop_token_ids
        .iter()
        .map(|&id| i64::from(id))
        .collect();
    if !checked.ignore_eos {
        stop_ids.extend(
            model
                .settings
                .eos_token_ids
                .value
                .iter()
                .map(|&id| i64::from(id)),
        );
        // A reply ends with its turn, even where the model's EOS is another token.
        if is_chat
            && let Some(end) = chat::end_of_turn(&model).map(i64::from)
            && !stop_ids.contains(&end)
        {
            stop_ids.push(end);
        }
    }
    let settings = &model.settings;
    let forced = ForcedTokens {
        first: settings
            .forced_bos_token_id
            .as_ref()
            .map(|forced| i64::from(forced.value)),
        // A caller who ignores EOS asked for every token up to the limit.
        last: match &settings.forced_eos_token_ids {
            Some(forced) if !checked.ignore_eos => {
                forced.value.iter().map(|&id| i64::from(id)).collect()
            }
            _ => Vec::new(),
        },
    };
    let ids = |setting: &Option<Sourced<Vec<u32>>>| -> Vec<i64> {
        setting
            .iter()
            .flat_map(|s| s.value.iter().map(|&id| i64::from(id)))
            .collect()
    };
    let constraints = Constraints {
        no_repeat_ngram_size: value(&defaults.no_repeat_ngram_size).unwrap_or(0),
        // transformers leaves out a bad word that is just one of the model's EOS ids.
        bad_words: defaults
            .bad_words_ids
            .iter()
            .flat_map(|words| &words.value)
            .filter(|word| {
                !(word.len() == 1 && model.settings.eos_token_ids.value.contains(&word[0]))
            })
            .map(|word| word.iter().map(|&id| i64::from(id)).collect())
            .collect(),
        suppress: ids(&defaults.suppress_tokens),
        suppress_at_begin: ids(&defaults.begin_suppress_tokens),
        // After a forced first token, as transformers begins there.
        begin_at: usize::from(forced.first.is_some()),
    };
    let rules = StopRules {
        max_new_tokens,
        min_new_tokens: checked.min_new_tokens.max(model_min).min(max_new_tokens),
        stop_ids,
        top_logprobs: checked.top_logprobs,
        forced,
        constraints,
    };

    let (sender, events) = events::channel(checked.n);
    let vocab = model.vocab_size;
    let context_u32: Vec<u32> = target_context.iter().map(|&id| id as u32).collect();
    let jobs = match checked.beams {
        Some(beams) => {
            let search = BeamSearch::new(
                beams,
                max_new_tokens,
                rules.min_new_tokens,
                rules.stop_ids.clone(),
                rules.forced.clone(),
                rules.constraints.clone(),
                target_context.clone(),
            );
            let driver = BeamDriver::new(
                search,
                checked.n,
                context_u32,
                checked.keep_special_tokens,
                Arc::clone(&model.tokenizer),
                sender.clone(),
            );
            vec![GenerationJob {
                rows: beams.num_beams,
                reserved_tokens: beams.num_beams * (prompt.len() + max_new_tokens),
                prompt: prompt.clone(),
                driver: Box::new(driver),
            }]
        }
        None => (0..checked.n)
            .map(|index| {
                let seed = checked
                    .seed
                    .map_or_else(rand::random, |seed| seed.wrapping_add(index as u64));
                let sampler = Sampler::new(checked.sampling.clone(), seed, vocab, &target_context);
                let text = TextStream::new(
                    &context_u32,
                    checked.stop.clone(),
                    checked.keep_special_tokens,
                );
                let driver = Driver::new(
                    index,
                    sampler,
                    text,
                    Arc::clone(&model.tokenizer),
                    rules.clone(),
                    sender.clone(),
                    delivery,
                )
                .continuing(&target_context);
                GenerationJob {
                    rows: 1,
                    prompt: prompt.clone(),
                    reserved_tokens: prompt.len() + max_new_tokens,
                    driver: Box::new(driver),
                }
            })
            .collect(),
    };
    if let Err(error) = check_kv_budget(&jobs, prompt.len(), max_new_tokens, scheduler) {
        return Err(finish_early(request, error));
    }
    let submitted = Instant::now();
    if let Err(error) = scheduler.submit(jobs, place) {
        return Err(finish_early(request, error));
    }
    Ok(GenerationStream {
        served_by,
        prompt_tokens: prompt.len(),
        sequences: checked.n,
        events,
        arrived,
        started: None,
        first_token: None,
        submitted,
        delivery,
        last_token: vec![None; checked.n],
        inter_token: None,
        finished_sequences: 0,
        generated_tokens: 0,
        metrics: request,
        model,
        shadow: PendingShadow::default(),
        sequences_started: 0,
    })
}

/// A sequence that reserves more of the KV cache than the model's whole budget could only run
/// past it (an empty batch takes any sequence, so that long ones make progress): refused here,
/// naming what it asks and what the model has.
fn check_kv_budget(
    jobs: &[GenerationJob],
    prompt_tokens: usize,
    max_new_tokens: usize,
    scheduler: &ContinuousScheduler,
) -> Result<()> {
    let budget = scheduler.kv_budget().budget_tokens;
    let Some(job) = jobs.iter().find(|job| job.reserved_tokens > budget) else {
        return Ok(());
    };
    let field = if job.rows > 1 {
        "parameters.num_beams"
    } else {
        "parameters.max_new_tokens"
    };
    Err(Error::invalid(
        field,
        format!(
            "{} row(s) of {prompt_tokens} prompt and {max_new_tokens} new tokens reserve {} \
             tokens of the KV cache, over this model's budget of {budget} \
             (generation.kv_cache_mib, generation.max_total_tokens)",
            job.rows, job.reserved_tokens
        ),
    ))
}

fn finish_early(request: Option<RequestMetrics>, error: Error) -> Error {
    match request {
        Some(request) => request.finish::<()>(Err(error)).unwrap_err(),
        None => error,
    }
}

/// One finished sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub index: usize,
    pub text: String,
    pub tokens: Vec<GeneratedToken>,
    pub finish_reason: Option<FinishReason>,
    pub stop_sequence: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOutput {
    pub sequences: Vec<Sequence>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub timings: Timings,
    pub served_by: ServedBy,
}

/// Generates to the end and returns everything at once; the text of each sequence is the
/// concatenation of the deltas a stream would have carried.
pub async fn generate(
    registry: &Registry,
    limits: Limits<'_>,
    params: GenerateParams,
    routing: &Routing,
) -> Result<GenerateOutput> {
    collect(start_with(registry, limits, params, routing, Delivery::Collect).await?).await
}

/// Follows a generation to its end.
async fn collect(mut stream: GenerationStream) -> Result<GenerateOutput> {
    let mut sequences: Vec<Sequence> = (0..stream.sequences)
        .map(|index| Sequence {
            index,
            text: String::new(),
            tokens: Vec::new(),
            finish_reason: None,
            stop_sequence: None,
        })
        .collect();
    while let Some(event) = stream.next().await {
        match event {
            Event::Started { .. } => {}
            Event::Token { index, token, text } => {
                sequences[index].text.push_str(&text);
                sequences[index].tokens.push(token);
            }
            Event::Finished {
                index,
                reason,
                text,
                stop_sequence,
            } => {
                sequences[index].text.push_str(&text);
                sequences[index].finish_reason = Some(reason);
                sequences[index].stop_sequence = stop_sequence;
            }
            Event::Failed { error, .. } => return Err(Error::Run(error)),
        }
    }
    Ok(GenerateOutput {
        prompt_tokens: stream.prompt_tokens,
        generated_tokens: stream.generated_tokens(),
        timings: stream.timings(),
        served_by: stream.served_by.clone(),
        sequences,
    })
}

/// Rejects the first id in `ids` at or past `vocab`, naming it as `field[index]`.
fn check_in_vocabulary(field: &str, ids: &[u32], vocab: usize) -> Result<()> {
    match ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= vocab)
    {
        Some((index, id)) => Err(Error::invalid(
            format!("{field}[{index}]"),
            format!("{id} is outside the vocabulary of {vocab} tokens"),
        )),
        None => Ok(()),
    }
}

/// The prompt as token ids, within the model's context (leaving room for one new token). Text
/// gets the special tokens the tokenizer adds (a BOS for Llama-style models, nothing for
/// GPT-2's); ids are the caller's exact input. A prompt cut to fit loses its oldest tokens.
async fn prompt_ids(
    model: &Arc<ModelVersion>,
    prompt: Option<Prompt>,
    truncate: bool,
) -> Result<Vec<i64>> {
    let model = Arc::clone(model);
    let bytes = match &prompt {
        Some(Prompt::Text(text)) => text.len(),
        Some(Prompt::Messages(messages)) => messages.iter().map(|m| m.content.len()).sum(),
        _ => 0,
    };
    // Off the async executor, the trim included: a long prompt must not hold up every other
    // request.
    text_input::blocking(move || {
        let ids = encode_prompt(&model, prompt, truncate);
        if bytes >= text_input::TRIM_AFTER_BYTES {
            text_input::give_back_memory();
        }
        ids
    })
    .await
}

/// What a prompt over the model's context is told to do; other APIs say it in their own terms.
pub const TRUNCATE_PROMPT_HINT: &str = "shorten it or set truncate_prompt to cut it from the left";

fn encode_prompt(model: &ModelVersion, prompt: Option<Prompt>, truncate: bool) -> Result<Vec<i64>> {
    let max_length = model.settings.max_length.value;
    let room = max_length.saturating_sub(1).max(1);
    let too_long = |tokens: usize| {
        Error::invalid(
            "prompt",
            format!(
                "{tokens} tokens leaves no room in the model's context of {max_length} tokens; {TRUNCATE_PROMPT_HINT}"
            ),
        )
    };
    let cut = if truncate {
        Truncate::Left
    } else {
        Truncate::None
    };
    match prompt {
        None => Err(Error::invalid(
            "prompt",
            "is missing; set text, token_ids or messages",
        )),
        Some(Prompt::Text(text)) => {
            let special = model.settings.add_special_tokens.value;
            match text_input::encode(&model.tokenizer, &text, special, room, cut) {
                Ok(encoded) => Ok(encoded.ids),
                Err(EncodeError::TooLong { tokens, .. }) => Err(too_long(tokens)),
                Err(error) => Err(text_input::text_error("prompt.text", error, "")),
            }
        }
        // The template writes the special tokens itself, so the tokenizer adds none (as
        // transformers' apply_chat_template(tokenize=True) does).
        Some(Prompt::Messages(messages)) => {
            let text = chat::render(model, "prompt.messages", &messages)?;
            match text_input::encode(&model.tokenizer, &text, false, room, cut) {
                Ok(encoded) => Ok(encoded.ids),
                Err(EncodeError::TooLong { tokens, .. }) => Err(too_long(tokens)),
                Err(error) => Err(text_input::text_error("prompt.messages", error, "")),
            }
        }
        Some(Prompt::Ids(ids)) => {
            check_in_vocabulary("prompt.token_ids", &ids, model.input_vocab_size)?;
            if ids.is_empty() {
                return Err(Error::invalid(
                    "prompt",
                    "has no tokens; send a non-empty prompt",
                ));
            }
            let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
            match ids.len() {
                length if length <= room => Ok(ids),
                _ if truncate => Ok(ids[ids.len() - room..].to_vec()),
                length => Err(too_long(length)),
            }
        }
    }
}
