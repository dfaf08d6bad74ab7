//! Client for OpenAI-compatible `/chat/completions` (OpenAI, the Hugging Face router, vLLM,
//! TGI, Ollama, llama.cpp). Response types are lenient: servers differ in which fields they
//! fill, and a missing optional field must never fail a session.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::transport;
use super::{ChatModel, ChatResponse, LlmError, TextDeltas, ToolSpec, Usage};
use crate::agent::{ChatMessage, ToolCall};
use crate::http::http_client;

#[derive(Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    url: String,
    api_key: Option<String>,
    model: String,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    stream: bool,
}

impl std::fmt::Debug for OpenAiClient {
    // The API key stays out of every debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("url", &self.url)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl OpenAiClient {
    pub fn new(
        base_url: &str,
        model: impl Into<String>,
        api_key: Option<String>,
        timeout: Duration,
    ) -> Self {
        OpenAiClient {
            http: http_client(timeout),
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            api_key,
            model: model.into(),
            max_tokens: None,
            temperature: None,
            stream: false,
        }
    }

    /// Streams responses (SSE) instead of waiting for the whole body.
    pub fn streaming(mut self, stream: bool) -> Self {
        self.stream = stream;
        self
    }

    pub fn with_sampling(mut self, max_tokens: Option<u32>, temperature: Option<f64>) -> Self {
        self.max_tokens = max_tokens;
        self.temperature = temperature;
        self
    }

    pub fn request_body(&self, messages: &[ChatMessage], tools: &[ToolSpec]) -> Value {
        let mut body = json!({
            "model": self.model,
            "messages": messages.iter().map(wire_message).collect::<Vec<_>>(),
            "stream": self.stream,
        });
        if self.stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        // Tools are left out entirely when there are none: some servers still show an
        // empty tool list to the model and it then invents calls.
        if !tools.is_empty() {
            body["tools"] = tools
                .iter()
                .map(|t| {
                    json!({"type": "function", "function": {
                        "name": t.name, "description": t.description, "parameters": t.parameters}})
                })
                .collect();
            body["tool_choice"] = json!("auto");
        }
        if let Some(n) = self.max_tokens {
            body["max_tokens"] = json!(n);
        }
        if let Some(t) = self.temperature {
            body["temperature"] = json!(t);
        }
        body
    }
}

fn wire_message(m: &ChatMessage) -> Value {
    match m {
        ChatMessage::System { content } => json!({"role": "system", "content": content}),
        ChatMessage::User { content } => json!({"role": "user", "content": content}),
        ChatMessage::Assistant {
            content,
            tool_calls,
        } => {
            let mut v = json!({"role": "assistant", "content": content});
            if !tool_calls.is_empty() {
                v["tool_calls"] = tool_calls
                    .iter()
                    .map(|c| {
                        json!({"id": c.id, "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments}})
                    })
                    .collect();
            }
            v
        }
        ChatMessage::Tool {
            tool_call_id,
            content,
            ..
        } => json!({"role": "tool", "tool_call_id": tool_call_id, "content": content}),
    }
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    message: WireMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
}

#[derive(Deserialize)]
struct WireToolCall {
    #[serde(default)]
    id: Option<String>,
    function: WireFunction,
}

#[derive(Deserialize)]
struct WireFunction {
    #[serde(default)]
    name: String,
    /// A JSON string per the spec; some servers send the object itself.
    #[serde(default)]
    arguments: Value,
}

/// `usage` of a response or of the last stream chunk; cached prompt tokens come in
/// `prompt_tokens_details.cached_tokens`.
fn usage_from(u: &Value) -> Usage {
    Usage {
        prompt_tokens: u["prompt_tokens"].as_u64().unwrap_or(0),
        completion_tokens: u["completion_tokens"].as_u64().unwrap_or(0),
        cached_tokens: u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
    }
}

/// Turns a chat-completions response body into the agent's response type.
pub fn parse_response(body: &[u8]) -> Result<ChatResponse, String> {
    let wire: WireResponse = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let choice = wire
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| "no choices in the response".to_string())?;
    let tool_calls = choice
        .message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, c)| ToolCall {
            // Servers that omit ids still need one per call to pair results with calls.
            id: c
                .id
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("call_{i}")),
            name: c.function.name,
            arguments: match c.function.arguments {
                Value::String(s) => s,
                Value::Null => "{}".to_string(),
                other => other.to_string(),
            },
        })
        .collect();
    Ok(ChatResponse {
        content: choice.message.content.filter(|c| !c.is_empty()),
        tool_calls,
        finish_reason: choice.finish_reason,
        usage: wire.usage.as_ref().map(usage_from).unwrap_or_default(),
    })
}

/// Builds one response from the chunks of a streamed chat completion: text deltas
/// concatenated, tool calls assembled by their `index`, usage from the final chunk.
#[derive(Default)]
pub struct StreamAssembler {
    content: String,
    calls: std::collections::BTreeMap<u64, (String, String, String)>,
    finish_reason: Option<String>,
    usage: Usage,
}

impl transport::StreamSink for StreamAssembler {
    fn finish(self) -> ChatResponse {
        ChatResponse {
            content: Some(self.content).filter(|c| !c.is_empty()),
            tool_calls: self
                .calls
                .into_iter()
                .map(|(index, (id, name, arguments))| ToolCall {
                    id: if id.is_empty() {
                        format!("call_{index}")
                    } else {
                        id
                    },
                    name,
                    arguments,
                })
                .collect(),
            finish_reason: self.finish_reason,
            usage: self.usage,
        }
    }

    /// Takes one `data:` payload; Ok(true) once the stream says it is done.
    fn push(&mut self, data: &str, text_out: &mut String) -> Result<bool, String> {
        if data.trim() == "[DONE]" {
            return Ok(true);
        }
        let chunk: Value = serde_json::from_str(data).map_err(|e| format!("bad chunk: {e}"))?;
        if let Some(err) = chunk.get("error") {
            return Err(err
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| err.to_string()));
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = usage_from(u);
        }
        let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
            return Ok(false);
        };
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(reason.to_string());
        }
        let delta = &choice["delta"];
        if let Some(text) = delta.get("content").and_then(Value::as_str) {
            self.content.push_str(text);
            text_out.push_str(text);
        }
        for (position, call) in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let index = call["index"].as_u64().unwrap_or(position as u64);
            let entry = self.calls.entry(index).or_default();
            if let Some(id) = call
                .get("id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            {
                entry.0 = id.to_string();
            }
            let function = &call["function"];
            if let Some(name) = function.get("name").and_then(Value::as_str) {
                entry.1.push_str(name);
            }
            if let Some(args) = function.get("arguments").and_then(Value::as_str) {
                entry.2.push_str(args);
            }
        }
        Ok(false)
    }
}

#[async_trait]
impl ChatModel for OpenAiClient {
    async fn complete(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        deltas: Option<&TextDeltas>,
    ) -> Result<ChatResponse, LlmError> {
        let body = self.request_body(messages, tools);
        let mut req = self.http.post(&self.url).json(&body);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        transport::exchange::<StreamAssembler>(
            &self.url,
            req,
            self.stream,
            500,
            parse_response,
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
    fn parses_llama_cpp_tool_call_response() {
        let body = br#"{"choices":[{"finish_reason":"tool_calls","index":0,"message":{"role":"assistant","content":"",
          "tool_calls":[{"type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"},
                         "id":"2LKJrc1sZXo4RurZjDoukNg9UQUydFxP"}]}}],
          "usage":{"completion_tokens":17,"prompt_tokens":124,"total_tokens":141},"timings":{}}"#;
        let r = parse_response(body).expect("parses");
        assert_eq!(r.content, None, "empty content counts as none");
        assert_eq!(r.tool_calls.len(), 1);
        assert_eq!(r.tool_calls[0].name, "get_weather");
        assert_eq!(r.tool_calls[0].arguments, r#"{"city": "Paris"}"#);
        assert_eq!(r.tool_calls[0].id, "2LKJrc1sZXo4RurZjDoukNg9UQUydFxP");
        assert_eq!(r.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(r.usage.prompt_tokens, 124);
        assert_eq!(r.usage.completion_tokens, 17);
        assert_eq!(r.usage.cached_tokens, 0);
    }

    #[test]
    fn accepts_object_arguments_missing_ids_and_missing_usage() {
        let body = br#"{"choices":[{"message":{"content":null,"tool_calls":[
            {"function":{"name":"bash","arguments":{"command":"ls"}}}]}}]}"#;
        let r = parse_response(body).expect("parses");
        assert_eq!(r.tool_calls[0].id, "call_0");
        assert_eq!(r.tool_calls[0].arguments, r#"{"command":"ls"}"#);
        assert_eq!(r.usage, Usage::default());
    }

    #[test]
    fn streamed_tool_calls_are_assembled_by_index() {
        // The shape llama.cpp sends, arguments split across deltas, two calls interleaved.
        let chunks = [
            r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],"object":"chat.completion.chunk"}"#,
            r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,"id":"9hKw","type":"function","function":{"name":"get_weather","arguments":"{"}}]}}]}"#,
            r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"city\": "}}]}}]}"#,
            r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":1,"id":"x2","function":{"name":"bash","arguments":"{}"}}]}}]}"#,
            r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}}]}}]}"#,
            r#"{"choices":[{"finish_reason":"tool_calls","index":0,"delta":{}}]}"#,
            r#"{"choices":[],"usage":{"completion_tokens":17,"prompt_tokens":124,"total_tokens":141,"prompt_tokens_details":{"cached_tokens":100}}}"#,
        ];
        let mut a = StreamAssembler::default();
        let mut text = String::new();
        for c in chunks {
            assert_eq!(a.push(c, &mut text), Ok(false));
        }
        assert_eq!(a.push("[DONE]", &mut text), Ok(true));
        assert_eq!(text, "", "tool calls are not answer text");
        let r = a.finish();
        assert_eq!(r.content, None);
        assert_eq!(r.tool_calls.len(), 2);
        assert_eq!(r.tool_calls[0].arguments, r#"{"city": "Paris"}"#);
        assert_eq!(r.tool_calls[0].id, "9hKw");
        assert_eq!(r.tool_calls[1].name, "bash");
        assert_eq!(r.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(r.usage.prompt_tokens, 124);
        assert_eq!(r.usage.cached_tokens, 100);
    }

    #[test]
    fn streamed_text_is_handed_out_piece_by_piece() {
        let mut a = StreamAssembler::default();
        let mut pieces = vec![];
        for c in [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"lo ünï"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        ] {
            let mut text = String::new();
            assert_eq!(a.push(c, &mut text), Ok(false));
            pieces.push(text);
        }
        assert_eq!(pieces, ["", "Hel", "lo ünï", ""]);
        assert_eq!(a.finish().content.as_deref(), Some("Hello ünï"));
    }

    #[test]
    fn an_error_inside_a_stream_is_reported() {
        let mut a = StreamAssembler::default();
        assert_eq!(
            a.push(
                r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
                &mut String::new()
            ),
            Err("overloaded".to_string())
        );
    }

    #[test]
    fn a_body_without_choices_is_an_error() {
        assert!(parse_response(br#"{"object":"chat.completion"}"#).is_err());
        assert!(parse_response(b"<html>oops</html>").is_err());
    }

    #[test]
    fn request_carries_tools_and_tool_history_in_wire_shape() {
        let c = OpenAiClient::new("http://x/v1/", "m", None, Duration::from_secs(1))
            .with_sampling(Some(64), Some(0.0));
        let history = vec![
            ChatMessage::user("hi"),
            ChatMessage::Assistant {
                content: None,
                tool_calls: vec![ToolCall {
                    id: "c1".into(),
                    name: "bash".into(),
                    arguments: r#"{"command":"ls"}"#.into(),
                }],
            },
            ChatMessage::Tool {
                tool_call_id: "c1".into(),
                name: "bash".into(),
                content: "a.txt".into(),
            },
        ];
        let tools = [ToolSpec {
            name: "bash".into(),
            description: "d".into(),
            parameters: json!({"type": "object"}),
        }];
        let body = c.request_body(&history, &tools);
        assert_eq!(c.url, "http://x/v1/chat/completions");
        assert_eq!(body["model"], "m");
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(body["tools"][0]["function"]["name"], "bash");
        assert_eq!(
            body["messages"][1]["tool_calls"][0]["function"]["arguments"],
            r#"{"command":"ls"}"#
        );
        assert_eq!(body["messages"][2]["role"], "tool");
        assert_eq!(body["messages"][2]["tool_call_id"], "c1");
        let no_tools = c.request_body(&history, &[]);
        assert!(no_tools.get("tools").is_none() && no_tools.get("tool_choice").is_none());
    }
}
