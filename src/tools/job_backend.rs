//! The contract both job tools share (`cluster_jobs` on Kubernetes, `hf_jobs` on Hugging
//! Face): what to run, what a job looks like, what a platform must offer, and how cost and
//! training progress are read.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde_json::Value;

/// The script or command a job runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Program {
    /// A Python script with the packages it needs and its arguments.
    Python {
        script: Script,
        dependencies: Vec<String>,
        /// Python version for runners that can choose one (uv's `--python`).
        python: Option<String>,
        args: Vec<String>,
    },
    /// A command and its arguments, run as is in the image.
    Command(Vec<String>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Script {
    /// Source code.
    Code(String),
    /// A URL the runner fetches.
    Url(String),
}

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRequest {
    pub program: Program,
    pub image: Option<String>,
    pub flavor: Option<String>,
    pub timeout_secs: u64,
    pub env: BTreeMap<String, String>,
    /// Keeps running when the session is suspended, fails or is deleted.
    pub detach: bool,
    /// The platform account to run under, where the platform has several (HF namespaces).
    pub namespace: Option<String>,
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
    /// Where a person can look at it (the HF job page); the Job name says it on a cluster.
    pub url: Option<String>,
    /// The platform account it runs under (HF namespace).
    pub namespace: Option<String>,
    /// Started with `detach: true`: outlives the session's suspension, failure, deletion.
    pub detach: bool,
}

pub const FINAL_STATES: [&str; 4] = ["Succeeded", "Failed", "DeadlineExceeded", "Cancelled"];

impl JobInfo {
    pub fn is_finished(&self) -> bool {
        FINAL_STATES.contains(&self.state.as_str())
    }
}

/// Hardware a job can ask for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Flavor {
    pub name: String,
    pub description: String,
    /// Price per hour of running time, when the platform or the operator says.
    pub usd_per_hour: Option<f64>,
    /// Has GPUs (or other accelerators).
    pub accelerated: bool,
}

/// A scheduled job, as the platform reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScheduleInfo {
    pub id: String,
    pub schedule: String,
    pub suspended: bool,
    pub next_run_at: Option<String>,
    pub last_job: Option<String>,
    pub command: String,
    /// The platform namespace it belongs to.
    pub namespace: Option<String>,
    /// Created with `detach: true`.
    pub detach: bool,
}

/// One line of a job's output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogLine {
    /// When the platform says it was printed (RFC 3339).
    pub at: Option<String>,
    pub text: String,
}

impl LogLine {
    pub fn unstamped(text: &str) -> Self {
        LogLine {
            at: None,
            text: text.to_string(),
        }
    }
}

/// The lines' text, one per line.
pub fn log_text(lines: &[LogLine]) -> String {
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    texts.join("\n")
}

#[async_trait]
pub trait JobBackend: Send + Sync {
    /// `cluster` or `huggingface`, as in `status.jobs[].backend`.
    fn kind(&self) -> &'static str;
    async fn run(&self, request: JobRequest) -> Result<JobInfo, String>;
    /// Jobs to show for `ps`; only the live ones unless `all`.
    async fn list(&self, namespace: Option<&str>, all: bool) -> Result<Vec<JobInfo>, String>;
    async fn inspect(&self, id: &str, namespace: Option<&str>) -> Result<JobInfo, String>;
    /// The job's output so far (stdout and stderr), one line per entry.
    async fn logs(&self, id: &str, namespace: Option<&str>) -> Result<String, String>;
    /// The last `lines` lines of the job's output, stamped with when they were printed
    /// where the platform says: what following its progress reads, as a long job prints
    /// more than one look should fetch. Metrics seen in earlier looks stay in status, so
    /// only what was printed since matters.
    async fn log_tail(
        &self,
        id: &str,
        namespace: Option<&str>,
        lines: usize,
    ) -> Result<Vec<LogLine>, String> {
        let all = self.logs(id, namespace).await?;
        let kept: Vec<&str> = all.lines().collect();
        Ok(kept[kept.len().saturating_sub(lines)..]
            .iter()
            .map(|l| LogLine::unstamped(l))
            .collect())
    }
    /// What one look of the follower needs: the job's state, and the end of its output
    /// (or why that could not be read). Backends that can share the lookups override it.
    async fn look(
        &self,
        id: &str,
        namespace: Option<&str>,
        lines: usize,
    ) -> Result<(JobInfo, Result<Vec<LogLine>, String>), String> {
        let info = self.inspect(id, namespace).await?;
        Ok((info, self.log_tail(id, namespace, lines).await))
    }
    async fn cancel(&self, id: &str, namespace: Option<&str>) -> Result<(), String>;
    /// The hardware on offer, for validation, descriptions and cost.
    async fn flavors(&self) -> Result<Vec<Flavor>, String>;
    /// The flavor a run without `hardware_flavor` gets.
    fn default_flavor(&self) -> Option<String>;
    /// Names of some flavors, for the tool's description (which cannot wait for the
    /// platform's list).
    fn flavor_hint(&self) -> String;
    /// Scheduled (cron) jobs, where the platform has them.
    fn scheduler(&self) -> Option<&dyn JobScheduler> {
        None
    }
}

#[async_trait]
pub trait JobScheduler: Send + Sync {
    async fn create(&self, request: JobRequest, schedule: &str) -> Result<ScheduleInfo, String>;
    async fn list(&self, namespace: Option<&str>, all: bool) -> Result<Vec<ScheduleInfo>, String>;
    async fn inspect(&self, id: &str, namespace: Option<&str>) -> Result<ScheduleInfo, String>;
    async fn delete(&self, id: &str, namespace: Option<&str>) -> Result<(), String>;
    /// Suspends (`suspend`) or resumes (`!suspend`) the schedule.
    async fn set_suspended(
        &self,
        id: &str,
        namespace: Option<&str>,
        suspend: bool,
    ) -> Result<(), String>;
}

/// ml-intern's default job timeout.
pub const DEFAULT_TIMEOUT_SECS: u64 = 30 * 60;
/// Longest timeout a job may ask for.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// "300", 300, "300s", "5m", "1.5h", "1d" as seconds (the Hugging Face client's forms).
pub fn parse_timeout(v: &Value) -> Result<u64, String> {
    let text = match v {
        Value::Number(n) => {
            return n
                .as_f64()
                .filter(|f| *f > 0.0)
                .map(|f| f.round() as u64)
                .ok_or("timeout must be a positive number of seconds".into());
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

/// The most a run can cost: its flavor's hourly price for its whole timeout.
pub fn cost_ceiling_usd(usd_per_hour: f64, timeout_secs: u64) -> f64 {
    usd_per_hour * timeout_secs as f64 / 3600.0
}

/// The latest value of a metric a job printed.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    pub name: String,
    pub value: String,
    pub step: Option<i64>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        assert!(parse_timeout(&json!(-3)).is_err());
    }

    #[test]
    fn the_ceiling_is_the_price_for_the_whole_timeout() {
        assert!((cost_ceiling_usd(2.5, 5400) - 3.75).abs() < 1e-9);
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
}
