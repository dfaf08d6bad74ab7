//! `bash`: runs a shell command where the session's commands run (a sandbox pod in the
//! operator), with ml-intern's parameters and output conventions.

use std::sync::Arc;
use std::time::Duration;

pub const BASH_TOOL: &str = "bash";

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Tool, ToolFailure, ToolOutput};
use crate::llm::ToolSpec;
use crate::text::head_tail;

/// Output beyond this many characters is cut to its head and tail (ml-intern's limit).
pub const OUTPUT_MAX_CHARS: usize = 25_000;
pub const DEFAULT_TIMEOUT_SECS: u64 = 240;
pub const MAX_TIMEOUT_SECS: u64 = 1200;
pub const DEFAULT_WORK_DIR: &str = "/workspace";

/// Result of one command: stdout and stderr merged, as a terminal shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandOutput {
    pub output: String,
    /// None when the command did not finish (timed out) or the exit code was not reported.
    pub exit_code: Option<i32>,
    pub timed_out: bool,
}

/// Somewhere commands can run.
#[async_trait]
pub trait CommandRunner: Send + Sync {
    async fn run(
        &self,
        command: &str,
        work_dir: &str,
        timeout: Duration,
    ) -> Result<CommandOutput, ToolFailure>;
}

pub struct BashTool {
    runner: Arc<dyn CommandRunner>,
    /// Where the full text of a cut output is saved for the model to read.
    spill: Option<Arc<dyn super::FileSystem>>,
}

/// Directory of saved full outputs, in the sandbox.
pub const SPILL_DIR: &str = "/tmp";

impl BashTool {
    pub fn new(runner: Arc<dyn CommandRunner>) -> Self {
        BashTool {
            runner,
            spill: None,
        }
    }

    /// Saves outputs that are cut in `files`, and tells the model where.
    pub fn spilling_to(mut self, files: Arc<dyn super::FileSystem>) -> Self {
        self.spill = Some(files);
        self
    }

    async fn save_full_output(&self, output: &str) -> Option<String> {
        let fs = self.spill.as_ref()?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = format!("{SPILL_DIR}/bash_output_{stamp}.txt");
        match fs.write(&path, output.as_bytes(), true).await {
            Ok(()) => Some(path),
            Err(e) => {
                tracing::debug!(?e, "could not save a long output");
                None
            }
        }
    }
}

#[derive(Deserialize)]
struct BashArgs {
    command: String,
    #[serde(default)]
    work_dir: Option<String>,
    /// Models often quote numbers ("240"); both forms are accepted.
    #[serde(default, deserialize_with = "lenient_seconds")]
    timeout: Option<u64>,
}

fn lenient_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_f64()
            .filter(|f| *f >= 0.0)
            .map(|f| Some(f.round() as u64))
            .ok_or_else(|| D::Error::custom("timeout must be a positive number of seconds")),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => s
            .trim()
            .trim_end_matches('s')
            .parse::<f64>()
            .ok()
            .filter(|f| *f >= 0.0)
            .map(|f| Some(f.round() as u64))
            .ok_or_else(|| D::Error::custom(format!("timeout {s:?} is not a number of seconds"))),
        other => Err(D::Error::custom(format!(
            "timeout must be a number of seconds, not {other}"
        ))),
    }
}

#[async_trait]
impl Tool for BashTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: BASH_TOOL.into(),
            description: format!(
                "Run a shell command in the session's sandbox (a Linux container with a \
                 persistent {DEFAULT_WORK_DIR} directory). stdout and stderr are returned \
                 together; a non-zero exit code is reported. Output longer than \
                 {OUTPUT_MAX_CHARS} characters is cut to its beginning and end."
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The shell command to run."},
                    "description": {"type": "string", "description": "What the command does, in a few words."},
                    "work_dir": {"type": "string", "description": format!("Directory to run in (default {DEFAULT_WORK_DIR}).")},
                    "timeout": {"type": "integer", "description": format!("Seconds before the command is stopped (default {DEFAULT_TIMEOUT_SECS}, max {MAX_TIMEOUT_SECS}).")}
                },
                "required": ["command"]
            }),
        }
    }

    async fn call(&self, arguments: Value) -> Result<ToolOutput, ToolFailure> {
        let args: BashArgs = match serde_json::from_value(arguments) {
            Ok(a) => a,
            Err(e) => {
                return Ok(ToolOutput::error(format!(
                    "ERROR: invalid arguments for bash: {e}. Expected {{\"command\": \"...\"}}."
                )));
            }
        };
        if args.command.trim().is_empty() {
            return Ok(ToolOutput::error("ERROR: command is empty."));
        }
        let timeout = args
            .timeout
            .unwrap_or(DEFAULT_TIMEOUT_SECS)
            .clamp(1, MAX_TIMEOUT_SECS);
        let work_dir = args.work_dir.as_deref().unwrap_or(DEFAULT_WORK_DIR);
        let out = self
            .runner
            .run(&args.command, work_dir, Duration::from_secs(timeout))
            .await?;
        let clean = strip_ansi(&out.output);
        let chars = clean.chars().count();
        let mut result = format_output(&out, timeout);
        if chars > OUTPUT_MAX_CHARS
            && let Some(path) = self.save_full_output(&clean).await
        {
            result.content.push_str(&format!(
                "\n\n[The output was {chars} characters; all of it is in {path}. Read parts \
                 of it with read (offset, limit) or search it with grep.]"
            ));
        }
        Ok(result)
    }
}

fn format_output(out: &CommandOutput, timeout_secs: u64) -> ToolOutput {
    let mut text = head_tail(&strip_ansi(&out.output), OUTPUT_MAX_CHARS);
    if text.trim().is_empty() {
        text = "(no output)".to_string();
    }
    if out.timed_out {
        return ToolOutput::error(format!(
            "{text}\n\nERROR: command timed out after {timeout_secs}s and was stopped"
        ));
    }
    match out.exit_code {
        Some(0) => ToolOutput::ok(text),
        Some(code) => ToolOutput::error(format!("{text}\n\nERROR: Exit code {code}")),
        None => ToolOutput::error(format!(
            "{text}\n\nERROR: the command's exit code is unknown"
        )),
    }
}

/// Removes terminal escape sequences (colours, cursor moves), which only cost the model
/// tokens.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('[') => {
                chars.next();
                // CSI: parameters and intermediates up to a final byte in @..~
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                chars.next();
                // OSC: ends with BEL or ESC \
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' {
                        chars.next();
                        break;
                    }
                }
            }
            Some(_) => {
                chars.next();
            }
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Recorder {
        calls: Mutex<Vec<(String, String, Duration)>>,
        reply: CommandOutput,
    }

    #[async_trait]
    impl CommandRunner for Recorder {
        async fn run(
            &self,
            command: &str,
            work_dir: &str,
            timeout: Duration,
        ) -> Result<CommandOutput, ToolFailure> {
            self.calls
                .lock()
                .unwrap()
                .push((command.into(), work_dir.into(), timeout));
            Ok(self.reply.clone())
        }
    }

    fn tool(reply: CommandOutput) -> (BashTool, Arc<Recorder>) {
        let r = Arc::new(Recorder {
            calls: Mutex::new(vec![]),
            reply,
        });
        (BashTool::new(r.clone()), r)
    }

    #[tokio::test]
    async fn defaults_and_clamps_are_applied() {
        let (t, r) = tool(CommandOutput {
            output: "hi\n".into(),
            exit_code: Some(0),
            timed_out: false,
        });
        let out = t.call(json!({"command": "echo hi"})).await.unwrap();
        assert_eq!(out, ToolOutput::ok("hi\n"));
        t.call(json!({"command": "x", "work_dir": "/tmp", "timeout": 99999}))
            .await
            .unwrap();
        let calls = r.calls.lock().unwrap();
        assert_eq!(calls[0].1, DEFAULT_WORK_DIR);
        assert_eq!(calls[0].2, Duration::from_secs(DEFAULT_TIMEOUT_SECS));
        assert_eq!(calls[1].1, "/tmp");
        assert_eq!(calls[1].2, Duration::from_secs(MAX_TIMEOUT_SECS));
    }

    #[tokio::test]
    async fn nonzero_exit_empty_output_and_timeouts_are_reported() {
        let (t, _) = tool(CommandOutput {
            output: String::new(),
            exit_code: Some(3),
            timed_out: false,
        });
        let out = t.call(json!({"command": "false"})).await.unwrap();
        assert!(!out.success);
        assert_eq!(out.content, "(no output)\n\nERROR: Exit code 3");

        let (t, _) = tool(CommandOutput {
            output: "partial".into(),
            exit_code: None,
            timed_out: true,
        });
        let out = t
            .call(json!({"command": "sleep 999", "timeout": 5}))
            .await
            .unwrap();
        assert!(!out.success);
        assert!(
            out.content.contains("timed out after 5s"),
            "{}",
            out.content
        );
    }

    #[tokio::test]
    async fn quoted_timeouts_are_accepted() {
        let (t, r) = tool(CommandOutput {
            exit_code: Some(0),
            ..Default::default()
        });
        t.call(json!({"command": "x", "timeout": "30"}))
            .await
            .unwrap();
        t.call(json!({"command": "x", "timeout": "45s"}))
            .await
            .unwrap();
        let out = t
            .call(json!({"command": "x", "timeout": "soon"}))
            .await
            .unwrap();
        assert!(
            !out.success && out.content.contains("\"soon\""),
            "{}",
            out.content
        );
        let calls = r.calls.lock().unwrap();
        assert_eq!(calls[0].2, Duration::from_secs(30));
        assert_eq!(calls[1].2, Duration::from_secs(45));
        assert_eq!(calls.len(), 2);
    }

    #[tokio::test]
    async fn bad_arguments_are_answered_not_run() {
        let (t, r) = tool(CommandOutput::default());
        let out = t.call(json!({"cmd": "ls"})).await.unwrap();
        assert!(!out.success);
        assert!(out.content.contains("invalid arguments"));
        assert!(r.calls.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn long_output_is_cut_to_head_and_tail() {
        let (t, _) = tool(CommandOutput {
            output: format!("START{}END", "x".repeat(100_000)),
            exit_code: Some(0),
            timed_out: false,
        });
        let out = t.call(json!({"command": "yes"})).await.unwrap();
        assert!(out.content.starts_with("START") && out.content.ends_with("END"));
        assert!(out.content.chars().count() < OUTPUT_MAX_CHARS + 100);
    }

    #[test]
    fn ansi_sequences_are_stripped() {
        assert_eq!(strip_ansi("\u{1b}[1;31mred\u{1b}[0m plain"), "red plain");
        assert_eq!(strip_ansi("\u{1b}]0;title\u{7}text"), "text");
        assert_eq!(strip_ansi("naïve"), "naïve");
    }
}
