//! The transcript of a session as a log of records: the user inputs it took, every message
//! of the conversation, turn boundaries and the agent's events. Replaying the records gives
//! back the conversation to resume from. Nothing here knows where the log is kept.

use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::agent::ChatMessage;
use crate::redact::Redactor;
use crate::text::truncate_bytes;

/// Records bigger than this are shrunk before they are stored: a chunk must stay well under
/// the 1 MiB a ConfigMap can hold even when it does not compress.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// The session took a user input: index 0 is `spec.prompt`, index i is
    /// `spec.messages[i-1]`. The digest lets a later run notice an input that was changed
    /// after it was sent. Starts a turn.
    Input {
        index: usize,
        digest: String,
        at: String,
    },
    /// A message appended to the conversation.
    Message { message: ChatMessage },
    /// The conversation was replaced as a whole (repaired or compacted).
    Replace { history: Vec<ChatMessage> },
    /// The open turn ended; `outcome` is a reason such as `Completed` or `MaxIterationsReached`.
    TurnEnded { outcome: String, at: String },
    /// An agent event, for people reading the transcript; not needed to resume.
    Event { at: String, event: Value },
}

/// What replaying a transcript gives back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Replayed {
    pub history: Vec<ChatMessage>,
    /// Digests of the inputs taken, in order.
    pub input_digests: Vec<String>,
    /// A turn was started and has not ended: it was interrupted and can be resumed.
    pub turn_open: bool,
    pub records: usize,
}

pub fn replay<'a>(records: impl IntoIterator<Item = &'a Record>) -> Replayed {
    let mut out = Replayed::default();
    for record in records {
        out.records += 1;
        match record {
            Record::Input { digest, .. } => {
                out.input_digests.push(digest.clone());
                out.turn_open = true;
            }
            Record::Message { message } => out.history.push(message.clone()),
            Record::Replace { history } => out.history = history.clone(),
            Record::TurnEnded { .. } => out.turn_open = false,
            Record::Event { .. } => {}
        }
    }
    order_tool_results(&mut out.history);
    out
}

/// Parallel tool results are recorded as they finish; the conversation has them in the
/// order the model asked for them.
fn order_tool_results(history: &mut [ChatMessage]) {
    let mut i = 0;
    while i < history.len() {
        let order: Vec<String> = match &history[i] {
            ChatMessage::Assistant { tool_calls, .. } if !tool_calls.is_empty() => {
                tool_calls.iter().map(|c| c.id.clone()).collect()
            }
            _ => {
                i += 1;
                continue;
            }
        };
        let start = i + 1;
        let mut end = start;
        while end < history.len() && matches!(history[end], ChatMessage::Tool { .. }) {
            end += 1;
        }
        history[start..end].sort_by_key(|m| match m {
            ChatMessage::Tool { tool_call_id, .. } => order
                .iter()
                .position(|id| id == tool_call_id)
                .unwrap_or(usize::MAX),
            _ => usize::MAX,
        });
        i = end;
    }
}

/// The sha256 of an input, hex.
pub fn digest(text: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Longest text an event record keeps: the full text is in the message records.
pub const EVENT_TEXT_BYTES: usize = 2048;

/// One record as a JSON line, with secrets scrubbed and oversized text cut.
pub fn encode(record: &Record, redactor: &Redactor) -> Vec<u8> {
    let mut value = serde_json::to_value(record).unwrap_or(Value::Null);
    if matches!(record, Record::Event { .. }) {
        shrink(&mut value, EVENT_TEXT_BYTES);
    }
    scrub(&mut value, redactor);
    let mut line = serde_json::to_vec(&value).unwrap_or_default();
    if line.len() > MAX_RECORD_BYTES {
        shrink(&mut value, MAX_RECORD_BYTES / 4);
        line = serde_json::to_vec(&value).unwrap_or_default();
    }
    line.push(b'\n');
    line
}

fn scrub(value: &mut Value, redactor: &Redactor) {
    match value {
        Value::String(s) => {
            if let std::borrow::Cow::Owned(clean) = redactor.redact(s) {
                *s = clean;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| scrub(v, redactor)),
        Value::Object(map) => map.values_mut().for_each(|v| scrub(v, redactor)),
        _ => {}
    }
}

/// Cuts every string longer than `max` bytes. Tool-call arguments are JSON text, so a cut
/// one would no longer parse; they are replaced by a note instead.
fn shrink(value: &mut Value, max: usize) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    Value::String(s) if key == "arguments" && s.len() > max => {
                        *s = serde_json::json!({
                            "_omitted": format!("{} bytes of arguments were too large for the transcript", s.len())
                        })
                        .to_string();
                    }
                    _ => shrink(v, max),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| shrink(v, max)),
        Value::String(s) if s.len() > max => *s = truncate_bytes(s, max),
        _ => {}
    }
}

pub fn decode(lines: &[u8]) -> Result<Vec<Record>, String> {
    lines
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_slice(l).map_err(|e| format!("record {} is not readable: {e}", i + 1))
        })
        .collect()
}

pub fn compress(lines: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(lines);
    encoder.finish().unwrap_or_default()
}

pub fn decompress(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| format!("not gzip data: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::ToolCall;

    fn call(ids: &[&str]) -> ChatMessage {
        ChatMessage::Assistant {
            content: None,
            tool_calls: ids
                .iter()
                .map(|id| ToolCall {
                    id: id.to_string(),
                    name: "bash".into(),
                    arguments: "{}".into(),
                })
                .collect(),
        }
    }

    fn result(id: &str) -> ChatMessage {
        ChatMessage::Tool {
            tool_call_id: id.into(),
            name: "bash".into(),
            content: format!("out {id}"),
        }
    }

    fn msg(m: ChatMessage) -> Record {
        Record::Message { message: m }
    }

    #[test]
    fn replay_rebuilds_the_conversation_in_call_order_and_knows_an_open_turn() {
        let records = vec![
            Record::Input {
                index: 0,
                digest: digest("task"),
                at: "t".into(),
            },
            msg(ChatMessage::user("task")),
            msg(call(&["a", "b", "c"])),
            msg(result("c")),
            msg(result("a")),
        ];
        let r = replay(&records);
        assert!(r.turn_open);
        assert_eq!(r.input_digests, vec![digest("task")]);
        assert_eq!(
            r.history,
            vec![
                ChatMessage::user("task"),
                call(&["a", "b", "c"]),
                result("a"),
                result("c")
            ]
        );
        let mut ended = records.clone();
        ended.push(Record::TurnEnded {
            outcome: "Completed".into(),
            at: "t".into(),
        });
        ended.push(Record::Replace {
            history: vec![ChatMessage::user("summary")],
        });
        let r = replay(&ended);
        assert!(!r.turn_open);
        assert_eq!(r.history, vec![ChatMessage::user("summary")]);
        assert_eq!(r.records, 7);
    }

    #[test]
    fn records_round_trip_compressed_with_secrets_scrubbed() {
        let redactor = Redactor::new(["canary-value-123".to_string()]);
        let records = [
            msg(ChatMessage::user("my key is canary-value-123")),
            Record::Event {
                at: "t".into(),
                event: serde_json::json!({"event_type": "tool_output", "output": "HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz0123456789"}),
            },
        ];
        let lines: Vec<u8> = records.iter().flat_map(|r| encode(r, &redactor)).collect();
        let text = String::from_utf8(lines.clone()).unwrap();
        assert!(
            !text.contains("canary-value-123") && !text.contains("hf_abc"),
            "{text}"
        );
        let back = decode(&decompress(&compress(&lines)).unwrap()).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0], msg(ChatMessage::user("my key is [REDACTED]")));
    }

    #[test]
    fn an_oversized_record_is_cut_and_its_arguments_stay_json() {
        let big = "x".repeat(MAX_RECORD_BYTES * 2);
        let record = msg(ChatMessage::Assistant {
            content: Some(big.clone()),
            tool_calls: vec![ToolCall {
                id: "a".into(),
                name: "write".into(),
                arguments: serde_json::json!({ "content": big }).to_string(),
            }],
        });
        let line = encode(&record, &Redactor::default());
        assert!(line.len() < MAX_RECORD_BYTES, "{}", line.len());
        let back = decode(&line).unwrap();
        let Record::Message {
            message: ChatMessage::Assistant { tool_calls, .. },
        } = &back[0]
        else {
            panic!("{back:?}")
        };
        let args: Value = serde_json::from_str(&tool_calls[0].arguments).unwrap();
        assert!(args["_omitted"].as_str().unwrap().contains("too large"));
    }

    #[test]
    fn an_unreadable_record_is_reported_by_position() {
        let err = decode(b"{\"record\":\"turn_ended\",\"outcome\":\"x\",\"at\":\"t\"}\nnot json\n")
            .unwrap_err();
        assert!(err.starts_with("record 2"), "{err}");
    }
}
