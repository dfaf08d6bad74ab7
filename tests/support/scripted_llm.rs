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
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub authorization: Option<String>,
    pub body: Value,
}

struct Shared {
    steps: Mutex<VecDeque<Step>>,
    seen: Mutex<Vec<SeenRequest>>,
    count: watch::Sender<usize>,
    next_call: Mutex<u32>,
}

pub struct ScriptedLlm {
    /// OpenAI base URL, e.g. `http://127.0.0.1:41234/v1`.
    pub base_url: String,
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
        let shared = Arc::new(Shared {
            steps: Mutex::new(steps.into()),
            seen: Mutex::new(vec![]),
            count: watch::channel(0).0,
            next_call: Mutex::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(complete))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ScriptedLlm {
            base_url: format!("http://{addr}/v1"),
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

async fn complete(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    shared.seen.lock().unwrap().push(SeenRequest {
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body,
    });
    shared.count.send_modify(|c| *c += 1);
    let step = shared.steps.lock().unwrap().pop_front();
    let usage = json!({"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110});
    match step {
        None => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"message": "the test script has no more steps", "type": "server_error"}})),
        )
            .into_response(),
        Some(Step::Error(status, body)) => (
            StatusCode::from_u16(status).expect("valid status"),
            Json(body),
        )
            .into_response(),
        Some(Step::Answer(text)) => Json(answer(&text, usage)).into_response(),
        Some(Step::AnswerWhenReleased(release, text)) => {
            release.notified().await;
            Json(answer(&text, usage)).into_response()
        }
        Some(Step::ToolCalls(calls)) => {
            let calls: Vec<Value> = calls
                .into_iter()
                .map(|(name, args)| {
                    let mut n = shared.next_call.lock().unwrap();
                    *n += 1;
                    json!({"id": format!("call_{n}"), "type": "function",
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
    }
}

fn answer(text: &str, usage: Value) -> Value {
    json!({
        "id": "chatcmpl-scripted", "object": "chat.completion", "model": "scripted",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": usage
    })
}
