//! What a turn reports while it runs, named after ml-intern's event types. The controller
//! turns them into status updates and Kubernetes Events.

use serde_json::Value;

use crate::llm::Usage;

#[derive(Clone, Debug, PartialEq)]
pub enum AgentEvent {
    /// A turn started working on user input.
    Processing,
    /// One model call finished.
    LlmCall {
        usage: Usage,
        finish_reason: Option<String>,
        latency_ms: u64,
    },
    /// The model's text in a response (with or without tool calls).
    AssistantMessage { content: String },
    /// A tool is about to run.
    ToolCall {
        tool_call_id: String,
        tool: String,
        arguments: Value,
    },
    /// A tool finished; `output` is what the model will see.
    ToolOutput {
        tool_call_id: String,
        tool: String,
        output: String,
        success: bool,
    },
    /// A progress line: a guard's corrective message (tool `system`) or a tool's progress.
    ToolLog { tool: String, log: String },
    /// A model call failed in a way that may pass and is retried after `delay_secs`.
    LlmRetry {
        message: String,
        delay_secs: f32,
        rate_limited: bool,
    },
    /// The turn ended with the model's answer.
    TurnComplete { final_response: String },
}
