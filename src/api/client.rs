//! The command-line client: `lmserve generate|embed|classify` against a running server.

use std::io::Write;

use futures::StreamExt;
use tonic::transport::Channel;

use super::proto::generate_request::Prompt;
use super::proto::inference_client::InferenceClient;
use super::proto::{self, GenerationParameters};

/// The server a client command talks to when `--addr` is not given.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

async fn connect(addr: &str) -> anyhow::Result<InferenceClient<Channel>> {
    let channel = Channel::from_shared(addr.to_owned())?
        .connect()
        .await
        .map_err(|error| anyhow::anyhow!("cannot reach lmserve at {addr}: {error}"))?;
    Ok(InferenceClient::new(channel))
}

fn status(error: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", error.code(), error.message())
}

/// Streams a generation to stdout, token by token as the server produces them.
pub async fn generate(
    addr: &str,
    model: String,
    prompt: String,
    parameters: GenerationParameters,
) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
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
    write!(stdout, "{prompt}")?;
    stdout.flush()?;
    let mut summary = None;
    while let Some(message) = stream.next().await {
        let message = message.map_err(status)?;
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

/// Prints one embedding per text, as JSON lines.
pub async fn embed(addr: &str, model: String, texts: Vec<String>) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
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

/// Prints the labels of each text, best first.
pub async fn classify(addr: &str, model: String, texts: Vec<String>) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let response = client
        .classify(proto::ClassifyRequest {
            model,
            texts: texts.clone(),
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
