//! Clients for the model endpoints the agent talks to, behind one trait.

pub mod anthropic;
pub mod catalog;
pub mod error;
pub mod model_ref;
pub mod openai;
pub mod sse;
pub mod transport;

use async_trait::async_trait;
use serde_json::Value;

pub use anthropic::AnthropicClient;
pub use error::LlmError;
pub use model_ref::{ResolvedModel, WireApi, resolve_model};
pub use openai::OpenAiClient;

use crate::agent::{ChatMessage, ToolCall};

/// A tool as the model sees it: a name, what it does, and a JSON Schema of its arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub parameters: Value,
}

/// Token counts of one model call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// All input tokens, cached ones included.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Input tokens read from the provider's prompt cache (billed at a lower price).
    pub cached_tokens: u64,
}

/// One model response.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatResponse {
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: Option<String>,
    pub usage: Usage,
}

/// Everything that picks and configures a model client.
#[derive(Clone, Debug)]
pub struct ModelSettings<'a> {
    pub api: WireApi,
    pub model: &'a str,
    /// The API's default endpoint when None.
    pub base_url: Option<&'a str>,
    pub api_key: Option<String>,
    pub timeout: std::time::Duration,
    pub stream: bool,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
}

/// A client for the settings' protocol and endpoint.
pub fn client_for(s: ModelSettings<'_>) -> Box<dyn ChatModel> {
    let resolved = resolve_model(s.model, s.base_url, s.api);
    match s.api {
        WireApi::OpenAiChat => Box::new(
            OpenAiClient::new(&resolved.base_url, resolved.model_id, s.api_key, s.timeout)
                .with_sampling(s.max_tokens, s.temperature)
                .streaming(s.stream),
        ),
        WireApi::AnthropicMessages => Box::new(
            AnthropicClient::new(&resolved.base_url, resolved.model_id, s.api_key, s.timeout)
                .with_sampling(s.max_tokens, s.temperature)
                .streaming(s.stream),
        ),
    }
}

/// Where a streaming call sends the answer's text as it arrives, piece by piece.
pub type TextDeltas = tokio::sync::mpsc::Sender<String>;

#[async_trait]
pub trait ChatModel: Send + Sync {
    /// One model call. With `deltas`, a streaming client sends each piece of the answer's
    /// text there as it arrives; the response still holds the whole text.
    async fn complete(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        deltas: Option<&TextDeltas>,
    ) -> Result<ChatResponse, LlmError>;
}
