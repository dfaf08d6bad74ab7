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

/// Phrases providers use when the prompt does not fit the model.
const OVERFLOW_PHRASES: &[&str] = &[
    "context window exceeded",
    "maximum context length",
    "max context length",
    "prompt is too long",
    "context length exceeded",
    "context_length_exceeded",
    "too many input tokens",
    "input is too long",
    "exceeds the context window",
];

/// Phrases of rate limiting, whatever the status code.
const RATE_LIMIT_PHRASES: &[&str] = &[
    "rate limit",
    "too many requests",
    "too many tokens",
    "request limit",
    "throttl",
];

impl LlmError {
    /// Rate limits, server errors and network failures may pass; a bad key, a model id or
    /// a prompt that does not fit will not, so those fail at once (or compact).
    pub fn is_retryable(&self) -> bool {
        if self.is_context_overflow() {
            return false;
        }
        match self {
            LlmError::Unreachable { .. } => true,
            LlmError::Http { status, .. } => {
                *status == 408 || *status == 429 || *status >= 500 || self.is_rate_limit()
            }
            LlmError::InvalidResponse { .. } => false,
        }
    }

    /// The provider is limiting the request rate; retried on the longer schedule.
    pub fn is_rate_limit(&self) -> bool {
        match self {
            LlmError::Http { status: 429, .. } => true,
            LlmError::Http {
                status, message, ..
            } if *status >= 400 => {
                let m = message.to_lowercase();
                RATE_LIMIT_PHRASES.iter().any(|p| m.contains(p))
                    && !OVERFLOW_PHRASES.iter().any(|p| m.contains(p))
            }
            _ => false,
        }
    }

    /// The prompt is larger than the model's context window: compaction, not a retry.
    pub fn is_context_overflow(&self) -> bool {
        match self {
            LlmError::Http {
                status, message, ..
            } if (400..500).contains(status) => {
                let m = message.to_lowercase();
                OVERFLOW_PHRASES.iter().any(|p| m.contains(p))
            }
            _ => false,
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

    /// What the user should check, in one sentence. `from_config`: the endpoint and key
    /// came from the controller's model config rather than the session's `spec.llm`.
    pub fn hint(&self, from_config: bool) -> String {
        let (url, key) = if from_config {
            (
                "the endpoint baseUrl in the controller's model config",
                "the Secret named by the controller's model config",
            )
        } else {
            (
                "spec.llm.baseUrl",
                "the Secret named by spec.llm.apiKeySecretRef",
            )
        };
        match self {
            LlmError::Unreachable { .. } => {
                format!("check {url} and that the endpoint is reachable from the controller")
            }
            LlmError::Http { status: 401, .. } | LlmError::Http { status: 403, .. } => {
                format!("check the API key in {key}")
            }
            LlmError::Http { status: 402, .. } => {
                "the provider account has no credits or quota left: add credits or change spec.model".into()
            }
            LlmError::Http { status: 404, .. } => format!("check spec.model and {url}"),
            LlmError::Http { status: 429, .. } => {
                "the endpoint is rate limiting; retry later".into()
            }
            LlmError::Http { status, .. } if *status >= 500 => {
                "the endpoint failed on its side; retry later".into()
            }
            LlmError::Http { .. } => format!("check spec.model and {url}"),
            LlmError::InvalidResponse { .. } => {
                format!("check that {url} points at an OpenAI-compatible /v1 endpoint")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, message: &str) -> LlmError {
        LlmError::Http {
            url: "u".into(),
            status,
            message: message.into(),
        }
    }

    #[test]
    fn errors_are_classified_as_ml_intern_does() {
        let overflow = http(400, "This model's maximum context length is 128000 tokens");
        assert!(overflow.is_context_overflow() && !overflow.is_retryable());
        let kimi = http(400, "Prompt is too long: 270000 tokens");
        assert!(kimi.is_context_overflow());
        let limited = http(429, "Too many requests");
        assert!(limited.is_rate_limit() && limited.is_retryable());
        let tokens_per_minute = http(400, "too many tokens per minute, slow down");
        assert!(tokens_per_minute.is_rate_limit() && tokens_per_minute.is_retryable());
        let transient = http(503, "overloaded");
        assert!(transient.is_retryable() && !transient.is_rate_limit());
        for fatal in [
            http(401, "bad key"),
            http(402, "no credits"),
            http(404, "no model"),
        ] {
            assert!(!fatal.is_retryable(), "{fatal}");
        }
        assert!(http(402, "x").hint(false).contains("credits"));
        assert!(
            http(401, "x")
                .hint(false)
                .contains("spec.llm.apiKeySecretRef")
        );
        assert!(
            http(401, "x")
                .hint(true)
                .contains("controller's model config")
        );
    }
}
