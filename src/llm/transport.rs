//! The HTTP exchange both model clients share: send, classify failures, and read a body
//! whole or as a stream of server-sent events.

use futures::StreamExt;

use super::LlmError;
use super::openai::error_message;

/// What a client does with one streamed event: Ok(true) when the stream is complete.
pub trait StreamSink {
    fn push(&mut self, data: &str) -> Result<bool, String>;
}

fn unreachable(url: &str, e: &reqwest::Error) -> LlmError {
    LlmError::Unreachable {
        url: url.to_string(),
        detail: crate::http::describe_error(e),
    }
}

/// Sends the request; a non-2xx answer becomes `LlmError::Http` with the server's message.
pub async fn send(
    url: &str,
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response, LlmError> {
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

pub async fn body(url: &str, resp: reqwest::Response) -> Result<bytes::Bytes, LlmError> {
    resp.bytes().await.map_err(|e| unreachable(url, &e))
}

/// Feeds every event to `sink` until it is complete or the stream ends. An error event
/// inside the 200 stream is the server failing mid-answer: reported with
/// `mid_stream_status`, so it is retried like the same failure before the stream.
pub async fn read_events(
    url: &str,
    resp: reqwest::Response,
    sink: &mut impl StreamSink,
    mid_stream_status: u16,
) -> Result<(), LlmError> {
    let mut events = std::pin::pin!(super::sse::events(resp.bytes_stream()));
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| unreachable(url, &e))?;
        match sink.push(&event.data) {
            Ok(true) => break,
            Ok(false) => {}
            Err(message) => {
                return Err(LlmError::Http {
                    url: url.to_string(),
                    status: mid_stream_status,
                    message: crate::text::truncate_chars(&message, 500),
                });
            }
        }
    }
    Ok(())
}
