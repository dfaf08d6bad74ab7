//! The controller's own cost per agent-loop iteration: the real OpenAI client (streaming)
//! against the scripted model server with zero latency, a tool that does nothing, and a
//! journal that encodes and compresses every record as the transcript store does. What is
//! left is the loop itself: requests, SSE parsing, guards, events and the transcript.
//!
//! Run: `cargo bench --bench loop_iteration` (ITERATIONS=N to change the count).

// Only the pieces of the test server a zero-latency model needs are used.
#[path = "../tests/support/loopback.rs"]
mod loopback;
#[allow(dead_code)]
#[path = "../tests/support/scripted_llm.rs"]
mod scripted_llm;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ml_intern::agent::{ChatMessage, Journal, JournalError, Turn, TurnConfig, TurnOutcome};
use ml_intern::llm::{OpenAiClient, ToolSpec};
use ml_intern::redact::Redactor;
use ml_intern::store::Record;
use ml_intern::store::transcript::{compress, encode};
use ml_intern::tools::{Tool, ToolFailure, ToolOutput, ToolRouter};
use scripted_llm::{ScriptedLlm, Step};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct Noop;

#[async_trait]
impl Tool for Noop {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "bash".into(),
            description: "does nothing".into(),
            parameters: json!({"type": "object"}),
        }
    }
    async fn call(&self, _: Value) -> Result<ToolOutput, ToolFailure> {
        Ok(ToolOutput::ok("ok\n"))
    }
}

/// Does the store's CPU work (scrub, encode, gzip the open chunk) without an apiserver.
#[derive(Default)]
struct EncodingJournal {
    lines: Mutex<Vec<u8>>,
    redactor: Redactor,
}

#[async_trait]
impl Journal for EncodingJournal {
    async fn append(&self, messages: &[ChatMessage]) -> Result<(), JournalError> {
        let mut lines = self.lines.lock().unwrap();
        for m in messages {
            lines.extend(encode(
                &Record::Message { message: m.clone() },
                &self.redactor,
            ));
        }
        // The store rewrites its open chunk, at most 640 KiB compressed, on every write.
        if lines.len() > 4 << 20 {
            lines.clear();
        }
        std::hint::black_box(compress(&lines));
        Ok(())
    }
    async fn replace(&self, _: &[ChatMessage]) -> Result<(), JournalError> {
        Ok(())
    }
}

fn proc_status(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds of this process (user + system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / 100.0
}

async fn run(iterations: usize) -> (Duration, f64, usize) {
    let mut steps: Vec<Step> = (0..iterations - 1)
        .map(|i| Step::ToolCalls(vec![("bash", json!({"command": format!("echo step {i}")}))]))
        .collect();
    steps.push(Step::Answer("done".into()));
    let llm = ScriptedLlm::start_without_bodies(steps).await;
    let model =
        OpenAiClient::new(&llm.base_url, "bench", None, Duration::from_secs(30)).streaming(true);
    let mut tools = ToolRouter::new();
    tools.register(Arc::new(Noop));
    let journal = EncodingJournal::default();
    let (tx, mut rx) = mpsc::channel(1024);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let config = TurnConfig {
        max_iterations: iterations as u32 + 1,
        ..TurnConfig::default()
    };
    let turn = Turn {
        model: &model,
        tools: &tools,
        journal: &journal,
        events: &tx,
        config: &config,
        gate: &ml_intern::agent::approval::NoGate,
    };
    let mut history = vec![ChatMessage::system("bench"), ChatMessage::user("loop")];
    let cpu = cpu_seconds();
    let started = Instant::now();
    let outcome = turn.run(&mut history, &CancellationToken::new()).await;
    let elapsed = started.elapsed();
    let cpu = cpu_seconds() - cpu;
    assert!(
        matches!(outcome, TurnOutcome::Completed { .. }),
        "{outcome:?}"
    );
    drop(tx);
    let _ = drain.await;
    (elapsed, cpu, history.len())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    ml_intern::http::install_crypto_provider();
    let iterations: usize = std::env::var("ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    // Warm up connections and allocator.
    run(10).await;
    let rss_before = proc_status("VmRSS:");
    let (elapsed, cpu, messages) = run(iterations).await;
    let rss_after = proc_status("VmRSS:");
    let per = elapsed / iterations as u32;
    println!("loop_iteration: {iterations} iterations, {messages} messages in the history");
    println!(
        "  wall per iteration: {:.3} ms (total {:.2} s)",
        per.as_secs_f64() * 1e3,
        elapsed.as_secs_f64()
    );
    println!(
        "  CPU per iteration:  {:.3} ms (client, loop, journal and the in-process scripted server)",
        cpu * 1e3 / iterations as f64
    );
    println!(
        "  resident memory:    {} KiB before, {} KiB after ({:+.1} KiB per iteration); peak {} KiB",
        rss_before,
        rss_after,
        (rss_after as f64 - rss_before as f64) / iterations as f64,
        proc_status("VmHWM:")
    );
}
