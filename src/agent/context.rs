//! How full the model's context is, and compaction: when the conversation nears the
//! model's window, its middle is replaced by a summary the model writes, keeping the system
//! prompt, the task and the recent tail.

use super::ChatMessage;
use crate::llm::Usage;
use crate::text::head_tail;

/// Compaction starts above this share of the context window.
pub const COMPACT_AT: f64 = 0.9;
/// Messages at the end kept as they are (more when the cut would split a tool-call block).
pub const KEEP_TAIL: usize = 5;
/// Kept messages longer than this (about 50,000 tokens) are cut to head and tail.
const MAX_KEPT_CHARS: usize = 200_000;

pub const SUMMARY_REQUEST: &str = "[SYSTEM: The conversation is about to outgrow the context \
window. Write a summary of everything above that a colleague taking over would need: the \
task, what you did and found, the decisions you made and why, problems you solved and how, \
files and artifacts you created (with paths), the current state and the next steps. Be \
specific and complete; do not call tools.]";

pub const SUMMARY_PREFIX: &str = "[SYSTEM: Summary of the earlier part of this conversation, \
written by you when the context was compacted]\n\n";

/// A rough token count: about four characters a token, plus a little per message.
pub fn estimate_tokens(messages: &[ChatMessage]) -> u64 {
    messages
        .iter()
        .map(|m| {
            let chars = match m {
                ChatMessage::System { content } | ChatMessage::User { content } => content.len(),
                ChatMessage::Tool { content, name, .. } => content.len() + name.len(),
                ChatMessage::Assistant {
                    content,
                    tool_calls,
                } => {
                    content.as_ref().map_or(0, String::len)
                        + tool_calls
                            .iter()
                            .map(|c| c.name.len() + c.arguments.len() + c.id.len())
                            .sum::<usize>()
                }
            };
            (chars as u64).div_ceil(4) + 4
        })
        .sum()
}

/// Tokens in the context: what the provider counted at its last response, plus an estimate
/// for what was appended since (tool results, guard notes).
#[derive(Clone, Copy, Debug, Default)]
pub struct ContextMeter {
    counted_tokens: u64,
    /// History length the count covers.
    counted_len: usize,
}

impl ContextMeter {
    /// The provider counted `usage.prompt_tokens` for the first `history_len` messages.
    pub fn record(&mut self, usage: &Usage, history_len: usize) {
        if usage.prompt_tokens > 0 {
            self.counted_tokens = usage.prompt_tokens;
            self.counted_len = history_len;
        }
    }

    /// Forget the provider's count (after the history was rewritten).
    pub fn reset(&mut self) {
        *self = ContextMeter::default();
    }

    pub fn tokens(&self, history: &[ChatMessage]) -> u64 {
        if self.counted_len == 0 || self.counted_len > history.len() {
            return estimate_tokens(history);
        }
        self.counted_tokens + estimate_tokens(&history[self.counted_len..])
    }
}

/// Where to cut: the index of the first user message (kept) and of the first message of
/// the kept tail. None when nothing lies between them.
pub fn compaction_cut(history: &[ChatMessage]) -> Option<(usize, usize)> {
    let first_user = history
        .iter()
        .position(|m| matches!(m, ChatMessage::User { .. }))?;
    let mut tail = history.len().saturating_sub(KEEP_TAIL);
    // A tool result must stay with the call that asked for it: start the tail at a user or
    // assistant message. (ml-intern walks back to a user message, which in a long tool chain
    // is the task itself, leaving nothing to compact.)
    while tail > first_user + 1 && matches!(history[tail], ChatMessage::Tool { .. }) {
        tail -= 1;
    }
    if tail <= first_user + 1 {
        return None;
    }
    Some((first_user, tail))
}

/// What the summarizing call is sent: everything before the tail, then the request.
pub fn summary_request(history: &[ChatMessage], tail: usize) -> Vec<ChatMessage> {
    let mut messages = history[..tail].to_vec();
    super::guards::answer_dangling_calls(&mut messages, super::guards::NOT_EXECUTED);
    messages.push(ChatMessage::user(SUMMARY_REQUEST));
    messages
}

/// The compacted history: system prompt(s), the task, the summary, the tail.
pub fn compacted(
    history: &[ChatMessage],
    first_user: usize,
    tail: usize,
    summary: &str,
) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = history[..first_user]
        .iter()
        .filter(|m| matches!(m, ChatMessage::System { .. }))
        .cloned()
        .collect();
    out.push(history[first_user].clone());
    out.push(ChatMessage::user(format!("{SUMMARY_PREFIX}{summary}")));
    out.extend(history[tail..].iter().cloned());
    for m in out.iter_mut() {
        match m {
            ChatMessage::User { content } | ChatMessage::Tool { content, .. }
                if content.len() > MAX_KEPT_CHARS =>
            {
                *content = head_tail(content, MAX_KEPT_CHARS / 2);
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::ToolCall;

    fn call(id: &str) -> ChatMessage {
        ChatMessage::Assistant {
            content: None,
            tool_calls: vec![ToolCall {
                id: id.into(),
                name: "bash".into(),
                arguments: "{}".into(),
            }],
        }
    }

    fn result(id: &str) -> ChatMessage {
        ChatMessage::Tool {
            tool_call_id: id.into(),
            name: "bash".into(),
            content: "x".repeat(400),
        }
    }

    #[test]
    fn the_cut_keeps_task_and_tail_and_never_splits_a_call_from_its_result() {
        let mut h = vec![ChatMessage::system("s"), ChatMessage::user("task")];
        for i in 0..6 {
            h.push(call(&format!("c{i}")));
            h.push(result(&format!("c{i}")));
        }
        let (first, tail) = compaction_cut(&h).unwrap();
        assert_eq!(first, 1);
        assert!(matches!(h[tail], ChatMessage::Assistant { .. }), "{tail}");
        let out = compacted(&h, first, tail, "did things");
        assert_eq!(out[0], ChatMessage::system("s"));
        assert_eq!(out[1], ChatMessage::user("task"));
        assert!(
            matches!(&out[2], ChatMessage::User { content } if content.ends_with("did things"))
        );
        assert_eq!(&out[3..], &h[tail..]);
        assert!(estimate_tokens(&out) < estimate_tokens(&h));
        // Nothing between task and tail: nothing to compact.
        assert_eq!(compaction_cut(&h[..5]), None);
    }

    #[test]
    fn the_meter_adds_an_estimate_for_what_came_after_the_count() {
        let mut h = vec![ChatMessage::user("task")];
        let mut m = ContextMeter::default();
        assert_eq!(m.tokens(&h), estimate_tokens(&h));
        m.record(
            &Usage {
                prompt_tokens: 1000,
                completion_tokens: 50,
                cached_tokens: 0,
            },
            h.len(),
        );
        assert_eq!(m.tokens(&h), 1000);
        h.push(call("a"));
        h.push(result("a"));
        assert_eq!(m.tokens(&h), 1000 + estimate_tokens(&h[1..]));
    }
}
