//! `lmserve generate|embed|classify`: the Inference service from the command line.

use std::io::Write;

use futures::StreamExt;

use super::{Connection, Target, status};
use crate::api::proto::generate_request::Prompt;
use crate::api::proto::inference_client::InferenceClient;
use crate::api::proto::models_client::ModelsClient;
use crate::api::proto::{self, GenerationParameters};

async fn connect(target: &Target) -> anyhow::Result<InferenceClient<Connection>> {
    Ok(InferenceClient::new(target.connect().await?))
}

/// Streams a generation to stdout, token by token as the server produces them.
pub async fn generate(
    target: &Target,
    model: String,
    prompt: String,
    parameters: GenerationParameters,
) -> anyhow::Result<()> {
    let mut client = connect(target).await?;
    let request = proto::GenerateRequest {
        model,
        prompt: Some(Prompt::Text(prompt.clone())),
        parameters: Some(parameters),
        truncate_prompt: false,
        route_key: String::new(),
    };
    let mut stream = client
        .generate_stream(request)
        .await
        .map_err(status)?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    let mut summary = None;
    let mut first = true;
    while let Some(message) = stream.next().await {
        let message = message.map_err(status)?;
        if std::mem::take(&mut first) {
            // A continuation follows its prompt on screen; a translation stands on its own.
            // The first message names the version serving the stream, whatever route or
            // bare name led to it.
            if !is_encoder_decoder(target, message.served_by.as_ref()).await {
                write!(stdout, "{prompt}")?;
            }
        }
        write!(stdout, "{}", message.text)?;
        stdout.flush()?;
        if message.timings.is_some() {
            summary = Some(message);
        }
    }
    writeln!(stdout)?;
    if let Some(last) = summary {
        let timings = last.timings.unwrap_or_default();
        let reason = proto::FinishReason::try_from(last.finish_reason)
            .map_or("unknown", |r| r.as_str_name());
        eprintln!(
            "[{} tokens, {reason}, first token {:.1} ms, total {:.1} ms]",
            last.generated_tokens,
            timings.time_to_first_token_seconds * 1e3,
            timings.total_seconds * 1e3
        );
    }
    Ok(())
}

/// Whether the version serving a stream is an encoder-decoder. A server that will not say (no
/// `served_by`, or Models not open to this caller) counts as not.
async fn is_encoder_decoder(target: &Target, served_by: Option<&proto::ServedBy>) -> bool {
    let Some(served_by) = served_by else {
        return false;
    };
    let Ok(connection) = target.connect().await else {
        return false;
    };
    let request = proto::GetModelRequest {
        name: served_by.model.clone(),
    };
    let Ok(info) = ModelsClient::new(connection).get_model(request).await else {
        return false;
    };
    info.into_inner().versions.iter().any(|version| {
        version.version == served_by.version
            && version.family == proto::Family::EncoderDecoder as i32
    })
}

/// Prints one embedding per text, as JSON lines.
pub async fn embed(target: &Target, model: String, texts: Vec<String>) -> anyhow::Result<()> {
    let mut client = connect(target).await?;
    let response = client
        .embed(proto::EmbedRequest {
            model,
            texts,
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    for embedding in response.embeddings {
        println!("{}", serde_json::to_string(&embedding.values)?);
    }
    Ok(())
}

/// Prints the labels of each text (scored with its pair, when `pairs` has one per text), best
/// first.
pub async fn classify(
    target: &Target,
    model: String,
    texts: Vec<String>,
    pairs: Vec<String>,
) -> anyhow::Result<()> {
    let mut client = connect(target).await?;
    let response = client
        .classify(proto::ClassifyRequest {
            model,
            texts: texts.clone(),
            text_pairs: pairs,
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    for (text, classification) in texts.iter().zip(response.classifications) {
        let labels: Vec<String> = classification
            .labels
            .iter()
            .map(|l| format!("{} {:.4}", l.label, l.score))
            .collect();
        println!("{}\t{text}", labels.join("  "));
    }
    Ok(())
}
