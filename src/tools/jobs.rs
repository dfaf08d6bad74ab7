//! `cluster_jobs`: training and compute steps as jobs beside the sandbox, with the
//! contract of ml-intern's `hf_jobs` (operations run, ps, logs, inspect, cancel). The
//! backend (Kubernetes Jobs here; Hugging Face Jobs later) is behind `JobBackend`.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{FileSystem, Tool, ToolFailure, ToolOutput};
use crate::llm::ToolSpec;

pub const CLUSTER_JOBS_TOOL: &str = "cluster_jobs";
/// ml-intern's default job timeout.
pub const DEFAULT_TIMEOUT_SECS: u64 = 30 * 60;
/// Longest timeout a job may ask for.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// Log text returned by `logs` (the tail is kept).
const LOGS_MAX_CHARS: usize = 25_000;

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRequest {
    pub command: Vec<String>,
    pub image: Option<String>,
    pub flavor: Option<String>,
    pub timeout_secs: u64,
    pub env: BTreeMap<String, String>,
    /// Keeps running when the session is suspended.
    pub detach: bool,
}

/// A job as a backend reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobInfo {
    pub id: String,
    pub flavor: String,
    /// `Pending`, `Running`, `Succeeded`, `Failed`, `DeadlineExceeded` or `Cancelled`.
    pub state: String,
    /// Why it failed, in the backend's words.
    pub message: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

#[async_trait]
pub trait JobBackend: Send + Sync {
    async fn run(&self, request: JobRequest) -> Result<JobInfo, String>;
    async fn list(&self) -> Result<Vec<JobInfo>, String>;
    async fn inspect(&self, id: &str) -> Result<JobInfo, String>;
    /// The job's output so far (stdout and stderr).
    async fn logs(&self, id: &str) -> Result<String, String>;
    async fn cancel(&self, id: &str) -> Result<(), String>;
    /// Flavors the platform offers: (name, description).
    fn flavors(&self) -> Vec<(String, String)>;
}

pub struct ClusterJobsTool {
    pub backend: Arc<dyn JobBackend>,
    /// Where a script named by path is read from.
    pub files: Option<Arc<dyn FileSystem>>,
    /// Told what the tool learns about jobs (for the session's status).
    pub observed: Option<tokio::sync::mpsc::Sender<JobObservation>>,
}

/// The latest value of a metric a job printed.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    pub name: String,
    pub value: String,
    pub step: Option<i64>,
}

/// What the tool saw of a job.
#[derive(Clone, Debug, PartialEq)]
pub enum JobObservation {
    State(JobInfo),
    Metrics { id: String, metrics: Vec<Metric> },
}

/// The latest value of each metric in `logs`: lines that are JSON objects with a `metric`
/// name and a `value`, optionally a `step`.
pub fn parse_metrics(logs: &str) -> Vec<Metric> {
    let mut latest: Vec<Metric> = vec![];
    for line in logs.lines() {
        let line = line.trim();
        if !line.starts_with('{') || !line.contains("\"metric\"") {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(name), Some(value)) = (v["metric"].as_str(), v.get("value")) else {
            continue;
        };
        let value = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let metric = Metric {
            name: crate::text::truncate_chars(name, 63),
            value: crate::text::truncate_chars(&value, 63),
            step: v["step"].as_i64(),
        };
        match latest.iter_mut().find(|m| m.name == metric.name) {
            Some(m) => *m = metric,
            None => latest.push(metric),
        }
    }
    latest
}

#[derive(Deserialize)]
struct Args {
    operation: String,
    #[serde(default)]
    script: Option<String>,
    #[serde(default)]
    script_args: Vec<String>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default, alias = "flavor", alias = "hardware")]
    hardware_flavor: Option<String>,
    #[serde(default)]
    timeout: Option<Value>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    job_id: Option<String>,
    #[serde(default)]
    detach: bool,
}

/// "300", 300, "300s", "5m", "1.5h", "1d" as seconds (the Hugging Face client's forms).
pub fn parse_timeout(v: &Value) -> Result<u64, String> {
    let text = match v {
        Value::Number(n) => {
            return n
                .as_f64()
                .map(|f| f.round() as u64)
                .ok_or("bad number".into());
        }
        Value::String(s) => s.trim().to_string(),
        other => return Err(format!("timeout must be like \"30m\", not {other}")),
    };
    let (number, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text.as_str(), 's'),
    };
    let scale = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        'd' => 86400.0,
        other => return Err(format!("unknown timeout unit {other:?}; use s, m, h or d")),
    };
    number
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|f| *f > 0.0)
        .map(|f| (f * scale).round() as u64)
        .ok_or_else(|| format!("timeout {text:?} is not a duration like \"30m\""))
}

/// A script given as a path in the sandbox rather than as code.
fn looks_like_path(script: &str) -> bool {
    !script.contains('\n')
        && !script.contains("://")
        && (script.starts_with('/')
            || script.starts_with("./")
            || script.starts_with("../")
            || (script.ends_with(".py") && !script.contains(char::is_whitespace)))
}

fn describe(job: &JobInfo) -> String {
    let mut text = format!(
        "Job: {}\nFlavor: {}\nState: {}",
        job.id, job.flavor, job.state
    );
    if let Some(m) = &job.message {
        text.push_str(&format!("\nReason: {m}"));
    }
    if let Some(s) = &job.started_at {
        text.push_str(&format!("\nStarted: {s}"));
    }
    if let Some(f) = &job.finished_at {
        text.push_str(&format!("\nFinished: {f}"));
    }
    text
}

impl ClusterJobsTool {
    async fn tell(&self, observation: JobObservation) {
        if let Some(tx) = &self.observed {
            // Status bookkeeping only; the tool's answer does not depend on it.
            let _ = tx.send(observation).await;
        }
    }

    async fn tell_metrics(&self, id: &str, logs: &str) {
        let metrics = parse_metrics(logs);
        if !metrics.is_empty() {
            self.tell(JobObservation::Metrics {
                id: id.to_string(),
                metrics,
            })
            .await;
        }
    }

    fn job_id(args: &Args) -> Result<String, String> {
        args.job_id
            .clone()
            .filter(|j| !j.trim().is_empty())
            .ok_or_else(|| format!("{} needs job_id", args.operation))
    }

    async fn run(&self, args: &Args) -> Result<String, String> {
        let timeout_secs = match &args.timeout {
            None => DEFAULT_TIMEOUT_SECS,
            Some(v) => parse_timeout(v)?,
        };
        if timeout_secs > MAX_TIMEOUT_SECS {
            return Err(format!("timeout is above the {MAX_TIMEOUT_SECS}s limit"));
        }
        let flavors = self.backend.flavors();
        if let Some(f) = &args.hardware_flavor
            && !flavors.is_empty()
            && !flavors.iter().any(|(n, _)| n == f)
        {
            return Err(format!(
                "unknown hardware_flavor {f:?}; choose one of: {}",
                flavors
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let job = self
            .backend
            .run(JobRequest {
                command: self.command(args).await?,
                image: args.image.clone(),
                flavor: args.hardware_flavor.clone(),
                timeout_secs,
                env: args.env.clone(),
                detach: args.detach,
            })
            .await?;
        let logs = self.backend.logs(&job.id).await.unwrap_or_default();
        self.tell(JobObservation::State(job.clone())).await;
        self.tell_metrics(&job.id, &logs).await;
        let first: Vec<&str> = logs.lines().take(20).collect();
        Ok(format!(
            "Job submitted.\n{}\n\nFirst log lines:\n{}\n\nFollow it with operation=logs or inspect and job_id={}.",
            describe(&job),
            if first.is_empty() {
                "(none yet)".to_string()
            } else {
                first.join("\n")
            },
            job.id
        ))
    }

    async fn ps(&self) -> Result<String, String> {
        let jobs = self.backend.list().await?;
        if jobs.is_empty() {
            return Ok("No jobs.".to_string());
        }
        let mut table =
            "| JOB ID | FLAVOR | STATE | STARTED | FINISHED |\n|---|---|---|---|---|\n".to_string();
        for j in jobs {
            self.tell(JobObservation::State(j.clone())).await;
            table.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                j.id,
                j.flavor,
                j.state,
                j.started_at.unwrap_or_default(),
                j.finished_at.unwrap_or_default()
            ));
        }
        Ok(table)
    }

    async fn logs(&self, args: &Args) -> Result<String, String> {
        let id = Self::job_id(args)?;
        let logs = self.backend.logs(&id).await?;
        self.tell_metrics(&id, &logs).await;
        let logs = super::bash::strip_ansi(&logs);
        let total = logs.chars().count();
        Ok(if total > LOGS_MAX_CHARS {
            let tail: String = logs.chars().skip(total - LOGS_MAX_CHARS).collect();
            format!(
                "[… {} earlier characters not shown]\n{tail}",
                total - LOGS_MAX_CHARS
            )
        } else if logs.is_empty() {
            "(no output yet)".into()
        } else {
            logs
        })
    }

    async fn inspect(&self, args: &Args) -> Result<String, String> {
        let job = self.backend.inspect(&Self::job_id(args)?).await?;
        self.tell(JobObservation::State(job.clone())).await;
        Ok(describe(&job))
    }

    async fn cancel(&self, args: &Args) -> Result<String, String> {
        let id = Self::job_id(args)?;
        self.backend.cancel(&id).await?;
        Ok(format!("Job {id} cancelled."))
    }

    async fn command(&self, args: &Args) -> Result<Vec<String>, String> {
        match (&args.script, &args.command) {
            (Some(_), Some(_)) => Err("give either script or command, not both".into()),
            (None, None) => {
                Err("run needs a script (Python code or a sandbox path) or a command".into())
            }
            (None, Some(command)) if command.is_empty() => Err("command is empty".into()),
            (None, Some(command)) => Ok(command.clone()),
            (Some(script), None) => {
                let code = if looks_like_path(script) {
                    let fs = self
                        .files
                        .as_ref()
                        .ok_or("scripts by path need the sandbox")?;
                    let path = super::files::resolve(script);
                    let bytes = fs
                        .read(&path, None, super::files::EDIT_MAX_BYTES)
                        .await
                        .map_err(|e| format!("cannot read {path} from the sandbox: {e:?}"))?;
                    String::from_utf8(bytes).map_err(|_| format!("{path} is not UTF-8 text"))?
                } else {
                    script.clone()
                };
                let mut command = vec!["python3".to_string(), "-c".to_string(), code];
                if !args.script_args.is_empty() {
                    command.push("job".into());
                    command.extend(args.script_args.iter().cloned());
                }
                Ok(command)
            }
        }
    }
}

#[async_trait]
impl Tool for ClusterJobsTool {
    fn spec(&self) -> ToolSpec {
        let flavors: Vec<String> = self
            .backend
            .flavors()
            .iter()
            .map(|(n, d)| format!("{n} ({d})"))
            .collect();
        ToolSpec {
            name: CLUSTER_JOBS_TOOL.into(),
            description: format!(
                "Run training or compute as a Kubernetes Job on the cluster, beside the \
                 sandbox. operation=run submits and returns at once with the job id and its \
                 first log lines; follow it with ps, logs and inspect; cancel stops it. A \
                 script is Python code or a path in the sandbox; or give command (argv) and \
                 image. Print progress as JSON lines like {{\"metric\": \"loss\", \"value\": 0.3}}. \
                 Test on a small sample in the sandbox first. Flavors: {}.",
                if flavors.is_empty() {
                    "the cluster default".to_string()
                } else {
                    flavors.join(", ")
                }
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "operation": {"type": "string", "enum": ["run", "ps", "logs", "inspect", "cancel"]},
                    "script": {"type": "string", "description": "Python code, or a path to a .py file in the sandbox."},
                    "script_args": {"type": "array", "items": {"type": "string"}},
                    "command": {"type": "array", "items": {"type": "string"}, "description": "Command and arguments, instead of script."},
                    "image": {"type": "string", "description": "Container image (default: the sandbox's)."},
                    "hardware_flavor": {"type": "string", "description": "Hardware flavor."},
                    "timeout": {"type": "string", "description": "Longest run time, e.g. \"30m\", \"2h\" (default 30m)."},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}},
                    "job_id": {"type": "string", "description": "For logs, inspect and cancel."},
                    "detach": {"type": "boolean", "description": "Keep the job running if the session is suspended (default false)."}
                },
                "required": ["operation"]
            }),
        }
    }

    async fn call(&self, arguments: Value) -> Result<ToolOutput, ToolFailure> {
        let args: Args = match Args::deserialize(&arguments) {
            Ok(a) => a,
            Err(e) => {
                return Ok(ToolOutput::error(format!(
                    "ERROR: invalid arguments for cluster_jobs: {e}."
                )));
            }
        };
        let result = match args.operation.trim() {
            "run" => self.run(&args).await,
            "ps" => self.ps().await,
            "logs" => self.logs(&args).await,
            "inspect" => self.inspect(&args).await,
            "cancel" => self.cancel(&args).await,
            other => Err(format!(
                "unknown operation {other:?}; use run, ps, logs, inspect or cancel"
            )),
        };
        Ok(match result {
            Ok(text) => ToolOutput::ok(text),
            Err(e) => ToolOutput::error(format!("ERROR: {e}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_read_like_the_hub_client() {
        for (v, secs) in [
            (json!(300), 300),
            (json!("300"), 300),
            (json!("300s"), 300),
            (json!("5m"), 300),
            (json!("1.5h"), 5400),
            (json!("1d"), 86400),
        ] {
            assert_eq!(parse_timeout(&v), Ok(secs), "{v}");
        }
        assert!(parse_timeout(&json!("5w")).is_err());
        assert!(parse_timeout(&json!("soon")).is_err());
    }

    #[test]
    fn the_latest_value_of_each_metric_is_kept() {
        let logs = "loading\n{\"metric\": \"loss\", \"value\": 0.9, \"step\": 1}\n\
                    {\"metric\": \"acc\", \"value\": \"71%\"}\nnot {json\n\
                    {\"metric\": \"loss\", \"value\": 0.31, \"step\": 2}\n{\"other\": 1}\n";
        let m = parse_metrics(logs);
        assert_eq!(
            m,
            vec![
                Metric {
                    name: "loss".into(),
                    value: "0.31".into(),
                    step: Some(2)
                },
                Metric {
                    name: "acc".into(),
                    value: "71%".into(),
                    step: None
                },
            ]
        );
    }

    #[test]
    fn paths_and_code_are_told_apart() {
        assert!(looks_like_path("train.py"));
        assert!(looks_like_path("/workspace/train.py"));
        assert!(looks_like_path("./scripts/run"));
        assert!(!looks_like_path("print('hi')"));
        assert!(!looks_like_path("import os\nprint(1)"));
        assert!(!looks_like_path("https://example.com/train.py"));
    }
}
