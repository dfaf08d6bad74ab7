//! Human approval of costly or destructive tool calls (ml-intern's approval gate): which
//! calls wait, what waits, and what a decision does to the conversation.

use serde_json::Value;

use super::ChatMessage;

/// What the gate says of a call.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// It runs now; a cost estimate counts against later calls of the same batch.
    Run { estimated_cost_usd: Option<f64> },
    /// It waits for a human; `summary` is one line for the approver.
    Ask {
        summary: String,
        estimated_cost_usd: Option<f64>,
    },
}

/// Decides which calls need a human first, and knows the decisions already made.
pub trait ApprovalGate: Send + Sync {
    /// Whether `tool` with `arguments` may run now, the session having spent (or committed)
    /// `spent_usd` so far.
    fn review(&self, tool: &str, arguments: &Value, spent_usd: f64) -> Verdict;
    /// The decision on a call that waited, once there is one.
    fn decision(&self, tool_call_id: &str) -> Option<Decision>;
}

/// Every call runs.
pub struct NoGate;

impl ApprovalGate for NoGate {
    fn review(&self, _: &str, _: &Value, _: f64) -> Verdict {
        Verdict::Run {
            estimated_cost_usd: None,
        }
    }
    fn decision(&self, _: &str) -> Option<Decision> {
        None
    }
}

/// A call waiting for a human.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PendingCall {
    pub tool_call_id: String,
    pub tool: String,
    pub arguments: Value,
    pub summary: String,
    /// What running it would cost at most, when known.
    pub estimated_cost_usd: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub approved: bool,
    /// Who decided, for the record and the model.
    pub by: Option<String>,
    /// Told to the model, on a rejection as ml-intern does (and on an approval too).
    pub feedback: Option<String>,
    /// The approver's version of the arguments; the call runs with these.
    pub edited_arguments: Option<Value>,
}

/// The hex sha256 of the canonical JSON of `arguments` (keys sorted, no spaces), which an
/// approval must quote so it approves exactly these arguments.
pub fn arguments_digest(arguments: &Value) -> String {
    crate::store::transcript::digest(&canonical_json(arguments))
}

/// JSON with object keys sorted and no whitespace: equal for equal meaning.
pub fn canonical_json(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let body: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical_json(&map[k])))
                .collect();
            format!("{{{}}}", body.join(","))
        }
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(canonical_json)
                .collect::<Vec<_>>()
                .join(",")
        ),
        other => other.to_string(),
    }
}

/// What the model is told for a rejected call.
pub fn rejection_result(decision: &Decision) -> String {
    let by = decision
        .by
        .as_deref()
        .map(|b| format!(" by {b}"))
        .unwrap_or_default();
    match decision.feedback.as_deref().map(str::trim) {
        Some(f) if !f.is_empty() => format!(
            "Tool call rejected{by}; it did not run. User feedback: {}",
            f.chars()
                .filter(|c| !c.is_control() || *c == '\n')
                .collect::<String>()
        ),
        _ => format!("Tool call rejected{by}; it did not run."),
    }
}

/// The note before the result of a call that ran with the approver's arguments.
pub const EDITED_NOTE: &str = "[Note: the approver edited the arguments before the call ran; the result is for the edited call.]";

/// The calls of the latest assistant message that have no result yet: those waiting.
pub fn waiting_calls(history: &[ChatMessage]) -> Vec<(String, String, String)> {
    let Some(at) = history
        .iter()
        .rposition(|m| matches!(m, ChatMessage::Assistant { .. }))
    else {
        return vec![];
    };
    let ChatMessage::Assistant { tool_calls, .. } = &history[at] else {
        return vec![];
    };
    let answered: Vec<&str> = history[at + 1..]
        .iter()
        .filter_map(|m| match m {
            ChatMessage::Tool { tool_call_id, .. } => Some(tool_call_id.as_str()),
            _ => None,
        })
        .collect();
    tool_calls
        .iter()
        .filter(|c| !answered.contains(&c.id.as_str()))
        .map(|c| (c.id.clone(), c.name.clone(), c.arguments.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_digest_ignores_key_order_and_sees_every_value() {
        let a = arguments_digest(&json!({"b": 1, "a": {"y": [1, 2], "x": "é"}}));
        let b = arguments_digest(&json!({"a": {"x": "é", "y": [1, 2]}, "b": 1}));
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        assert_ne!(
            a,
            arguments_digest(&json!({"b": 2, "a": {"y": [1, 2], "x": "é"}}))
        );
        assert_eq!(
            canonical_json(&json!({"b": 1, "a": "x"})),
            r#"{"a":"x","b":1}"#
        );
    }

    #[test]
    fn rejections_carry_the_feedback_without_control_characters() {
        let d = Decision {
            approved: false,
            by: Some("alice".into()),
            feedback: Some("use a smaller GPU\u{7}".into()),
            edited_arguments: None,
        };
        assert_eq!(
            rejection_result(&d),
            "Tool call rejected by alice; it did not run. User feedback: use a smaller GPU"
        );
    }
}
