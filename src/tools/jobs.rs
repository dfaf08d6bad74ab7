//! `cluster_jobs` and `hf_jobs`: training and compute steps as jobs beside the sandbox, with
//! the contract of ml-intern's `hf_jobs` (run, ps, logs, inspect, cancel, and scheduled
//! jobs where the platform has them). The platform is behind `JobBackend`.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

pub use super::job_backend::*;
use super::{FileSystem, Tool, ToolFailure, ToolOutput};
use crate::llm::ToolSpec;

pub const CLUSTER_JOBS_TOOL: &str = "cluster_jobs";
pub const HF_JOBS_TOOL: &str = "hf_jobs";
/// Log text returned by `logs` (the tail is kept).
const LOGS_MAX_CHARS: usize = 25_000;
/// `logs` shows the end of a job's output, where its current progress is.
const LOGS_MAX_LINES: usize = 2_000;
/// Log lines returned by `run`.
const FIRST_LINES: usize = 20;

pub struct JobsTool {
    /// `cluster_jobs` or `hf_jobs`.
    pub name: &'static str,
    pub backend: Arc<dyn JobBackend>,
    /// Where a script named by path is read from.
    pub files: Option<Arc<dyn FileSystem>>,
    /// Told what the tool learns about jobs (for the session's status).
    pub observed: Option<tokio::sync::mpsc::Sender<JobObservation>>,
}

/// What the tool saw of a job.
#[derive(Clone, Debug, PartialEq)]
pub enum JobObservation {
    State {
        backend: &'static str,
        info: JobInfo,
        usd_per_hour: Option<f64>,
    },
    Metrics {
        id: String,
        metrics: Vec<Metric>,
    },
    /// Output a look found that was printed after what was shown before.
    Log {
        backend: &'static str,
        id: String,
        lines: Vec<LogLine>,
    },
    /// A look at all unfinished jobs is over.
    LookDone,
    /// The agent created a scheduled job.
    ScheduleCreated {
        backend: &'static str,
        info: ScheduleInfo,
    },
    /// What the platform says of a scheduled job now (only ones the session created are
    /// kept).
    ScheduleSeen {
        info: ScheduleInfo,
    },
    ScheduleSuspended {
        id: String,
        suspended: bool,
    },
    ScheduleDeleted {
        id: String,
    },
}

#[derive(Deserialize)]
struct Args {
    operation: String,
    #[serde(default)]
    script: Option<String>,
    #[serde(default)]
    script_args: Vec<String>,
    #[serde(default)]
    dependencies: Vec<String>,
    #[serde(default)]
    python: Option<String>,
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
    scheduled_job_id: Option<String>,
    #[serde(default)]
    schedule: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    detach: bool,
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
    for (label, value) in [
        ("Reason", &job.message),
        ("Started", &job.started_at),
        ("Finished", &job.finished_at),
        ("View at", &job.url),
    ] {
        if let Some(v) = value {
            text.push_str(&format!("\n{label}: {v}"));
        }
    }
    text
}

/// A markdown table, as the `ps` operations answer.
fn markdown_table<const N: usize>(
    headers: [&str; N],
    rows: impl IntoIterator<Item = [String; N]>,
) -> String {
    let mut table = format!("| {} |\n|{}\n", headers.join(" | "), "---|".repeat(N));
    for row in rows {
        table.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    table
}

fn describe_schedule(s: &ScheduleInfo) -> String {
    let mut text = format!(
        "Scheduled job: {}\nSchedule: {}\nSuspended: {}\nCommand: {}",
        s.id, s.schedule, s.suspended, s.command
    );
    if let Some(n) = &s.next_run_at {
        text.push_str(&format!("\nNext run: {n}"));
    }
    if let Some(l) = &s.last_job {
        text.push_str(&format!("\nLast job: {l}"));
    }
    text
}

/// The operation, normalised ("Scheduled  Run" is "scheduled run").
pub fn operation_name(raw: &str) -> String {
    raw.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

impl JobsTool {
    async fn tell(&self, observation: JobObservation) {
        if let Some(tx) = &self.observed {
            // Status bookkeeping only; the tool's answer does not depend on it.
            let _ = tx.send(observation).await;
        }
    }

    async fn tell_state(&self, info: &JobInfo) {
        let usd_per_hour = self.price(&info.flavor).await;
        self.tell(JobObservation::State {
            backend: self.backend.kind(),
            info: info.clone(),
            usd_per_hour,
        })
        .await;
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

    async fn price(&self, flavor: &str) -> Option<f64> {
        let flavors = self.backend.flavors().await.ok()?;
        flavors.iter().find(|f| f.name == flavor)?.usd_per_hour
    }

    fn job_id(args: &Args) -> Result<String, String> {
        args.job_id
            .clone()
            .filter(|j| !j.trim().is_empty())
            .ok_or_else(|| format!("{} needs job_id", args.operation))
    }

    fn scheduled_job_id(args: &Args) -> Result<String, String> {
        args.scheduled_job_id
            .clone()
            .or_else(|| args.job_id.clone())
            .filter(|j| !j.trim().is_empty())
            .ok_or_else(|| format!("{} needs scheduled_job_id", args.operation))
    }

    /// The request `run` (or `scheduled run`) submits, with its flavor checked against
    /// what the platform offers. Also returns the flavor's price, when known.
    async fn request(&self, args: &Args) -> Result<(JobRequest, Option<f64>), String> {
        let timeout_secs = match &args.timeout {
            None => DEFAULT_TIMEOUT_SECS,
            Some(v) => parse_timeout(v)?,
        };
        if timeout_secs > MAX_TIMEOUT_SECS {
            return Err(format!("timeout is above the {MAX_TIMEOUT_SECS}s limit"));
        }
        let flavor = args
            .hardware_flavor
            .clone()
            .or_else(|| self.backend.default_flavor());
        let flavors = self.backend.flavors().await?;
        let mut price = None;
        if let Some(f) = &flavor
            && !flavors.is_empty()
        {
            match flavors.iter().find(|x| &x.name == f) {
                Some(x) => price = x.usd_per_hour,
                None => {
                    return Err(format!(
                        "unknown hardware_flavor {f:?}; choose one of: {}",
                        flavors
                            .iter()
                            .map(|x| x.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
        }
        let request = JobRequest {
            program: self.program(args).await?,
            image: args.image.clone(),
            flavor,
            timeout_secs,
            env: args.env.clone(),
            detach: args.detach,
            namespace: args.namespace.clone(),
        };
        Ok((request, price))
    }

    async fn run(&self, args: &Args) -> Result<String, String> {
        let (request, price) = self.request(args).await?;
        let timeout_secs = request.timeout_secs;
        let job = self.backend.run(request).await?;
        self.tell_state(&job).await;
        let logs = self
            .backend
            .logs(&job.id, job.namespace.as_deref())
            .await
            .unwrap_or_default();
        self.tell_metrics(&job.id, &logs).await;
        let first: Vec<&str> = logs.lines().take(FIRST_LINES).collect();
        let cost = match price {
            Some(p) => format!(
                "\nEstimated cost: ${p:.2}/h, at most ${:.2} for the {timeout_secs}s timeout",
                cost_ceiling_usd(p, timeout_secs)
            ),
            None => String::new(),
        };
        Ok(format!(
            "Job submitted.\n{}{cost}\n\nFirst log lines:\n{}\n\nThe job runs on its own: \
             follow it with operation=logs or inspect and job_id={}.",
            describe(&job),
            if first.is_empty() {
                "(none yet)".to_string()
            } else {
                first.join("\n")
            },
            job.id
        ))
    }

    async fn ps(&self, args: &Args) -> Result<String, String> {
        let mut jobs = self
            .backend
            .list(args.namespace.as_deref(), args.all)
            .await?;
        if let Some(filter) = args.status.as_deref().map(str::to_lowercase) {
            jobs.retain(|j| j.state.to_lowercase().contains(&filter));
        }
        if jobs.is_empty() {
            return Ok(if args.all {
                "No jobs.".to_string()
            } else {
                "No running jobs (all=true lists finished ones too).".to_string()
            });
        }
        let rows = jobs.into_iter().map(|j| {
            [
                j.id,
                j.flavor,
                j.state,
                j.started_at.unwrap_or_default(),
                j.finished_at.unwrap_or_default(),
            ]
        });
        Ok(markdown_table(
            ["JOB ID", "FLAVOR", "STATE", "STARTED", "FINISHED"],
            rows,
        ))
    }

    async fn logs(&self, args: &Args) -> Result<String, String> {
        let id = Self::job_id(args)?;
        let ns = args.namespace.as_deref();
        let logs = log_text(&self.backend.log_tail(&id, ns, LOGS_MAX_LINES).await?);
        self.tell_metrics(&id, &logs).await;
        let logs = super::bash::strip_ansi(&logs);
        let total = logs.chars().count();
        Ok(if total > LOGS_MAX_CHARS {
            let tail: String = logs.chars().skip(total - LOGS_MAX_CHARS).collect();
            format!("[… earlier output not shown]\n{tail}")
        } else if logs.lines().count() >= LOGS_MAX_LINES {
            format!("[… earlier output not shown]\n{logs}")
        } else if logs.is_empty() {
            "(no output yet)".into()
        } else {
            logs
        })
    }

    async fn inspect(&self, args: &Args) -> Result<String, String> {
        let job = self
            .backend
            .inspect(&Self::job_id(args)?, args.namespace.as_deref())
            .await?;
        self.tell_state(&job).await;
        Ok(describe(&job))
    }

    async fn cancel(&self, args: &Args) -> Result<String, String> {
        let id = Self::job_id(args)?;
        self.backend.cancel(&id, args.namespace.as_deref()).await?;
        if let Ok(job) = self.backend.inspect(&id, args.namespace.as_deref()).await {
            self.tell_state(&job).await;
        }
        Ok(format!("Job {id} cancelled."))
    }

    async fn scheduled(&self, op: &str, args: &Args) -> Result<String, String> {
        let scheduler = self
            .backend
            .scheduler()
            .ok_or_else(|| format!("{} has no scheduled jobs", self.name))?;
        let ns = args.namespace.as_deref();
        match op {
            "scheduled run" => {
                let schedule = args
                    .schedule
                    .clone()
                    .filter(|s| !s.trim().is_empty())
                    .ok_or("scheduled run needs schedule, e.g. \"@daily\" or \"0 9 * * 1\"")?;
                let (request, _) = self.request(args).await?;
                let created = scheduler.create(request, &schedule).await?;
                self.tell(JobObservation::ScheduleCreated {
                    backend: self.backend.kind(),
                    info: created.clone(),
                })
                .await;
                Ok(format!(
                    "Scheduled job created.\n{}",
                    describe_schedule(&created)
                ))
            }
            "scheduled ps" => {
                let list = scheduler.list(ns, args.all).await?;
                for info in &list {
                    self.tell(JobObservation::ScheduleSeen { info: info.clone() })
                        .await;
                }
                if list.is_empty() {
                    return Ok("No scheduled jobs.".into());
                }
                let rows = list.into_iter().map(|s| {
                    [
                        s.id,
                        s.schedule,
                        s.suspended.to_string(),
                        s.next_run_at.unwrap_or_default(),
                        crate::text::truncate_chars(&s.command, 60),
                    ]
                });
                Ok(markdown_table(
                    ["ID", "SCHEDULE", "SUSPENDED", "NEXT RUN", "COMMAND"],
                    rows,
                ))
            }
            "scheduled inspect" => {
                let info = scheduler
                    .inspect(&Self::scheduled_job_id(args)?, ns)
                    .await?;
                self.tell(JobObservation::ScheduleSeen { info: info.clone() })
                    .await;
                Ok(describe_schedule(&info))
            }
            "scheduled delete" => {
                let id = Self::scheduled_job_id(args)?;
                scheduler.delete(&id, ns).await?;
                self.tell(JobObservation::ScheduleDeleted { id: id.clone() })
                    .await;
                Ok(format!("Scheduled job {id} deleted."))
            }
            "scheduled suspend" | "scheduled resume" => {
                let id = Self::scheduled_job_id(args)?;
                let suspend = op == "scheduled suspend";
                scheduler.set_suspended(&id, ns, suspend).await?;
                self.tell(JobObservation::ScheduleSuspended {
                    id: id.clone(),
                    suspended: suspend,
                })
                .await;
                Ok(format!(
                    "Scheduled job {id} {}.",
                    if suspend { "suspended" } else { "resumed" }
                ))
            }
            other => Err(format!("unknown operation {other:?}")),
        }
    }

    async fn program(&self, args: &Args) -> Result<Program, String> {
        match (&args.script, &args.command) {
            (Some(_), Some(_)) => Err("give either script or command, not both".into()),
            (None, None) => {
                Err("run needs a script (Python code or a sandbox path) or a command".into())
            }
            (None, Some(command)) if command.is_empty() => Err("command is empty".into()),
            (None, Some(command)) => Ok(Program::Command(command.clone())),
            (Some(script), None) => {
                let script = if script.starts_with("https://") || script.starts_with("http://") {
                    Script::Url(script.clone())
                } else if looks_like_path(script) {
                    let fs = self
                        .files
                        .as_ref()
                        .ok_or("scripts by path need the sandbox")?;
                    let path = super::files::resolve(script);
                    let bytes = fs
                        .read(&path, None, super::files::EDIT_MAX_BYTES)
                        .await
                        .map_err(|e| format!("cannot read {path} from the sandbox: {e:?}"))?;
                    Script::Code(
                        String::from_utf8(bytes)
                            .map_err(|_| format!("{path} is not UTF-8 text"))?,
                    )
                } else {
                    Script::Code(script.clone())
                };
                Ok(Program::Python {
                    script,
                    dependencies: args.dependencies.clone(),
                    python: args.python.clone(),
                    args: args.script_args.clone(),
                })
            }
        }
    }

    fn operations(&self) -> Vec<&'static str> {
        let mut ops = vec!["run", "ps", "logs", "inspect", "cancel"];
        if self.backend.scheduler().is_some() {
            ops.extend([
                "scheduled run",
                "scheduled ps",
                "scheduled inspect",
                "scheduled delete",
                "scheduled suspend",
                "scheduled resume",
            ]);
        }
        ops
    }

    fn description(&self) -> String {
        let flavors = self.backend.flavor_hint();
        if self.name == HF_JOBS_TOOL {
            format!(
                "Run training or compute on Hugging Face Jobs (billed hardware). \
                 operation=run submits and returns at once with the job id, its page and \
                 first log lines; follow it with ps, logs (the end of its output) and inspect; \
                 cancel stops it. A \
                 script is Python code, a path in the sandbox or a URL, run with uv and the \
                 given dependencies (image ghcr.io/astral-sh/uv:python3.12-bookworm); or give \
                 command (argv) and image (default python:3.12). HF_TOKEN is set in the job. \
                 Scheduled jobs (schedule: cron or @hourly/@daily/@weekly/@monthly) repeat a \
                 run. Print progress as JSON lines like {{\"metric\": \"loss\", \"value\": 0.3, \
                 \"step\": 10}}. Test on a small sample in the sandbox first, and submit one \
                 job before a sweep. Flavors: {flavors}."
            )
        } else {
            format!(
                "Run training or compute as a Kubernetes Job on the cluster, beside the \
                 sandbox. operation=run submits and returns at once with the job id and its \
                 first log lines; follow it with ps, logs (the end of its output) and inspect; \
                 cancel stops it. A \
                 script is Python code or a path in the sandbox; or give command (argv) and \
                 image. The job sees the sandbox's /workspace when it is a volume claim. Print \
                 progress as JSON lines like {{\"metric\": \"loss\", \"value\": 0.3, \"step\": 10}}. \
                 Test on a small sample in the sandbox first. Flavors: {flavors}."
            )
        }
    }
}

#[async_trait]
impl Tool for JobsTool {
    fn spec(&self) -> ToolSpec {
        let mut properties = json!({
            "operation": {"type": "string", "enum": self.operations()},
            "script": {"type": "string", "description": "Python code, or a path to a .py file in the sandbox."},
            "script_args": {"type": "array", "items": {"type": "string"}},
            "dependencies": {"type": "array", "items": {"type": "string"}, "description": "Python packages the script needs."},
            "command": {"type": "array", "items": {"type": "string"}, "description": "Command and arguments, instead of script."},
            "image": {"type": "string", "description": "Container image."},
            "hardware_flavor": {"type": "string", "description": "Hardware flavor."},
            "timeout": {"type": "string", "description": "Longest run time, e.g. \"30m\", \"2h\" (default 30m)."},
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "job_id": {"type": "string", "description": "For logs, inspect and cancel."},
            "all": {"type": "boolean", "description": "ps: finished jobs too."},
            "status": {"type": "string", "description": "ps: only jobs whose state contains this."},
            "detach": {"type": "boolean", "description": "Keep the job (or schedule) running when the session is suspended, fails or is deleted (default false)."}
        });
        if self.backend.scheduler().is_some() {
            properties["scheduled_job_id"] = json!({"type": "string", "description": "For scheduled inspect, delete, suspend and resume."});
            properties["schedule"] = json!({"type": "string", "description": "scheduled run: cron (\"0 9 * * 1\") or @hourly, @daily, @weekly, @monthly."});
            properties["namespace"] = json!({"type": "string", "description": "User or organization to run under (default: the token's user)."});
            properties["python"] =
                json!({"type": "string", "description": "Python version for uv, e.g. \"3.12\"."});
        }
        ToolSpec {
            name: self.name.into(),
            description: self.description(),
            parameters: json!({
                "type": "object",
                "properties": properties,
                "required": ["operation"]
            }),
        }
    }

    async fn call(&self, arguments: Value) -> Result<ToolOutput, ToolFailure> {
        let args: Args = match Args::deserialize(&arguments) {
            Ok(a) => a,
            Err(e) => {
                return Ok(ToolOutput::error(format!(
                    "ERROR: invalid arguments for {}: {e}.",
                    self.name
                )));
            }
        };
        let op = operation_name(&args.operation);
        let result = match op.as_str() {
            "run" => self.run(&args).await,
            "ps" => self.ps(&args).await,
            "logs" => self.logs(&args).await,
            "inspect" => self.inspect(&args).await,
            "cancel" => self.cancel(&args).await,
            other if other.starts_with("scheduled ") && self.operations().contains(&other) => {
                self.scheduled(other, &args).await
            }
            other => Err(format!(
                "unknown operation {other:?}; use {}",
                self.operations().join(", ")
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
    fn paths_and_code_are_told_apart() {
        assert!(looks_like_path("train.py"));
        assert!(looks_like_path("/workspace/train.py"));
        assert!(looks_like_path("./scripts/run"));
        assert!(!looks_like_path("print('hi')"));
        assert!(!looks_like_path("import os\nprint(1)"));
        assert!(!looks_like_path("https://example.com/train.py"));
    }

    #[test]
    fn operations_are_normalised() {
        let args: Args =
            serde_json::from_value(json!({"operation": " Scheduled   Suspend "})).unwrap();
        assert_eq!(operation_name(&args.operation), "scheduled suspend");
    }
}
