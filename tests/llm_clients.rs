//! The model clients, both wire protocols, streaming and not: against the scripted server
//! (exact requests and documented response shapes) and against the real llama.cpp server
//! that tests/run.sh starts (a server nobody here wrote).

mod support;

use std::time::Duration;

use ml_intern::agent::{ChatMessage, ToolCall};
use ml_intern::llm::{ChatModel, LlmError, ModelSettings, ToolSpec, WireApi, client_for};
use serde_json::{Value, json};
use support::{ScriptedLlm, Step};

const APIS: [WireApi; 2] = [WireApi::OpenAiChat, WireApi::AnthropicMessages];

fn bash_spec() -> ToolSpec {
    ToolSpec {
        name: "bash".into(),
        description: "Run a shell command in the sandbox and return its output.".into(),
        parameters: json!({"type": "object",
            "properties": {"command": {"type": "string", "description": "The command."}},
            "required": ["command"]}),
    }
}

fn client(api: WireApi, base: &str, stream: bool, key: Option<&str>) -> Box<dyn ChatModel> {
    ml_intern::http::install_crypto_provider();
    client_for(ModelSettings {
        api,
        model: "scripted-model",
        base_url: Some(base),
        api_key: key.map(str::to_string),
        timeout: Duration::from_secs(120),
        stream,
        max_tokens: Some(96),
        temperature: Some(0.0),
    })
}

fn base_for(llm: &ScriptedLlm, api: WireApi) -> String {
    match api {
        WireApi::OpenAiChat => llm.base_url.clone(),
        WireApi::AnthropicMessages => llm.anthropic_url.clone(),
    }
}

#[tokio::test]
async fn both_protocols_round_trip_a_tool_call_streaming_and_not() {
    for api in APIS {
        for stream in [false, true] {
            let case = format!("{api:?} stream={stream}");
            let llm = ScriptedLlm::start(vec![
                Step::ToolCalls(vec![(
                    "bash",
                    json!({"command": "ls -la /workspace", "timeout": 30}),
                )]),
                Step::Answer("Fertig: zwei Dateien, ünïcödé intact.".into()),
            ])
            .await;
            let model = client(api, &base_for(&llm, api), stream, Some("key-123456"));
            let mut history = vec![ChatMessage::system("sys"), ChatMessage::user("list")];
            let first = model
                .complete(&history, &[bash_spec()], None)
                .await
                .expect(&case);
            assert_eq!(first.tool_calls.len(), 1, "{case}");
            let call = &first.tool_calls[0];
            assert_eq!(call.name, "bash", "{case}");
            let args: Value = serde_json::from_str(&call.arguments).expect(&case);
            assert_eq!(
                args,
                json!({"command": "ls -la /workspace", "timeout": 30}),
                "{case}"
            );
            assert_eq!(first.finish_reason.as_deref(), Some("tool_calls"), "{case}");
            assert_eq!(first.usage.prompt_tokens, 100, "{case}");
            assert_eq!(first.usage.completion_tokens, 10, "{case}");

            history.push(ChatMessage::Assistant {
                content: None,
                tool_calls: vec![ToolCall {
                    id: call.id.clone(),
                    name: call.name.clone(),
                    arguments: call.arguments.clone(),
                }],
            });
            history.push(ChatMessage::Tool {
                tool_call_id: call.id.clone(),
                name: "bash".into(),
                content: "a.txt\nb.txt".into(),
            });
            let (deltas, mut pieces) = tokio::sync::mpsc::channel(16);
            let second = model
                .complete(&history, &[bash_spec()], Some(&deltas))
                .await
                .expect(&case);
            drop(deltas);
            assert_eq!(
                second.content.as_deref(),
                Some("Fertig: zwei Dateien, ünïcödé intact."),
                "{case}"
            );
            let mut streamed = vec![];
            while let Some(piece) = pieces.recv().await {
                streamed.push(piece);
            }
            if stream {
                assert!(
                    streamed.len() >= 2,
                    "{case}: text arrives in pieces: {streamed:?}"
                );
                assert_eq!(
                    streamed.concat(),
                    "Fertig: zwei Dateien, ünïcödé intact.",
                    "{case}"
                );
            } else {
                assert!(streamed.is_empty(), "{case}: a whole body has no pieces");
            }
            assert!(second.tool_calls.is_empty(), "{case}");
            assert_eq!(second.finish_reason.as_deref(), Some("stop"), "{case}");

            let seen = llm.requests();
            assert_eq!(seen[0].body["stream"], stream, "{case}");
            match api {
                WireApi::OpenAiChat => {
                    assert_eq!(seen[0].path, "/v1/chat/completions");
                    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer key-123456"));
                    assert_eq!(
                        seen[1].body["messages"][3]["tool_call_id"],
                        call.id.as_str()
                    );
                    if stream {
                        assert_eq!(seen[0].body["stream_options"]["include_usage"], true);
                    }
                }
                WireApi::AnthropicMessages => {
                    assert_eq!(seen[0].path, "/v1/messages");
                    assert_eq!(seen[0].api_key.as_deref(), Some("key-123456"));
                    assert_eq!(seen[0].body["system"], "sys");
                    assert_eq!(seen[0].body["max_tokens"], 96);
                    let result = &seen[1].body["messages"][2]["content"][0];
                    assert_eq!(result["type"], "tool_result", "{case}");
                    assert_eq!(result["tool_use_id"], call.id.as_str(), "{case}");
                }
            }
        }
    }
}

#[tokio::test]
async fn error_statuses_and_envelopes_are_classified() {
    for api in APIS {
        for stream in [false, true] {
            let llm = ScriptedLlm::start(vec![
                Step::Error(429, json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})),
                Step::Error(401, json!({"error": {"message": "Invalid API Key", "type": "authentication_error"}})),
            ])
            .await;
            let model = client(api, &base_for(&llm, api), stream, None);
            let history = [ChatMessage::user("hi")];
            match model.complete(&history, &[], None).await {
                Err(e @ LlmError::Http { status: 429, .. }) => {
                    assert!(e.is_retryable());
                    assert!(e.to_string().contains("slow down"), "{e}");
                }
                other => panic!("{api:?}: expected a 429, got {other:?}"),
            }
            match model.complete(&history, &[], None).await {
                Err(e @ LlmError::Http { status: 401, .. }) => assert!(!e.is_retryable()),
                other => panic!("{api:?}: expected a 401, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn a_real_llama_cpp_server_speaks_both_protocols() {
    let url = std::env::var("ML_INTERN_E2E_LLM_URL").expect(
        "ML_INTERN_E2E_LLM_URL must name the llama.cpp server: run the tests with tests/run.sh",
    );
    let root = url
        .trim_end_matches('/')
        .trim_end_matches("/v1")
        .to_string();
    for api in APIS {
        for stream in [false, true] {
            let case = format!("{api:?} stream={stream}");
            let base = match api {
                WireApi::OpenAiChat => url.clone(),
                WireApi::AnthropicMessages => root.clone(),
            };
            let model = client(api, &base, stream, None);
            let mut history = vec![ChatMessage::user(
                "Use the bash tool to run the command `echo sandbox-says-hello` and tell me what it printed.",
            )];
            let first = model
                .complete(&history, &[bash_spec()], None)
                .await
                .expect(&case);
            assert_eq!(first.tool_calls.len(), 1, "{case}: {first:?}");
            let call = first.tool_calls[0].clone();
            assert_eq!(call.name, "bash", "{case}");
            let args: Value = serde_json::from_str(&call.arguments).expect(&case);
            assert!(
                args["command"].as_str().is_some_and(|c| c.contains("echo")),
                "{case}: {args}"
            );
            assert!(
                first.usage.prompt_tokens > 0 && first.usage.completion_tokens > 0,
                "{case}"
            );
            history.push(ChatMessage::Assistant {
                content: None,
                tool_calls: vec![call.clone()],
            });
            history.push(ChatMessage::Tool {
                tool_call_id: call.id,
                name: call.name,
                content: "sandbox-says-hello\n".into(),
            });
            let (deltas, mut pieces) = tokio::sync::mpsc::channel(1024);
            let second = model
                .complete(&history, &[bash_spec()], Some(&deltas))
                .await
                .expect(&case);
            drop(deltas);
            assert!(second.tool_calls.is_empty(), "{case}: {second:?}");
            let content = second.content.unwrap_or_default();
            assert!(!content.trim().is_empty(), "{case}");
            let mut streamed = vec![];
            while let Some(piece) = pieces.recv().await {
                streamed.push(piece);
            }
            if stream {
                // llama.cpp sends about a token per event.
                assert!(streamed.len() > 1, "{case}: {streamed:?}");
                assert_eq!(streamed.concat(), content, "{case}");
            } else {
                assert!(streamed.is_empty(), "{case}");
            }
        }
    }
}
