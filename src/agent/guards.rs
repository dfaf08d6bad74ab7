//! Corrective checks the loop runs between model calls: repetition (doom loops), repeated
//! malformed arguments, and tool calls left without results. Each returns the `[SYSTEM: …]`
//! user message to inject, in the manner of ml-intern.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use serde_json::Value;

use super::ChatMessage;

/// How far back the repetition check looks, in messages.
pub const REPETITION_WINDOW: usize = 30;
/// Prefix of every injected repetition warning; the check starts after the latest one, so a
/// warning is not repeated until the model repeats itself again.
pub const REPETITION_MARKER: &str = "[SYSTEM: REPETITION GUARD]";
/// Prefix of the result given for a call whose arguments were not a JSON object.
pub const MALFORMED_PREFIX: &str = "ERROR: Tool call to '";
const MALFORMED_INFIX: &str = "' had malformed JSON arguments";
/// Result stub for a call that never got a result (interrupted or failed).
pub const NOT_EXECUTED: &str = "Tool was not executed (interrupted or error).";

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Signature {
    tool: String,
    arguments: u64,
    /// None while the call has no result yet.
    result: Option<u64>,
}

fn hash_text(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// Arguments compared by meaning: key order and whitespace do not count, array order does.
fn canonical_arguments(raw: &str) -> String {
    match serde_json::from_str::<Value>(raw) {
        Ok(v) => super::approval::canonical_json(&v),
        Err(_) => raw.to_string(),
    }
}

fn signatures(window: &[ChatMessage]) -> Vec<Signature> {
    let mut out = vec![];
    for (i, m) in window.iter().enumerate() {
        let ChatMessage::Assistant { tool_calls, .. } = m else {
            continue;
        };
        for call in tool_calls {
            let result = window[i + 1..]
                .iter()
                .take_while(|m| matches!(m, ChatMessage::Tool { .. }))
                .find_map(|m| match m {
                    ChatMessage::Tool {
                        tool_call_id,
                        content,
                        ..
                    } if *tool_call_id == call.id => Some(hash_text(content)),
                    _ => None,
                });
            out.push(Signature {
                tool: call.name.clone(),
                arguments: hash_text(&canonical_arguments(&call.arguments)),
                result,
            });
        }
    }
    out
}

/// A warning when the recent tool calls repeat: the same call with the same result three
/// times in a row, or a cycle of 2 to 5 calls repeated back to back. Polling whose output
/// changes is not a loop, since results are part of the comparison.
pub fn repetition_warning(history: &[ChatMessage]) -> Option<String> {
    let start = history.len().saturating_sub(REPETITION_WINDOW);
    let mut window = &history[start..];
    if let Some(last_warning) = window.iter().rposition(
        |m| matches!(m, ChatMessage::User { content } if content.starts_with(REPETITION_MARKER)),
    ) {
        window = &window[last_warning + 1..];
    }
    let sigs = signatures(window);
    if sigs.len() < 3 {
        return None;
    }
    if let Some(run) = sigs.windows(3).find(|w| w[0] == w[1] && w[1] == w[2]) {
        return Some(format!(
            "{REPETITION_MARKER} You called '{}' with the same arguments three times in a row \
             and got the same result each time. Repeating it will not change the outcome. Stop \
             and rethink: read the last result carefully, try a different command or approach, \
             or finish with what you have and say what blocked you.",
            run[0].tool
        ));
    }
    let n = sigs.len();
    for len in 2..=5 {
        if n < 2 * len {
            break;
        }
        let pattern = &sigs[n - 2 * len..n - len];
        if pattern.iter().all(|s| *s == pattern[0]) {
            continue;
        }
        let repeats = (1..=n / len)
            .take_while(|k| &sigs[n - k * len..n - (k - 1) * len] == pattern)
            .count();
        if repeats >= 2 {
            let cycle: Vec<&str> = pattern.iter().map(|s| s.tool.as_str()).collect();
            return Some(format!(
                "{REPETITION_MARKER} Your recent tool calls repeat the same cycle [{}] with the \
                 same results. Break the cycle: change the approach, inspect why the results \
                 do not change, or finish and say what blocked you.",
                cycle.join(" → ")
            ));
        }
    }
    None
}

/// The result text the loop gives for a call with malformed arguments.
pub fn malformed_result(tool: &str) -> String {
    format!(
        "{MALFORMED_PREFIX}{tool}{MALFORMED_INFIX} and was NOT executed. Send the arguments \
         as one valid JSON object; for large content write it in smaller pieces."
    )
}

/// After two malformed calls in a row to the same tool, a hint on how to get the arguments
/// through.
pub fn malformed_streak_warning(history: &[ChatMessage]) -> Option<String> {
    let mut streak_tool: Option<&str> = None;
    let mut streak = 0;
    for m in history.iter().rev() {
        match m {
            ChatMessage::Tool { name, content, .. } => {
                let malformed =
                    content.starts_with(MALFORMED_PREFIX) && content.contains(MALFORMED_INFIX);
                match (malformed, streak_tool) {
                    (true, None) => {
                        streak_tool = Some(name);
                        streak = 1;
                    }
                    (true, Some(t)) if t == name => streak += 1,
                    _ => break,
                }
            }
            ChatMessage::Assistant { .. } => continue,
            _ => break,
        }
    }
    let tool = streak_tool?;
    (streak >= 2).then(|| {
        format!(
            "[SYSTEM: Your last {streak} calls to '{tool}' had arguments that were not valid \
             JSON, so none of them ran. Keep the arguments small: write long files with bash \
             and a quoted heredoc in several steps, escape quotes and newlines inside JSON \
             strings, and split large edits.]"
        )
    })
}

/// The hint given when the model's output was cut off while it was writing tool calls.
pub fn truncation_warning(dropped: &[String]) -> String {
    format!(
        "[SYSTEM: Your previous response hit the output token limit and was cut off, so its \
         tool calls were lost and did not run: [{}]. Produce smaller outputs: split big files \
         or edits into several calls.]",
        dropped.join(", ")
    )
}

/// Most continuation nudges in one turn.
pub const MAX_CONTINUATION_NUDGES: u32 = 2;
pub const CONTINUATION_MARKER: &str = "[SYSTEM: CONTINUATION GUARD]";

/// When the model answers with text while its plan has unfinished items, the nudge that
/// sends it back to work.
pub fn continuation_warning(history: &[ChatMessage]) -> Option<String> {
    use crate::tools::plan::{PlanStatus, plan_from_history};
    let plan = plan_from_history(history)?;
    let open: Vec<String> = plan
        .iter()
        .filter(|i| i.status != PlanStatus::Completed)
        .map(|i| {
            let status = if i.status == PlanStatus::InProgress {
                "in_progress"
            } else {
                "pending"
            };
            format!("{}. {} [{status}]", i.id, i.content)
        })
        .collect();
    if open.is_empty() {
        return None;
    }
    let mut listed = open.iter().take(4).cloned().collect::<Vec<_>>().join("; ");
    if open.len() > 4 {
        listed.push_str(&format!("; ... and {} more", open.len() - 4));
    }
    Some(format!(
        "{CONTINUATION_MARKER} You answered without a tool call, but your plan has unfinished \
         items: {listed}. Keep working: make at least one tool call now. If an item is no \
         longer needed, update the plan with plan_tool; if you are blocked, mark what you \
         finished and say what blocks you."
    ))
}

/// Gives every tool call without a result a stub result right after its block, so the
/// history is valid for providers that reject unanswered calls (an interrupted turn leaves
/// such calls behind). Returns how many stubs were added.
pub fn repair_dangling_calls(history: &mut Vec<ChatMessage>) -> usize {
    answer_dangling_calls(history, NOT_EXECUTED)
}

/// What a call that was running when its turn was stopped (suspend, restart) answers.
pub const INTERRUPTED: &str = "Tool call interrupted before it finished: the session was \
suspended or its controller restarted, and its processes were killed. It may have partly \
run; check its effects before running it again.";

/// Gives every tool call without a result the result `text`; returns how many it answered.
pub fn answer_dangling_calls(history: &mut Vec<ChatMessage>, text: &str) -> usize {
    answer_dangling_calls_except(history, text, &[])
}

/// As `answer_dangling_calls`, leaving the calls in `waiting` (they wait for approval).
pub fn answer_dangling_calls_except(
    history: &mut Vec<ChatMessage>,
    text: &str,
    waiting: &[String],
) -> usize {
    let mut added = 0;
    let mut i = 0;
    while i < history.len() {
        let ChatMessage::Assistant { tool_calls, .. } = &history[i] else {
            i += 1;
            continue;
        };
        let calls: Vec<(String, String)> = tool_calls
            .iter()
            .map(|c| (c.id.clone(), c.name.clone()))
            .collect();
        let mut end = i + 1;
        while end < history.len() && matches!(history[end], ChatMessage::Tool { .. }) {
            end += 1;
        }
        let answered: Vec<String> = history[i + 1..end]
            .iter()
            .filter_map(|m| match m {
                ChatMessage::Tool { tool_call_id, .. } => Some(tool_call_id.clone()),
                _ => None,
            })
            .collect();
        for (id, name) in calls {
            if !answered.contains(&id) && !waiting.contains(&id) {
                history.insert(
                    end,
                    ChatMessage::Tool {
                        tool_call_id: id,
                        name,
                        content: text.into(),
                    },
                );
                end += 1;
                added += 1;
            }
        }
        i = end;
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::ToolCall;

    fn call(id: &str, name: &str, args: &str) -> ChatMessage {
        ChatMessage::Assistant {
            content: None,
            tool_calls: vec![ToolCall {
                id: id.into(),
                name: name.into(),
                arguments: args.into(),
            }],
        }
    }

    fn result(id: &str, name: &str, content: &str) -> ChatMessage {
        ChatMessage::Tool {
            tool_call_id: id.into(),
            name: name.into(),
            content: content.into(),
        }
    }

    fn rounds(spec: &[(&str, &str, &str)]) -> Vec<ChatMessage> {
        let mut h = vec![ChatMessage::user("task")];
        for (i, (name, args, out)) in spec.iter().enumerate() {
            let id = format!("c{i}");
            h.push(call(&id, name, args));
            h.push(result(&id, name, out));
        }
        h
    }

    #[test]
    fn three_identical_calls_with_identical_results_are_a_loop() {
        let h = rounds(&[
            ("bash", r#"{"command":"ls","timeout":5}"#, "a"),
            ("bash", r#"{"timeout": 5, "command": "ls"}"#, "a"),
            ("bash", r#"{"command":"ls","timeout":5}"#, "a"),
        ]);
        let w = repetition_warning(&h).expect("a loop");
        assert!(
            w.starts_with(REPETITION_MARKER) && w.contains("'bash'"),
            "{w}"
        );
    }

    #[test]
    fn polling_with_changing_output_is_not_a_loop() {
        let h = rounds(&[
            ("bash", r#"{"command":"tail log"}"#, "step 1"),
            ("bash", r#"{"command":"tail log"}"#, "step 2"),
            ("bash", r#"{"command":"tail log"}"#, "step 3"),
        ]);
        assert_eq!(repetition_warning(&h), None);
    }

    #[test]
    fn a_repeated_cycle_is_a_loop_and_names_its_steps() {
        let h = rounds(&[
            ("read", r#"{"path":"a"}"#, "x"),
            ("bash", r#"{"command":"make"}"#, "fail"),
            ("read", r#"{"path":"a"}"#, "x"),
            ("bash", r#"{"command":"make"}"#, "fail"),
        ]);
        let w = repetition_warning(&h).expect("a cycle");
        assert!(w.contains("[read → bash]"), "{w}");
    }

    #[test]
    fn the_warning_is_not_repeated_until_the_model_repeats_itself_again() {
        let mut h = rounds(&[
            ("bash", r#"{"command":"ls"}"#, "a"),
            ("bash", r#"{"command":"ls"}"#, "a"),
            ("bash", r#"{"command":"ls"}"#, "a"),
        ]);
        let w = repetition_warning(&h).unwrap();
        h.push(ChatMessage::user(w));
        assert_eq!(repetition_warning(&h), None);
        h.push(call("d1", "bash", r#"{"command":"ls"}"#));
        h.push(result("d1", "bash", "a"));
        assert_eq!(
            repetition_warning(&h),
            None,
            "one more call is not yet a loop"
        );
    }

    #[test]
    fn array_order_in_arguments_counts() {
        let h = rounds(&[
            ("bash", r#"{"args":[1,2]}"#, "a"),
            ("bash", r#"{"args":[2,1]}"#, "a"),
            ("bash", r#"{"args":[1,2]}"#, "a"),
        ]);
        assert_eq!(repetition_warning(&h), None);
    }

    #[test]
    fn two_malformed_calls_in_a_row_get_a_hint() {
        let mut h = vec![ChatMessage::user("task")];
        h.push(call("a", "write", "{"));
        h.push(result("a", "write", &malformed_result("write")));
        assert_eq!(malformed_streak_warning(&h), None);
        h.push(call("b", "write", "{"));
        h.push(result("b", "write", &malformed_result("write")));
        let w = malformed_streak_warning(&h).expect("a hint");
        assert!(w.contains("'write'") && w.contains("2 calls"), "{w}");
        h.push(call("c", "bash", "{}"));
        h.push(result("c", "bash", "ok"));
        assert_eq!(
            malformed_streak_warning(&h),
            None,
            "a good call ends the streak"
        );
    }

    #[test]
    fn dangling_calls_get_stub_results_inside_their_block() {
        let mut h = vec![
            ChatMessage::user("task"),
            ChatMessage::Assistant {
                content: None,
                tool_calls: vec![
                    ToolCall {
                        id: "a".into(),
                        name: "bash".into(),
                        arguments: "{}".into(),
                    },
                    ToolCall {
                        id: "b".into(),
                        name: "bash".into(),
                        arguments: "{}".into(),
                    },
                ],
            },
            result("a", "bash", "done"),
            ChatMessage::user("next"),
            call("c", "bash", "{}"),
        ];
        assert_eq!(repair_dangling_calls(&mut h), 2);
        assert_eq!(h[3], result("b", "bash", NOT_EXECUTED));
        assert_eq!(h[4], ChatMessage::user("next"));
        assert_eq!(h[6], result("c", "bash", NOT_EXECUTED));
        assert_eq!(repair_dangling_calls(&mut h), 0, "repair is idempotent");
    }
}
