//! What a turn reports while it runs, named after ml-intern's event types. The controller
//! turns them into status updates and Kubernetes Events.

use serde::Serialize;
use serde_json::Value;

use crate::llm::Usage;
use crate::tools::plan::PlanItem;

/// Serialized with ml-intern's `event_type` names, as they are stored in the transcript.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event_type", rename_all = "snake_case")]
pub enum AgentEvent {
    /// A turn started working on user input.
    Processing,
    /// One model call finished.
    LlmCall {
        /// The call summarized the conversation for compaction.
        compaction: bool,
        usage: Usage,
        finish_reason: Option<String>,
        latency_ms: u64,
    },
    /// A piece of the model's text as it streams in; `AssistantMessage` follows with all
    /// of it. Live listeners only: not kept in the transcript.
    AssistantChunk { content: String },
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
    /// Calls of the latest response wait for a human decision; the turn is parked.
    ApprovalRequired {
        tools: Vec<crate::agent::approval::PendingCall>,
    },
    /// `plan_tool` replaced the plan.
    PlanUpdate { plan: Vec<PlanItem> },
    /// A progress line: a guard's corrective message (tool `system`) or a tool's progress.
    ToolLog { tool: String, log: String },
    /// A model call failed in a way that may pass and is retried after `delay_secs`.
    LlmRetry {
        message: String,
        delay_secs: f32,
        rate_limited: bool,
    },
    /// The conversation was compacted to fit the context window.
    Compacted { old_tokens: u64, new_tokens: u64 },
    /// The turn ended with the model's answer.
    TurnComplete { final_response: String },
    /// The turn was stopped from outside (suspend, deletion) or by a restart; tool calls
    /// that were running are reported to the model as interrupted.
    Interrupted { reason: String },
    /// The turn ended without an answer.
    Error { reason: String, message: String },
}
