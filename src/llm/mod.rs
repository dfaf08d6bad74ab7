//! Clients for the model endpoints the agent talks to, behind one trait.

pub mod anthropic;
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One model response.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatResponse {
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: Option<String>,
    pub usage: Usage,
}

/// A client for `api` at `base_url` (or the API's default endpoint), sending `model`.
#[allow(clippy::too_many_arguments)]
pub fn client_for(
    api: WireApi,
    model: &str,
    base_url: Option<&str>,
    api_key: Option<String>,
    timeout: std::time::Duration,
    stream: bool,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
) -> Box<dyn ChatModel> {
    let resolved = resolve_model(model, base_url, api);
    match api {
        WireApi::OpenAiChat => Box::new(
            OpenAiClient::new(&resolved.base_url, resolved.model_id, api_key, timeout)
                .with_sampling(max_tokens, temperature)
                .streaming(stream),
        ),
        WireApi::AnthropicMessages => Box::new(
            AnthropicClient::new(&resolved.base_url, resolved.model_id, api_key, timeout)
                .with_sampling(max_tokens, temperature)
                .streaming(stream),
        ),
    }
}

#[async_trait]
pub trait ChatModel: Send + Sync {
    async fn complete(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
    ) -> Result<ChatResponse, LlmError>;
}
