//! `plan_tool`: the agent's todo list. Each call replaces the whole plan. The plan is read
//! back from the conversation (the latest successful call), so it survives a resume without
//! any state of its own.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Tool, ToolFailure, ToolOutput};
use crate::agent::ChatMessage;
use crate::llm::ToolSpec;

pub const PLAN_TOOL: &str = "plan_tool";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanStatus {
    Pending,
    InProgress,
    Completed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanItem {
    pub id: String,
    pub content: String,
    pub status: PlanStatus,
}

const RETRY: &str = "Re call the tool with correct format (mandatory).";

/// The plan in `arguments`, or what is wrong with them.
pub fn parse_plan(arguments: &Value) -> Result<Vec<PlanItem>, String> {
    let Some(todos) = arguments.get("todos") else {
        return Err(format!("ERROR: 'todos' is required. {RETRY}"));
    };
    let Some(items) = todos.as_array() else {
        return Err(format!("ERROR: 'todos' must be an array. {RETRY}"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            serde_json::from_value::<PlanItem>(item.clone()).map_err(|e| {
                format!(
                    "ERROR: todos[{i}] is invalid ({e}); each item needs 'id' (string), \
                     'content' (string) and 'status' (pending, in_progress or completed). {RETRY}"
                )
            })
        })
        .collect()
}

fn render(plan: &[PlanItem]) -> String {
    let mut out = String::from("Plan updated:\n\n");
    for item in plan {
        let mark = match item.status {
            PlanStatus::Completed => "[x]",
            PlanStatus::InProgress => "[~]",
            PlanStatus::Pending => "[ ]",
        };
        out.push_str(&format!("{mark} {}. {}\n", item.id, item.content));
    }
    let done = plan
        .iter()
        .filter(|i| i.status == PlanStatus::Completed)
        .count();
    out.push_str(&format!("\n{done}/{} done", plan.len()));
    out
}

/// The plan as the latest successful `plan_tool` call left it.
pub fn plan_from_history(history: &[ChatMessage]) -> Option<Vec<PlanItem>> {
    let succeeded = |id: &str| {
        history.iter().any(|m| {
            matches!(m, ChatMessage::Tool { tool_call_id, content, .. }
                if tool_call_id == id && content.starts_with("Plan updated:"))
        })
    };
    history.iter().rev().find_map(|m| match m {
        ChatMessage::Assistant { tool_calls, .. } => tool_calls
            .iter()
            .rev()
            .filter(|c| c.name == PLAN_TOOL && succeeded(&c.id))
            .find_map(|c| {
                serde_json::from_str::<Value>(&c.arguments)
                    .ok()
                    .and_then(|v| parse_plan(&v).ok())
            }),
        _ => None,
    })
}

pub struct PlanTool;

#[async_trait]
impl Tool for PlanTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: PLAN_TOOL.into(),
            description: "Keep a todo list for tasks of three or more steps. Each call replaces \
                the whole list. Keep exactly one item in_progress while you work and mark items \
                completed as soon as they are done; the user sees the list in the session's \
                status."
                .into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "todos": {
                        "type": "array",
                        "description": "The whole plan, in order.",
                        "items": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "content": {"type": "string"},
                                "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]}
                            },
                            "required": ["id", "content", "status"]
                        }
                    }
                },
                "required": ["todos"]
            }),
        }
    }

    async fn call(&self, arguments: Value) -> Result<ToolOutput, ToolFailure> {
        Ok(match parse_plan(&arguments) {
            Ok(plan) => ToolOutput::ok(render(&plan)),
            Err(e) => ToolOutput::error(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::ToolCall;

    #[tokio::test]
    async fn a_plan_is_rendered_and_bad_ones_are_sent_back() {
        let out = PlanTool
            .call(json!({"todos": [
                {"id": "1", "content": "load data", "status": "completed"},
                {"id": "2", "content": "train", "status": "in_progress"},
                {"id": "3", "content": "evaluate", "status": "pending"}
            ]}))
            .await
            .unwrap();
        assert!(out.success);
        assert_eq!(
            out.content,
            "Plan updated:\n\n[x] 1. load data\n[~] 2. train\n[ ] 3. evaluate\n\n1/3 done"
        );
        for bad in [
            json!({}),
            json!({"todos": "x"}),
            json!({"todos": [{"id": "1"}]}),
            json!({"todos": [{"id": "1", "content": "a", "status": "done"}]}),
        ] {
            let out = PlanTool.call(bad.clone()).await.unwrap();
            assert!(
                !out.success && out.content.ends_with(RETRY),
                "{bad}: {}",
                out.content
            );
        }
    }

    #[test]
    fn the_plan_is_the_latest_successful_call() {
        let call = |id: &str, status: &str| ChatMessage::Assistant {
            content: None,
            tool_calls: vec![ToolCall {
                id: id.into(),
                name: PLAN_TOOL.into(),
                arguments: json!({"todos": [{"id": "1", "content": "x", "status": status}]})
                    .to_string(),
            }],
        };
        let result = |id: &str, content: &str| ChatMessage::Tool {
            tool_call_id: id.into(),
            name: PLAN_TOOL.into(),
            content: content.into(),
        };
        let history = vec![
            call("a", "pending"),
            result("a", "Plan updated:\n..."),
            call("b", "completed"),
            result("b", "Tool was not executed (interrupted or error)."),
        ];
        let plan = plan_from_history(&history).unwrap();
        assert_eq!(plan[0].status, PlanStatus::Pending);
        assert_eq!(plan_from_history(&history[..1]), None);
    }
}
