//! Shared pieces of the end-to-end tests: a namespace and a controller process per test on
//! the real local cluster, and a scripted OpenAI-compatible model server.
#![allow(dead_code, unused_imports)] // each test binary uses a different subset

pub mod cluster;
pub mod hf_hub;
pub mod loopback;
pub mod scripted_llm;

pub use cluster::{E2e, E2eOptions, PYTHON_IMAGE};
pub use scripted_llm::{ScriptedLlm, Step};

/// The token the local HF hub accepts (shaped like a real one, so redaction applies).
pub const HF_TEST_TOKEN: &str = "hf_LocalHubTestToken0123456789abcdefXYZ";

/// The tool results sent in a chat-completions request, in order.
pub fn tool_results(request: &serde_json::Value) -> Vec<String> {
    request["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap_or("").to_string())
        .collect()
}
