//! Chat prompts on a tiny model given a chat template: the rendered prompt is what Tokenize
//! shows, a chat generation is the plain generation of those ids, cut at the template's end of
//! turn even where that token is not one of the model's EOS ids.

mod common;

use common::{ServerOptions, TestServer, chat_repository};
use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::{
    ChatMessage, ChatMessages, FinishReason, GenerateRequest, GenerationParameters, TokenIds,
    TokenizeRequest,
};

const NEW_TOKENS: u32 = 24;

fn conversation() -> ChatMessages {
    let turn = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    ChatMessages {
        messages: vec![turn("system", "You speak verse."), turn("user", "ROMEO.")],
    }
}

fn request(prompt: Prompt) -> GenerateRequest {
    GenerateRequest {
        model: "tiny-chat".into(),
        prompt: Some(prompt),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(NEW_TOKENS),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn serve(repository: &tempfile::TempDir) -> TestServer {
    TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn a_chat_generation_is_its_rendered_prompt_cut_at_the_end_of_turn() {
    // First with the model's own EOS as the end of turn: a chat generation is exactly the
    // generation of the rendered prompt's ids.
    let repository = chat_repository("<|endoftext|>");
    let server = serve(&repository).await;
    let mut client = server.inference().await;
    let tokens = client
        .tokenize(TokenizeRequest {
            model: "tiny-chat".into(),
            messages: Some(conversation()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        tokens.rendered_text,
        "SYSTEM: You speak verse.\nUSER: ROMEO.\nASSISTANT:"
    );
    let ids: Vec<u32> = tokens.tokens.iter().map(|t| t.id).collect();
    let plain = client
        .generate(request(Prompt::TokenIds(TokenIds { ids: ids.clone() })))
        .await
        .unwrap()
        .into_inner();
    let chat = client
        .generate(request(Prompt::Messages(conversation())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(chat.prompt_tokens as usize, ids.len());
    let greedy: Vec<u32> = plain.sequences[0].tokens.iter().map(|t| t.id).collect();
    let got: Vec<u32> = chat.sequences[0].tokens.iter().map(|t| t.id).collect();
    assert_eq!(got, greedy);
    assert!(greedy.len() > 3, "{greedy:?}");
    drop(server);

    // Then with the third generated token as the end of turn (it is no EOS id of the model):
    // the chat reply stops there, a plain prompt does not.
    let end = greedy[2];
    let at = greedy.iter().position(|&id| id == end).unwrap();
    let tokenizer: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repository.path().join("tiny-chat/1/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let spelling = tokenizer["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, id)| id.as_u64() == Some(u64::from(end)))
        .map(|(token, _)| token.clone())
        .unwrap();
    let repository = chat_repository(&spelling);
    let server = serve(&repository).await;
    let mut client = server.inference().await;
    let chat = client
        .generate(request(Prompt::Messages(conversation())))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<u32> = chat.sequences[0].tokens.iter().map(|t| t.id).collect();
    assert_eq!(got, greedy[..=at]);
    assert_eq!(chat.sequences[0].finish_reason, FinishReason::Eos as i32);
    let plain = client
        .generate(request(Prompt::TokenIds(TokenIds { ids })))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<u32> = plain.sequences[0].tokens.iter().map(|t| t.id).collect();
    assert_eq!(got, greedy);
}

#[tokio::test]
async fn a_template_that_refuses_a_conversation_is_an_invalid_argument_with_its_message() {
    let repository = chat_repository("<|endoftext|>");
    std::fs::write(
        repository.path().join("tiny-chat/1/chat_template.jinja"),
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user message') }}{% endif %}{{ messages[0].content }}",
    )
    .unwrap();
    let server = serve(&repository).await;
    let mut client = server.inference().await;
    let status = client
        .generate(request(Prompt::Messages(conversation())))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("prompt.messages"), "{status:?}");
    assert!(
        status
            .message()
            .contains("Conversations must start with a user message"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_template_that_does_not_compile_fails_the_load_naming_its_file() {
    use lmserve::api::proto::{GetModelRequest, LoadState};

    let repository = chat_repository("<|endoftext|>");
    std::fs::write(
        repository.path().join("tiny-chat/1/chat_template.jinja"),
        "{% for m in messages %}{{ m.content }}",
    )
    .unwrap();
    // A model that loads, so that the server reports SERVING.
    common::copy_version("tiny-gpt2", "1", repository.path(), "tiny-gpt2", "1");
    let server = serve(&repository).await;
    let version = server
        .models()
        .await
        .get_model(GetModelRequest {
            name: "tiny-chat".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions
        .remove(0);
    assert_eq!(version.state, LoadState::Failed as i32);
    assert!(
        version
            .load_error
            .contains("the chat template in chat_template.jinja does not compile"),
        "{}",
        version.load_error
    );
}
