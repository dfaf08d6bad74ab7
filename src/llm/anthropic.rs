//! Client for the Anthropic Messages API (`POST {base}/v1/messages`), streaming and not.
//! Tool results go back as `tool_result` blocks in a user turn; finish reasons are mapped
//! to the OpenAI names the loop uses (`tool_calls`, `length`, `stop`).

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::transport;
use super::{ChatModel, ChatResponse, LlmError, TextDeltas, ToolSpec, Usage};
use crate::agent::{ChatMessage, ToolCall};
use crate::http::http_client;

pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// `max_tokens` is required by the API; this is used when the session sets none.
pub const DEFAULT_MAX_TOKENS: u32 = 8192;

#[derive(Clone)]
pub struct AnthropicClient {
    http: reqwest::Client,
    url: String,
    api_key: Option<String>,
    model: String,
    max_tokens: u32,
    temperature: Option<f64>,
    stream: bool,
}

impl std::fmt::Debug for AnthropicClient {
    // The API key stays out of every debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnthropicClient")
            .field("url", &self.url)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl AnthropicClient {
    /// `base_url` is the API root without `/v1` (e.g. `https://api.anthropic.com`).
    pub fn new(
        base_url: &str,
        model: impl Into<String>,
        api_key: Option<String>,
        timeout: Duration,
    ) -> Self {
        AnthropicClient {
            http: http_client(timeout),
            url: format!("{}/v1/messages", base_url.trim_end_matches('/')),
            api_key,
            model: model.into(),
            max_tokens: DEFAULT_MAX_TOKENS,
            temperature: None,
            stream: false,
        }
    }

    pub fn with_sampling(mut self, max_tokens: Option<u32>, temperature: Option<f64>) -> Self {
        self.max_tokens = max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        self.temperature = temperature;
        self
    }

    pub fn streaming(mut self, stream: bool) -> Self {
        self.stream = stream;
        self
    }

    pub fn request_body(&self, messages: &[ChatMessage], tools: &[ToolSpec]) -> Value {
        let system: Vec<&str> = messages
            .iter()
            .filter_map(|m| match m {
                ChatMessage::System { content } => Some(content.as_str()),
                _ => None,
            })
            .collect();
        // Turns alternate: consecutive user-side entries (tool results, then a guard's
        // note) merge into one user turn.
        let mut turns: Vec<(&str, Vec<Value>)> = vec![];
        for m in messages {
            let (role, blocks) = match m {
                ChatMessage::System { .. } => continue,
                ChatMessage::User { content } => {
                    ("user", vec![json!({"type": "text", "text": content})])
                }
                ChatMessage::Tool {
                    tool_call_id,
                    content,
                    ..
                } => (
                    "user",
                    vec![
                        json!({"type": "tool_result", "tool_use_id": tool_call_id, "content": content}),
                    ],
                ),
                ChatMessage::Assistant {
                    content,
                    tool_calls,
                } => {
                    let mut blocks = vec![];
                    if let Some(text) = content.as_ref().filter(|t| !t.is_empty()) {
                        blocks.push(json!({"type": "text", "text": text}));
                    }
                    for c in tool_calls {
                        let input = serde_json::from_str::<Value>(&c.arguments)
                            .ok()
                            .filter(Value::is_object)
                            .unwrap_or_else(|| json!({}));
                        blocks.push(
                            json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input}),
                        );
                    }
                    if blocks.is_empty() {
                        blocks.push(json!({"type": "text", "text": ""}));
                    }
                    ("assistant", blocks)
                }
            };
            match turns.last_mut() {
                Some((last, existing)) if *last == role => existing.extend(blocks),
                _ => turns.push((role, blocks)),
            }
        }
        let mut body = json!({
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": turns
                .into_iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect::<Vec<_>>(),
            "stream": self.stream,
        });
        if !system.is_empty() {
            body["system"] = json!(system.join("\n\n"));
        }
        if !tools.is_empty() {
            body["tools"] = tools
                .iter()
                .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}))
                .collect();
            body["tool_choice"] = json!({"type": "auto"});
        }
        if let Some(t) = self.temperature {
            body["temperature"] = json!(t);
        }
        body
    }
}

fn finish_reason(stop_reason: &str) -> String {
    match stop_reason {
        "tool_use" => "tool_calls",
        "max_tokens" => "length",
        "end_turn" | "stop_sequence" => "stop",
        other => other,
    }
    .to_string()
}

fn usage_from(u: &Value, into: &mut Usage) {
    if let Some(n) = u.get("input_tokens").and_then(Value::as_u64) {
        // Cached prompt tokens are reported apart from the rest; all of them were read.
        let read = u
            .get("cache_read_input_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let written = u
            .get("cache_creation_input_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        into.prompt_tokens = n + read + written;
        into.cached_tokens = read;
    }
    if let Some(n) = u.get("output_tokens").and_then(Value::as_u64) {
        into.completion_tokens = n;
    }
}

/// A non-streamed Messages response as the agent's response.
pub fn parse_message(body: &[u8]) -> Result<ChatResponse, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let blocks = v
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| "no content in the response".to_string())?;
    let mut text = String::new();
    let mut tool_calls = vec![];
    for (i, b) in blocks.iter().enumerate() {
        match b["type"].as_str() {
            Some("text") => text.push_str(b["text"].as_str().unwrap_or("")),
            Some("tool_use") => tool_calls.push(ToolCall {
                id: b["id"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("toolu_{i}")),
                name: b["name"].as_str().unwrap_or("").to_string(),
                arguments: b
                    .get("input")
                    .cloned()
                    .unwrap_or_else(|| json!({}))
                    .to_string(),
            }),
            _ => {}
        }
    }
    let mut usage = Usage::default();
    usage_from(&v["usage"], &mut usage);
    Ok(ChatResponse {
        content: Some(text).filter(|t| !t.is_empty()),
        tool_calls,
        finish_reason: v["stop_reason"].as_str().map(finish_reason),
        usage,
    })
}

enum Block {
    Text,
    ToolUse {
        id: String,
        name: String,
        json: String,
    },
    Other,
}

/// Builds one response from a Messages event stream.
#[derive(Default)]
pub struct MessageStream {
    text: String,
    blocks: std::collections::BTreeMap<u64, Block>,
    finish_reason: Option<String>,
    usage: Usage,
}

impl transport::StreamSink for MessageStream {
    fn finish(self) -> ChatResponse {
        let tool_calls = self
            .blocks
            .into_iter()
            .filter_map(|(i, b)| match b {
                Block::ToolUse { id, name, json } => Some(ToolCall {
                    id: if id.is_empty() {
                        format!("toolu_{i}")
                    } else {
                        id
                    },
                    name,
                    // A call without input deltas had an empty input.
                    arguments: if json.trim().is_empty() {
                        "{}".into()
                    } else {
                        json
                    },
                }),
                _ => None,
            })
            .collect();
        ChatResponse {
            content: Some(self.text).filter(|t| !t.is_empty()),
            tool_calls,
            finish_reason: self.finish_reason,
            usage: self.usage,
        }
    }

    /// Takes one event; Ok(true) at `message_stop`. `ping` and unknown events are ignored.
    fn push(&mut self, data: &str, text_out: &mut String) -> Result<bool, String> {
        let v: Value = serde_json::from_str(data).map_err(|e| format!("bad event: {e}"))?;
        let index = v["index"].as_u64().unwrap_or(0);
        match v["type"].as_str().unwrap_or("") {
            "message_start" => usage_from(&v["message"]["usage"], &mut self.usage),
            "content_block_start" => {
                let b = &v["content_block"];
                let block = match b["type"].as_str() {
                    Some("text") => {
                        let text = b["text"].as_str().unwrap_or("");
                        self.text.push_str(text);
                        text_out.push_str(text);
                        Block::Text
                    }
                    Some("tool_use") => Block::ToolUse {
                        id: b["id"].as_str().unwrap_or("").to_string(),
                        name: b["name"].as_str().unwrap_or("").to_string(),
                        json: String::new(),
                    },
                    _ => Block::Other,
                };
                self.blocks.insert(index, block);
            }
            "content_block_delta" => {
                let d = &v["delta"];
                match (self.blocks.get_mut(&index), d["type"].as_str()) {
                    (Some(Block::Text), Some("text_delta")) => {
                        let text = d["text"].as_str().unwrap_or("");
                        self.text.push_str(text);
                        text_out.push_str(text);
                    }
                    (Some(Block::ToolUse { json, .. }), Some("input_json_delta")) => {
                        json.push_str(d["partial_json"].as_str().unwrap_or(""))
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(r) = v["delta"]["stop_reason"].as_str() {
                    self.finish_reason = Some(finish_reason(r));
                }
                usage_from(&v["usage"], &mut self.usage);
            }
            "message_stop" => return Ok(true),
            "error" => {
                return Err(v["error"]["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v["error"].to_string()));
            }
            _ => {}
        }
        Ok(false)
    }
}

#[async_trait]
impl ChatModel for AnthropicClient {
    async fn complete(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        deltas: Option<&TextDeltas>,
    ) -> Result<ChatResponse, LlmError> {
        let body = self.request_body(messages, tools);
        let mut req = self
            .http
            .post(&self.url)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&body);
        if let Some(key) = &self.api_key {
            req = req.header("x-api-key", key);
        }
        // `overloaded_error` and friends arrive inside a 200 stream.
        transport::exchange::<MessageStream>(
            &self.url,
            req,
            self.stream,
            529,
            parse_message,
            deltas,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::transport::StreamSink;

    #[test]
    fn history_becomes_alternating_turns_with_tool_blocks() {
        let c = AnthropicClient::new(
            "https://api.anthropic.com/",
            "claude",
            None,
            Duration::from_secs(1),
        );
        let history = vec![
            ChatMessage::system("be brief"),
            ChatMessage::user("list files"),
            ChatMessage::Assistant {
                content: Some("Listing.".into()),
                tool_calls: vec![ToolCall {
                    id: "t1".into(),
                    name: "bash".into(),
                    arguments: r#"{"command":"ls"}"#.into(),
                }],
            },
            ChatMessage::Tool {
                tool_call_id: "t1".into(),
                name: "bash".into(),
                content: "a.txt".into(),
            },
            ChatMessage::user("[SYSTEM: note]"),
        ];
        let tools = [ToolSpec {
            name: "bash".into(),
            description: "d".into(),
            parameters: json!({"type": "object"}),
        }];
        let body = c.request_body(&history, &tools);
        assert_eq!(c.url, "https://api.anthropic.com/v1/messages");
        assert_eq!(body["system"], "be brief");
        assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
        let msgs = body["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[1]["content"][1]["type"], "tool_use");
        assert_eq!(msgs[1]["content"][1]["input"]["command"], "ls");
        assert_eq!(msgs[2]["role"], "user");
        assert_eq!(msgs[2]["content"][0]["type"], "tool_result");
        assert_eq!(msgs[2]["content"][1]["text"], "[SYSTEM: note]");
        assert_eq!(body["tools"][0]["input_schema"]["type"], "object");
    }

    #[test]
    fn a_documented_stream_with_pings_and_empty_input_is_assembled() {
        let events = [
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"usage":{"input_tokens":20,"cache_read_input_tokens":5,"output_tokens":1}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Checking"}}"#,
            r#"{"type":"content_block_stop","index":0}"#,
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"bash","input":{}}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"command\": "}}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"\"ls\"}"}}"#,
            r#"{"type":"content_block_stop","index":1}"#,
            r#"{"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_2","name":"noargs","input":{}}}"#,
            r#"{"type":"content_block_stop","index":2}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":30}}"#,
            r#"{"type":"some_future_event"}"#,
        ];
        let mut s = MessageStream::default();
        let mut pieces = vec![];
        for e in events {
            let mut text = String::new();
            assert_eq!(s.push(e, &mut text), Ok(false), "{e}");
            pieces.push(text);
        }
        let mut text = String::new();
        assert_eq!(s.push(r#"{"type":"message_stop"}"#, &mut text), Ok(true));
        assert_eq!(
            pieces.concat(),
            "Checking",
            "the text arrives as it streams"
        );
        assert_eq!(pieces[3], "Checking");
        let r = s.finish();
        assert_eq!(r.content.as_deref(), Some("Checking"));
        assert_eq!(r.tool_calls.len(), 2);
        assert_eq!(r.tool_calls[0].arguments, r#"{"command": "ls"}"#);
        assert_eq!(r.tool_calls[1].arguments, "{}");
        assert_eq!(r.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!((r.usage.prompt_tokens, r.usage.completion_tokens), (25, 30));
        assert_eq!(r.usage.cached_tokens, 5);
    }

    #[test]
    fn a_mid_stream_error_is_reported() {
        let mut s = MessageStream::default();
        assert_eq!(
            s.push(
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
                &mut String::new()
            ),
            Err("Overloaded".into())
        );
    }

    #[test]
    fn a_plain_response_maps_stop_reasons() {
        let body = br#"{"id":"msg_1","type":"message","role":"assistant","model":"m",
          "content":[{"type":"tool_use","id":"toolu_9","name":"bash","input":{"command":"pwd"}}],
          "stop_reason":"max_tokens","usage":{"input_tokens":3,"output_tokens":4}}"#;
        let r = parse_message(body).unwrap();
        assert_eq!(r.finish_reason.as_deref(), Some("length"));
        assert_eq!(r.tool_calls[0].arguments, r#"{"command":"pwd"}"#);
        assert_eq!(r.usage.completion_tokens, 4);
        assert!(parse_message(br#"{"type":"error","error":{"type":"x","message":"y"}}"#).is_err());
    }
}
