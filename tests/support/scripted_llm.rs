//! An OpenAI chat-completions server that replays a script, one step per request, and
//! keeps every request for assertions.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

pub enum Step {
    /// Answer with these tool calls: (tool name, arguments object).
    ToolCalls(Vec<(&'static str, Value)>),
    /// Answer with text and no tool calls.
    Answer(String),
    /// Wait until `release` is notified, then answer with text.
    AnswerWhenReleased(Arc<Notify>, String),
    /// Fail with this HTTP status and body.
    Error(u16, Value),
    /// Once `release` is notified (if given), tool calls computed from the request (say, a
    /// job id read from the latest tool result).
    ToolCallsFrom(Option<Arc<Notify>>, Box<CallsFrom>),
}

/// Tool calls made from a request body.
pub type CallsFrom = dyn Fn(&Value) -> Vec<(&'static str, Value)> + Send;

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub path: String,
    pub authorization: Option<String>,
    pub api_key: Option<String>,
    pub body: Value,
}

struct Shared {
    /// Keep request bodies for assertions (benchmarks do not want the memory).
    keep_bodies: bool,
    /// Report prompt tokens as a tokenizer would, about one per four characters of the
    /// messages, instead of a constant 100.
    count_prompt_tokens: bool,
    steps: Mutex<VecDeque<Step>>,
    seen: Mutex<Vec<SeenRequest>>,
    count: watch::Sender<usize>,
    next_call: Mutex<u32>,
}

pub struct ScriptedLlm {
    /// OpenAI base URL, e.g. `http://127.0.0.1:41234/v1`.
    pub base_url: String,
    /// Anthropic base URL (the root), e.g. `http://127.0.0.1:41234`.
    pub anthropic_url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl ScriptedLlm {
    pub async fn start(steps: Vec<Step>) -> Self {
        Self::serve(steps, true, false).await
    }

    /// A server that keeps no request bodies.
    pub async fn start_without_bodies(steps: Vec<Step>) -> Self {
        Self::serve(steps, false, false).await
    }

    /// A server whose usage grows with the conversation, so context limits are reached.
    pub async fn start_counting_tokens(steps: Vec<Step>) -> Self {
        Self::serve(steps, true, true).await
    }

    async fn serve(steps: Vec<Step>, keep_bodies: bool, count_prompt_tokens: bool) -> Self {
        let shared = Arc::new(Shared {
            keep_bodies,
            count_prompt_tokens,
            steps: Mutex::new(steps.into()),
            seen: Mutex::new(vec![]),
            count: watch::channel(0).0,
            next_call: Mutex::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(complete))
            .route("/v1/messages", post(messages))
            .with_state(shared.clone());
        let (addr, server) = super::loopback::serve(app).await;
        ScriptedLlm {
            base_url: format!("http://{addr}/v1"),
            anthropic_url: format!("http://{addr}"),
            shared,
            server,
        }
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<SeenRequest> {
        let mut rx = self.shared.count.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the model got {} requests within {timeout:?}, expected {n}",
                    *self.shared.count.borrow()
                )
            })
            .expect("the scripted server is alive");
        self.requests()
    }
}

/// What the script says to answer, after recording the request.
enum Reply {
    Calls(Vec<(String, String, Value)>),
    Text(String),
    Failure(StatusCode, Value),
}

async fn next_reply(shared: &Shared, path: &str, headers: &HeaderMap, body: Value) -> Reply {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let request = body.clone();
    shared.seen.lock().unwrap().push(SeenRequest {
        path: path.into(),
        authorization: header("authorization"),
        api_key: header("x-api-key"),
        body: if shared.keep_bodies {
            body
        } else {
            Value::Null
        },
    });
    shared.count.send_modify(|c| *c += 1);
    let step = shared.steps.lock().unwrap().pop_front();
    match step {
        None => Reply::Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": {"message": "the test script has no more steps", "type": "server_error"}}),
        ),
        Some(Step::Error(status, body)) => {
            Reply::Failure(StatusCode::from_u16(status).expect("valid status"), body)
        }
        Some(Step::Answer(text)) => Reply::Text(text),
        Some(Step::AnswerWhenReleased(release, text)) => {
            release.notified().await;
            Reply::Text(text)
        }
        Some(Step::ToolCallsFrom(release, make)) => {
            if let Some(r) = release {
                r.notified().await;
            }
            numbered(shared, make(&request))
        }
        Some(Step::ToolCalls(calls)) => numbered(shared, calls),
    }
}

/// Tool calls with ids unique over the server's life.
fn numbered(shared: &Shared, calls: Vec<(&'static str, Value)>) -> Reply {
    Reply::Calls(
        calls
            .into_iter()
            .map(|(name, args)| {
                let mut n = shared.next_call.lock().unwrap();
                *n += 1;
                (format!("call_{n}"), name.to_string(), args)
            })
            .collect(),
    )
}

fn sse(events: Vec<(Option<&str>, String)>) -> Response {
    let mut body = String::new();
    for (name, data) in events {
        if let Some(n) = name {
            body.push_str(&format!("event: {n}\n"));
        }
        body.push_str(&format!("data: {data}\n\n"));
    }
    (
        [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
        body,
    )
        .into_response()
}

/// Splits a string in two, on a character boundary, so streams carry real deltas.
fn halves(s: &str) -> (String, String) {
    let mid = s
        .char_indices()
        .nth(s.chars().count() / 2)
        .map(|(i, _)| i)
        .unwrap_or(0);
    (s[..mid].to_string(), s[mid..].to_string())
}

async fn complete(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let stream = body["stream"].as_bool().unwrap_or(false);
    let prompt_tokens = if shared.count_prompt_tokens {
        body["messages"].to_string().len() / 4
    } else {
        100
    };
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": 10,
                       "total_tokens": prompt_tokens + 10});
    let reply = next_reply(&shared, "/v1/chat/completions", &headers, body).await;
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "model": "scripted",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        .to_string()
    };
    match (reply, stream) {
        (Reply::Failure(status, body), _) => (status, Json(body)).into_response(),
        (Reply::Text(text), false) => Json(answer(&text, usage)).into_response(),
        (Reply::Calls(calls), false) => {
            let calls: Vec<Value> = calls
                .into_iter()
                .map(|(id, name, args)| {
                    json!({"id": id, "type": "function",
                           "function": {"name": name, "arguments": args.to_string()}})
                })
                .collect();
            Json(json!({
                "id": "chatcmpl-scripted", "object": "chat.completion", "model": "scripted",
                "choices": [{"index": 0, "finish_reason": "tool_calls",
                             "message": {"role": "assistant", "content": null, "tool_calls": calls}}],
                "usage": usage
            }))
            .into_response()
        }
        (reply, true) => {
            let mut events = vec![(
                None,
                chunk(json!({"role": "assistant", "content": null}), Value::Null),
            )];
            let finish = match reply {
                Reply::Text(text) => {
                    let (a, b) = halves(&text);
                    events.push((None, chunk(json!({"content": a}), Value::Null)));
                    events.push((None, chunk(json!({"content": b}), Value::Null)));
                    "stop"
                }
                Reply::Calls(calls) => {
                    for (index, (id, name, args)) in calls.into_iter().enumerate() {
                        let (a, b) = halves(&args.to_string());
                        events.push((
                            None,
                            chunk(
                                json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                            "function": {"name": name, "arguments": a}}]}),
                                Value::Null,
                            ),
                        ));
                        events.push((
                            None,
                            chunk(
                                json!({"tool_calls": [{"index": index,
                            "function": {"arguments": b}}]}),
                                Value::Null,
                            ),
                        ));
                    }
                    "tool_calls"
                }
                Reply::Failure(..) => unreachable!("failures were answered above"),
            };
            events.push((None, chunk(json!({}), json!(finish))));
            events.push((
                None,
                json!({"id": "chatcmpl-scripted", "object": "chat.completion.chunk",
                                      "choices": [], "usage": usage})
                .to_string(),
            ));
            events.push((None, "[DONE]".to_string()));
            sse(events)
        }
    }
}

async fn messages(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let stream = body["stream"].as_bool().unwrap_or(false);
    let reply = next_reply(&shared, "/v1/messages", &headers, body).await;
    let (blocks, stop) = match reply {
        Reply::Failure(status, body) => return (status, Json(body)).into_response(),
        Reply::Text(text) => (vec![json!({"type": "text", "text": text})], "end_turn"),
        Reply::Calls(calls) => (
            calls
                .into_iter()
                .map(|(id, name, args)| json!({"type": "tool_use", "id": id, "name": name, "input": args}))
                .collect(),
            "tool_use",
        ),
    };
    if !stream {
        return Json(json!({
            "id": "msg_scripted", "type": "message", "role": "assistant", "model": "scripted",
            "content": blocks, "stop_reason": stop, "stop_sequence": null,
            "usage": {"input_tokens": 100, "output_tokens": 10}
        }))
        .into_response();
    }
    let mut events = vec![(
        Some("message_start"),
        json!({"type": "message_start", "message": {"id": "msg_scripted", "type": "message",
               "role": "assistant", "content": [], "model": "scripted",
               "usage": {"input_tokens": 100, "output_tokens": 1}}}),
    )];
    for (index, block) in blocks.into_iter().enumerate() {
        let (start, deltas) = if block["type"] == "text" {
            let (a, b) = halves(block["text"].as_str().unwrap_or(""));
            (
                json!({"type": "text", "text": ""}),
                vec![
                    json!({"type": "text_delta", "text": a}),
                    json!({"type": "text_delta", "text": b}),
                ],
            )
        } else {
            let (a, b) = halves(&block["input"].to_string());
            (
                json!({"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}),
                vec![
                    json!({"type": "input_json_delta", "partial_json": ""}),
                    json!({"type": "input_json_delta", "partial_json": a}),
                    json!({"type": "input_json_delta", "partial_json": b}),
                ],
            )
        };
        events.push((
            Some("content_block_start"),
            json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        for d in deltas {
            events.push((Some("ping"), json!({"type": "ping"})));
            events.push((
                Some("content_block_delta"),
                json!({"type": "content_block_delta", "index": index, "delta": d}),
            ));
        }
        events.push((
            Some("content_block_stop"),
            json!({"type": "content_block_stop", "index": index}),
        ));
    }
    events.push((
        Some("message_delta"),
        json!({"type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": 10}}),
    ));
    events.push((Some("message_stop"), json!({"type": "message_stop"})));
    sse(events
        .into_iter()
        .map(|(n, v)| (n, v.to_string()))
        .collect())
}
fn answer(text: &str, usage: Value) -> Value {
    json!({
        "id": "chatcmpl-scripted", "object": "chat.completion", "model": "scripted",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": usage
    })
}
