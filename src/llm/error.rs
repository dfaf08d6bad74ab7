//! Failures of a model call, classified so the loop knows whether to retry and the user
//! learns what to fix.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum LlmError {
    /// No HTTP answer at all: connection refused, DNS failure, TLS failure or timeout.
    #[error("cannot reach the model endpoint {url}: {detail}")]
    Unreachable { url: String, detail: String },

    /// The endpoint answered with a non-success HTTP status.
    #[error("the model endpoint {url} answered HTTP {status}: {message}")]
    Http {
        url: String,
        status: u16,
        message: String,
    },

    /// The endpoint answered 2xx with a body that is not a chat completion.
    #[error("the model endpoint {url} sent a response that is not a chat completion: {detail}")]
    InvalidResponse { url: String, detail: String },
}

impl LlmError {
    /// Rate limits, server errors and network failures may pass; a bad key or model id
    /// will not, so those fail at once.
    pub fn is_retryable(&self) -> bool {
        match self {
            LlmError::Unreachable { .. } => true,
            LlmError::Http { status, .. } => *status == 408 || *status == 429 || *status >= 500,
            LlmError::InvalidResponse { .. } => false,
        }
    }

    /// A short PascalCase reason for conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            LlmError::Unreachable { .. } => "LLMUnreachable",
            LlmError::Http { .. } => "LLMRequestFailed",
            LlmError::InvalidResponse { .. } => "LLMInvalidResponse",
        }
    }

    /// What the user should check, in one sentence.
    pub fn hint(&self) -> &'static str {
        match self {
            LlmError::Unreachable { .. } => {
                "check spec.llm.baseUrl and that the endpoint is reachable from the controller"
            }
            LlmError::Http { status: 401, .. } | LlmError::Http { status: 403, .. } => {
                "check the API key in the Secret named by spec.llm.apiKeySecretRef"
            }
            LlmError::Http { status: 404, .. } => "check spec.model and spec.llm.baseUrl",
            LlmError::Http { status: 429, .. } => "the endpoint is rate limiting; retry later",
            LlmError::Http { status, .. } if *status >= 500 => {
                "the endpoint failed on its side; retry later"
            }
            LlmError::Http { .. } => "check spec.model and spec.llm",
            LlmError::InvalidResponse { .. } => {
                "check that spec.llm.baseUrl points at an OpenAI-compatible /v1 endpoint"
            }
        }
    }
}
