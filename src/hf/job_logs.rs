//! Reading a HF job's logs from its server-sent event stream, which replays the whole
//! history on every connection, sends keep-alive comments, may end early or stay open and
//! silent after the job is done. Reconnects skip the events already read (by index), and
//! whether to reconnect is decided by the job's stage, as the Hub's own client does. A read
//! of what exists now stops once the replay is over and the lines are live (stamped after
//! the connection was made), so a chatty running job does not hold it until its deadline.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::jobs_api::{HfError, HfJobsClient, seg};
use crate::llm::sse::{SseEvent, SseParser};
use crate::tools::job_backend::LogLine;

#[derive(Clone, Debug)]
pub struct LogOptions {
    /// Stop (or, when following, check the job) after this long without a log line;
    /// keep-alives do not count.
    pub idle: Duration,
    /// Keep reading until the job ends rather than returning what exists now.
    pub follow: bool,
    /// Longest time spent reading in all.
    pub deadline: Duration,
    /// Failed connections tolerated before giving up.
    pub max_errors: usize,
    /// Wait before reconnecting.
    pub reconnect_delay: Duration,
    /// Only the last this many lines of the history (the platform's `tail`). Such a read
    /// cannot skip replayed events by index, so it reconnects only while it has read
    /// nothing.
    pub tail: Option<usize>,
}

/// Lines stamped this long after the connection was made are live output, not replay;
/// the margin absorbs clock differences between the platform and us.
const LIVE_AFTER: SignedDuration = SignedDuration::from_secs(1);

impl LogOptions {
    /// What exists now: ml-intern's non-following read (5 s idle).
    pub fn snapshot() -> Self {
        LogOptions {
            idle: Duration::from_secs(5),
            follow: false,
            deadline: Duration::from_secs(60),
            max_errors: 5,
            reconnect_delay: Duration::from_secs(1),
            tail: None,
        }
    }
}

/// The log lines read, without the platform's "===== Job started" banner.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobLogs {
    pub lines: Vec<LogLine>,
    /// The stream said the job finished, or the job was seen in a final stage.
    pub ended: bool,
}

enum StreamEnd {
    /// No log line within the idle time.
    Idle,
    /// The server closed the stream.
    Closed,
    /// The connection broke or could not be made.
    Broken(HfError),
    /// The "===== Job finished" banner.
    Finished,
    /// The history is replayed and new lines are coming (only when not following).
    Live,
}

impl HfJobsClient {
    pub async fn logs(
        &self,
        namespace: &str,
        id: &str,
        options: &LogOptions,
    ) -> Result<JobLogs, HfError> {
        let started = Instant::now();
        let mut out = JobLogs::default();
        // Events read so far, counted over the whole replayed history.
        let mut seen = 0usize;
        let mut errors = 0usize;
        loop {
            let left = options.deadline.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Ok(out);
            }
            let end = self
                .read_stream(namespace, id, options, left, &mut seen, &mut out.lines)
                .await?;
            match end {
                StreamEnd::Finished => {
                    out.ended = true;
                    return Ok(out);
                }
                StreamEnd::Idle | StreamEnd::Live if !options.follow => return Ok(out),
                _ if options.tail.is_some() && seen > 0 => return Ok(out),
                StreamEnd::Broken(e) => {
                    errors += 1;
                    if errors > options.max_errors {
                        return if out.lines.is_empty() {
                            Err(e)
                        } else {
                            Ok(out)
                        };
                    }
                }
                StreamEnd::Idle | StreamEnd::Closed | StreamEnd::Live => {}
            }
            // The stream stopped: reconnect only while the job can still print.
            match self.inspect(namespace, id).await {
                Ok(job) if job.is_finished() => {
                    out.ended = true;
                    return Ok(out);
                }
                Ok(job) if !options.follow && job.status.stage == "SCHEDULING" => return Ok(out),
                Ok(_) => {}
                Err(e) if e.status().is_some_and(|s| s < 500 && s != 429) => return Err(e),
                Err(_) => errors += 1,
            }
            if errors > options.max_errors {
                return Ok(out);
            }
            tokio::time::sleep(options.reconnect_delay).await;
        }
    }

    /// One connection: appends the lines past the first `seen` events.
    async fn read_stream(
        &self,
        namespace: &str,
        id: &str,
        options: &LogOptions,
        left: Duration,
        seen: &mut usize,
        lines: &mut Vec<LogLine>,
    ) -> Result<StreamEnd, HfError> {
        let mut path = format!("/api/jobs/{}/{}/logs", seg(namespace), seg(id));
        if let Some(tail) = options.tail {
            path.push_str(&format!("?tail={tail}"));
        }
        let url = self.url(&path);
        let request = self
            .authorized(self.streaming.get(&url))
            .header("accept", "text/event-stream");
        let live_from = Timestamp::now() + LIVE_AFTER;
        let response = match tokio::time::timeout(left, request.send()).await {
            Err(_) => return Ok(StreamEnd::Idle),
            Ok(Err(e)) => {
                return Ok(StreamEnd::Broken(HfError::Unreachable {
                    url,
                    detail: crate::http::describe_error(&e),
                }));
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let body = response.bytes().await.unwrap_or_default();
            let e = HfError::Status {
                method: "GET",
                path,
                status,
                message: crate::llm::transport::error_message(&body),
            };
            // 4xx will not get better by asking again; 429 and 5xx may.
            return if status == 429 || status >= 500 {
                Ok(StreamEnd::Broken(e))
            } else {
                Err(e)
            };
        }
        let deadline = Instant::now() + left;
        let mut last_line = Instant::now();
        let mut index = 0usize;
        let mut parser = SseParser::default();
        let mut events: Vec<SseEvent> = vec![];
        let mut body = response.bytes_stream();
        loop {
            let until = (last_line + options.idle).min(deadline);
            let wait = until.saturating_duration_since(Instant::now());
            let chunk = match tokio::time::timeout(wait, body.next()).await {
                Err(_) => return Ok(StreamEnd::Idle),
                Ok(None) => return Ok(StreamEnd::Closed),
                Ok(Some(Err(e))) => {
                    return Ok(StreamEnd::Broken(HfError::Unreachable {
                        url,
                        detail: crate::http::describe_error(&e),
                    }));
                }
                Ok(Some(Ok(bytes))) => bytes,
            };
            parser.push(&chunk, &mut events);
            for event in events.drain(..) {
                // Only `data: {…}` events are log lines; empty data is a keep-alive.
                if !event.data.starts_with('{') {
                    continue;
                }
                index += 1;
                if index <= *seen {
                    continue;
                }
                *seen = index;
                last_line = Instant::now();
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&event.data) else {
                    continue;
                };
                let at = event["timestamp"].as_str().map(str::to_string);
                let live = at
                    .as_deref()
                    .and_then(|t| t.parse::<Timestamp>().ok())
                    .is_some_and(|t| t >= live_from);
                let Some(line) = event["data"].as_str().map(str::to_string) else {
                    continue;
                };
                if line.starts_with("===== Job started") {
                    continue;
                }
                if line.starts_with("===== Job finished") {
                    return Ok(StreamEnd::Finished);
                }
                lines.push(LogLine { at, text: line });
                if live && !options.follow {
                    return Ok(StreamEnd::Live);
                }
            }
        }
    }
}
