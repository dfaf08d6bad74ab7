//! Custom resource types of the `ml-intern.io/v1alpha1` API.

pub mod approval;
pub mod session;

pub use approval::{
    AgentApproval, AgentApprovalSpec, AgentApprovalStatus, ApprovalDecision, ApprovalPhase,
};
pub use session::{
    AgentSession, AgentSessionSpec, AgentSessionStatus, BudgetSpec, ContextStatus, HuggingFaceSpec,
    LlmApi, LlmSpec, PlanEntry, SandboxSpec, SandboxStatus, SecretKeyRef, SessionPhase, TokenUsage,
    TranscriptStatus, WorkspaceSpec,
};

/// API group of every resource this operator defines.
pub const GROUP: &str = "ml-intern.io";
