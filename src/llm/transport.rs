//! The HTTP exchange both model clients share: send, classify failures, and read a body
//! whole or as a stream of server-sent events.

use std::time::Instant;

use futures::StreamExt;
use serde_json::Value;

use super::{ChatResponse, LlmError, TextDeltas};

/// Longest error body kept in a message; provider errors can be whole HTML pages.
const ERROR_MESSAGE_MAX_CHARS: usize = 500;

/// Builds one response from a stream's events.
pub trait StreamSink: Default {
    /// Takes one event's data, appending any new answer text to `text`; Ok(true) when
    /// the stream is complete.
    fn push(&mut self, data: &str, text: &mut String) -> Result<bool, String>;
    fn finish(self) -> ChatResponse;
}

/// The human part of an error body: `{"error":{"message":…}}`, `{"error":"…"}`,
/// `{"message":…}`, or the text itself, cut short.
pub fn error_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let from_json = serde_json::from_str::<Value>(&text).ok().and_then(|v| {
        let e = v.get("error").unwrap_or(&v);
        e.get("message")
            .and_then(Value::as_str)
            .or_else(|| e.as_str())
            .map(str::to_string)
    });
    let msg = from_json.unwrap_or_else(|| text.trim().to_string());
    let msg = if msg.is_empty() {
        "(empty body)".to_string()
    } else {
        msg
    };
    crate::text::truncate_chars(&msg, ERROR_MESSAGE_MAX_CHARS)
}

/// One model call: send `request`, then assemble the answer from the event stream with `S`
/// when `stream`, or parse the whole body with `parse`. An error event inside a 200
/// stream is the server failing mid-answer and is reported as HTTP `mid_stream_status`,
/// so it is retried like the same failure before the stream.
pub async fn exchange<S: StreamSink>(
    url: &str,
    request: reqwest::RequestBuilder,
    stream: bool,
    mid_stream_status: u16,
    parse: fn(&[u8]) -> Result<ChatResponse, String>,
    deltas: Option<&TextDeltas>,
) -> Result<ChatResponse, LlmError> {
    let started = Instant::now();
    let resp = send(url, request).await?;
    let response = if stream {
        let mut sink = S::default();
        read_events(url, resp, &mut sink, mid_stream_status, deltas).await?;
        sink.finish()
    } else {
        let bytes = resp.bytes().await.map_err(|e| unreachable(url, &e))?;
        parse(&bytes).map_err(|detail| LlmError::InvalidResponse {
            url: url.to_string(),
            detail,
        })?
    };
    tracing::debug!(
        latency_ms = started.elapsed().as_millis() as u64,
        stream,
        "model call"
    );
    Ok(response)
}

fn unreachable(url: &str, e: &reqwest::Error) -> LlmError {
    LlmError::Unreachable {
        url: url.to_string(),
        detail: crate::http::describe_error(e),
    }
}

/// Sends the request; a non-2xx answer becomes `LlmError::Http` with the server's message.
async fn send(url: &str, request: reqwest::RequestBuilder) -> Result<reqwest::Response, LlmError> {
    let resp = request.send().await.map_err(|e| unreachable(url, &e))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let bytes = resp.bytes().await.unwrap_or_default();
    Err(LlmError::Http {
        url: url.to_string(),
        status: status.as_u16(),
        message: error_message(&bytes),
    })
}

/// Feeds every event to `sink` until it is complete or the stream ends.
async fn read_events(
    url: &str,
    resp: reqwest::Response,
    sink: &mut impl StreamSink,
    mid_stream_status: u16,
    deltas: Option<&TextDeltas>,
) -> Result<(), LlmError> {
    let mut events = std::pin::pin!(super::sse::events(resp.bytes_stream()));
    let mut text = String::new();
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| unreachable(url, &e))?;
        let pushed = sink.push(&event.data, &mut text);
        if let Some(deltas) = deltas.filter(|_| !text.is_empty()) {
            // A listener that went away does not stop the answer.
            let _ = deltas.send(std::mem::take(&mut text)).await;
        }
        text.clear();
        match pushed {
            Ok(true) => break,
            Ok(false) => {}
            Err(message) => {
                return Err(LlmError::Http {
                    url: url.to_string(),
                    status: mid_stream_status,
                    message: crate::text::truncate_chars(&message, ERROR_MESSAGE_MAX_CHARS),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_come_from_every_common_shape() {
        assert_eq!(
            error_message(
                br#"{"error":{"message":"Invalid API Key","type":"authentication_error","code":401}}"#
            ),
            "Invalid API Key"
        );
        assert_eq!(
            error_message(br#"{"error":"model not found"}"#),
            "model not found"
        );
        assert_eq!(
            error_message(
                br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#
            ),
            "slow down"
        );
        assert_eq!(error_message(b"Bad Gateway"), "Bad Gateway");
        assert_eq!(error_message(b""), "(empty body)");
        assert!(error_message("x".repeat(5000).as_bytes()).chars().count() <= 520);
    }
}
