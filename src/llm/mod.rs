//! Clients for the model endpoints the agent talks to, behind one trait.

pub mod error;
pub mod model_ref;
pub mod openai;

use async_trait::async_trait;
use serde_json::Value;

pub use error::LlmError;
pub use model_ref::{ResolvedModel, resolve_model};
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

#[async_trait]
pub trait ChatModel: Send + Sync {
    async fn complete(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
    ) -> Result<ChatResponse, LlmError>;
}
