//! Tools the model can call: the trait every tool implements and the router that
//! dispatches calls by name.

pub mod bash;
pub mod edit_match;
pub mod files;
pub mod job_backend;
pub mod jobs;
pub mod plan;
pub mod sandbox_create;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use thiserror::Error;

pub use bash::{BashTool, CommandOutput, CommandRunner};
pub use files::{FileError, FileSystem, Files};
pub use plan::PlanTool;

use crate::llm::ToolSpec;

/// What the model sees of a tool call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolOutput {
    pub content: String,
    pub success: bool,
}

impl ToolOutput {
    pub fn ok(content: impl Into<String>) -> Self {
        ToolOutput {
            content: content.into(),
            success: true,
        }
    }

    pub fn error(content: impl Into<String>) -> Self {
        ToolOutput {
            content: content.into(),
            success: false,
        }
    }
}

/// The place a tool runs in is gone or cannot start (say, the sandbox pod cannot be
/// scheduled). Unlike a failed command, which the model sees and can react to, this ends
/// the session: the model cannot fix it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{message}")]
pub struct ToolFailure {
    /// PascalCase reason for conditions and Events, e.g. `SandboxFailed`.
    pub reason: String,
    /// What happened and what to fix.
    pub message: String,
}

#[async_trait]
pub trait Tool: Send + Sync {
    fn spec(&self) -> ToolSpec;
    async fn call(&self, arguments: Value) -> Result<ToolOutput, ToolFailure>;
}

/// The tools of one session, by name.
#[derive(Clone, Default)]
pub struct ToolRouter {
    tools: BTreeMap<String, Arc<dyn Tool>>,
}

impl ToolRouter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&mut self, tool: Arc<dyn Tool>) {
        self.tools.insert(tool.spec().name, tool);
    }

    /// Keeps only the tools named in `allowed`.
    pub fn retain(&mut self, allowed: &[String]) {
        self.tools.retain(|name, _| allowed.contains(name));
    }

    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools.values().map(|t| t.spec()).collect()
    }

    /// Runs `name` with `arguments`; an unknown tool is answered, not executed.
    pub async fn call(&self, name: &str, arguments: Value) -> Result<ToolOutput, ToolFailure> {
        match self.tools.get(name) {
            Some(tool) => tool.call(arguments).await,
            None => Ok(ToolOutput::error(format!(
                "ERROR: unknown tool '{name}'. Available tools: {}",
                self.tools.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}
