//! `hf_jobs` on Hugging Face Jobs: runs as ml-intern builds them (uv for Python scripts,
//! its environment defaults, the session's token as the job's `HF_TOKEN` secret), jobs
//! labelled with the session, flavors and prices from the Hub's hardware list.

use std::collections::BTreeMap;

use async_trait::async_trait;
use base64::Engine;
use tokio::sync::OnceCell;

use crate::hf::HfJobsClient;
use crate::hf::job_logs::LogOptions;
use crate::hf::jobs_api::{Hardware, HfError, HubJob, JobSpec, ScheduledJob, Whoami};
use crate::tools::jobs::{
    Flavor, JobBackend, JobInfo, JobRequest, JobScheduler, LogLine, Program, ScheduleInfo, Script,
    log_text,
};

/// The image Python scripts run in (uv with Python 3.12).
pub const UV_IMAGE: &str = "ghcr.io/astral-sh/uv:python3.12-bookworm";
/// The image commands run in when none is named.
pub const DEFAULT_IMAGE: &str = "python:3.12";
pub const DEFAULT_FLAVOR: &str = "cpu-basic";
/// Job label naming the session (Hub label keys allow `[A-Za-z0-9._-]`).
pub const SESSION_LABEL: &str = "ml-intern-session";
pub const DETACH_LABEL: &str = "ml-intern-detach";

pub struct HfJobs {
    pub client: HfJobsClient,
    /// The session's token, given to jobs as their `HF_TOKEN` secret.
    token: String,
    session: String,
    /// The namespace runs go to when the call names none (else the token's user).
    default_namespace: Option<String>,
    pub log_options: LogOptions,
    whoami: OnceCell<Whoami>,
    hardware: OnceCell<Vec<Hardware>>,
}

fn text(e: HfError) -> String {
    if e.is_billing() {
        format!(
            "{e}. Hugging Face Jobs are billed to the namespace's credits (separate from a PRO \
             subscription); add credits at https://huggingface.co/settings/billing or run under \
             another namespace"
        )
    } else {
        e.to_string()
    }
}

/// Hub label values allow `[A-Za-z0-9._-]`, 100 characters.
fn label_value(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(100)
        .collect()
}

/// ml-intern's job environment: quiet progress bars, fast downloads.
fn default_env() -> BTreeMap<String, String> {
    [
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TQDM_DISABLE", "1"),
        ("TRANSFORMERS_VERBOSITY", "warning"),
        ("HF_HUB_ENABLE_HF_TRANSFER", "1"),
        ("UV_NO_PROGRESS", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The image and command of `program`, as ml-intern's `hf_jobs` builds them: Python through
/// `uv run --with <dep>… [-p <py>]`, inline code piped in base64 so no quoting can break it.
pub fn image_and_command(program: &Program, image: Option<&str>) -> (String, Vec<String>) {
    match program {
        Program::Command(argv) => (image.unwrap_or(DEFAULT_IMAGE).to_string(), argv.clone()),
        Program::Python {
            script,
            dependencies,
            python,
            args,
        } => {
            let mut uv = vec!["uv".to_string(), "run".to_string()];
            let mut deps: Vec<&str> = dependencies.iter().map(String::as_str).collect();
            if !deps.contains(&"hf-transfer") {
                deps.push("hf-transfer");
            }
            for d in deps {
                uv.push("--with".into());
                uv.push(d.to_string());
            }
            if let Some(p) = python {
                uv.push("-p".into());
                uv.push(p.clone());
            }
            let image = image.unwrap_or(UV_IMAGE).to_string();
            match script {
                Script::Url(url) => {
                    uv.push(url.clone());
                    uv.extend(args.iter().cloned());
                    (image, uv)
                }
                Script::Code(code) => {
                    uv.push("-".into());
                    uv.extend(args.iter().map(|a| crate::text::shell_quote(a)));
                    let encoded = base64::engine::general_purpose::STANDARD.encode(code);
                    (
                        image,
                        vec![
                            "/bin/sh".into(),
                            "-lc".into(),
                            format!("echo {encoded} | base64 -d | {}", uv.join(" ")),
                        ],
                    )
                }
            }
        }
    }
}

impl HfJobs {
    pub fn new(
        client: HfJobsClient,
        token: String,
        session: &str,
        default_namespace: Option<String>,
    ) -> Self {
        HfJobs {
            client,
            token,
            session: session.to_string(),
            default_namespace,
            log_options: LogOptions::snapshot(),
            whoami: OnceCell::new(),
            hardware: OnceCell::new(),
        }
    }

    /// The namespace to use: the requested one if the token may use it, else the
    /// session's default, else the token's user.
    async fn namespace(&self, requested: Option<&str>) -> Result<String, String> {
        let who = self
            .whoami
            .get_or_try_init(|| self.client.whoami())
            .await
            .map_err(|e| format!("cannot tell whom the Hugging Face token belongs to: {e}"))?;
        let Some(wanted) = requested.or(self.default_namespace.as_deref()) else {
            return Ok(who.name.clone());
        };
        let allowed: Vec<&str> = std::iter::once(who.name.as_str())
            .chain(who.orgs.iter().map(|o| o.name.as_str()))
            .collect();
        if allowed.contains(&wanted) {
            Ok(wanted.to_string())
        } else {
            Err(format!(
                "the token cannot run jobs in namespace {wanted:?}; it may use: {}",
                allowed.join(", ")
            ))
        }
    }

    fn spec(&self, request: &JobRequest) -> JobSpec {
        let (image, command) = image_and_command(&request.program, request.image.as_deref());
        let mut environment = default_env();
        environment.extend(request.env.clone());
        let mut labels = BTreeMap::from([(SESSION_LABEL.to_string(), label_value(&self.session))]);
        if request.detach {
            labels.insert(DETACH_LABEL.into(), "true".into());
        }
        JobSpec {
            docker_image: Some(image),
            command,
            environment,
            secrets: BTreeMap::from([
                ("HF_TOKEN".to_string(), self.token.clone()),
                ("HUGGINGFACE_HUB_TOKEN".to_string(), self.token.clone()),
            ]),
            flavor: request
                .flavor
                .clone()
                .unwrap_or_else(|| DEFAULT_FLAVOR.into()),
            timeout_seconds: Some(request.timeout_secs),
            labels,
            ..Default::default()
        }
    }

    fn info(&self, job: HubJob, namespace: &str) -> JobInfo {
        let state = match job.status.stage.as_str() {
            "SCHEDULING" => "Pending",
            "RUNNING" | "UPDATING" => "Running",
            "COMPLETED" => "Succeeded",
            "ERROR" => "Failed",
            "CANCELED" | "DELETED" => "Cancelled",
            other => other,
        };
        let owner = job
            .owner
            .as_ref()
            .map(|o| o.name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| namespace.to_string());
        let detach = job
            .labels
            .as_ref()
            .is_some_and(|l| l.get(DETACH_LABEL).is_some_and(|v| v == "true"));
        JobInfo {
            url: Some(format!(
                "{}/jobs/{owner}/{}",
                self.client.base_url(),
                job.id
            )),
            id: job.id,
            flavor: job.flavor.unwrap_or_default(),
            state: state.to_string(),
            message: job.status.message,
            started_at: job.started_at,
            finished_at: job.finished_at,
            namespace: Some(owner),
            detach,
        }
    }

    fn schedule_info(s: ScheduledJob, namespace: &str) -> ScheduleInfo {
        let detach = s.job_spec["labels"][DETACH_LABEL].as_str() == Some("true");
        let command = s.job_spec["command"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        ScheduleInfo {
            id: s.id,
            schedule: s.schedule,
            suspended: s.suspend,
            next_run_at: s.status.next_job_run_at,
            last_job: s.status.last_job.map(|l| l.id),
            command,
            namespace: Some(namespace.to_string()),
            detach,
        }
    }
}

#[async_trait]
impl JobBackend for HfJobs {
    fn kind(&self) -> &'static str {
        "huggingface"
    }

    async fn run(&self, request: JobRequest) -> Result<JobInfo, String> {
        let ns = self.namespace(request.namespace.as_deref()).await?;
        let job = self
            .client
            .run(&ns, &self.spec(&request))
            .await
            .map_err(text)?;
        Ok(self.info(job, &ns))
    }

    async fn list(&self, namespace: Option<&str>, all: bool) -> Result<Vec<JobInfo>, String> {
        let ns = self.namespace(namespace).await?;
        let jobs = self.client.list(&ns, all).await.map_err(text)?;
        Ok(jobs.into_iter().map(|j| self.info(j, &ns)).collect())
    }

    async fn inspect(&self, id: &str, namespace: Option<&str>) -> Result<JobInfo, String> {
        let ns = self.namespace(namespace).await?;
        let job = self.client.inspect(&ns, id).await.map_err(text)?;
        Ok(self.info(job, &ns))
    }

    async fn logs(&self, id: &str, namespace: Option<&str>) -> Result<String, String> {
        let ns = self.namespace(namespace).await?;
        let logs = self
            .client
            .logs(&ns, id, &self.log_options)
            .await
            .map_err(text)?;
        Ok(log_text(&logs.lines))
    }

    async fn log_tail(
        &self,
        id: &str,
        namespace: Option<&str>,
        lines: usize,
    ) -> Result<Vec<LogLine>, String> {
        let ns = self.namespace(namespace).await?;
        let options = LogOptions {
            tail: Some(lines),
            follow: false,
            ..self.log_options.clone()
        };
        let logs = self.client.logs(&ns, id, &options).await.map_err(text)?;
        Ok(logs.lines)
    }

    async fn cancel(&self, id: &str, namespace: Option<&str>) -> Result<(), String> {
        let ns = self.namespace(namespace).await?;
        self.client.cancel(&ns, id).await.map_err(text)
    }

    async fn flavors(&self) -> Result<Vec<Flavor>, String> {
        let hardware = self
            .hardware
            .get_or_try_init(|| self.client.hardware())
            .await
            .map_err(|e| format!("cannot list Hugging Face hardware: {e}"))?;
        Ok(hardware
            .iter()
            .map(|h| Flavor {
                name: h.name.clone(),
                description: h.describe(),
                usd_per_hour: h.usd_per_hour(),
                accelerated: h.has_accelerator(),
            })
            .collect())
    }

    fn default_flavor(&self) -> Option<String> {
        Some(DEFAULT_FLAVOR.into())
    }

    fn flavor_hint(&self) -> String {
        "cpu-basic (default), cpu-upgrade, t4-small, t4-medium, l4x1, a10g-small, a10g-large, \
         a100-large, h200 and more (checked against the Hub's hardware list, which has prices)"
            .into()
    }

    fn scheduler(&self) -> Option<&dyn JobScheduler> {
        Some(self)
    }
}

#[async_trait]
impl JobScheduler for HfJobs {
    async fn create(&self, request: JobRequest, schedule: &str) -> Result<ScheduleInfo, String> {
        let ns = self.namespace(request.namespace.as_deref()).await?;
        let created = self
            .client
            .schedule(&ns, &self.spec(&request), schedule)
            .await
            .map_err(text)?;
        Ok(Self::schedule_info(created, &ns))
    }

    async fn list(&self, namespace: Option<&str>, all: bool) -> Result<Vec<ScheduleInfo>, String> {
        let ns = self.namespace(namespace).await?;
        let list = self.client.scheduled_list(&ns).await.map_err(text)?;
        Ok(list
            .into_iter()
            .filter(|s| all || !s.suspend)
            .map(|s| Self::schedule_info(s, &ns))
            .collect())
    }

    async fn inspect(&self, id: &str, namespace: Option<&str>) -> Result<ScheduleInfo, String> {
        let ns = self.namespace(namespace).await?;
        let s = self.client.scheduled_inspect(&ns, id).await.map_err(text)?;
        Ok(Self::schedule_info(s, &ns))
    }

    async fn delete(&self, id: &str, namespace: Option<&str>) -> Result<(), String> {
        let ns = self.namespace(namespace).await?;
        self.client.scheduled_delete(&ns, id).await.map_err(text)
    }

    async fn set_suspended(
        &self,
        id: &str,
        namespace: Option<&str>,
        suspend: bool,
    ) -> Result<(), String> {
        let ns = self.namespace(namespace).await?;
        let action = if suspend { "suspend" } else { "resume" };
        self.client
            .scheduled_action(&ns, id, action)
            .await
            .map_err(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_python_is_piped_to_uv_in_base64() {
        let program = Program::Python {
            script: Script::Code("print('hi')\n".into()),
            dependencies: vec!["numpy".into()],
            python: None,
            args: vec!["--lr".into(), "it's".into()],
        };
        let (image, command) = image_and_command(&program, None);
        assert_eq!(image, UV_IMAGE);
        assert_eq!(command[..2], ["/bin/sh".to_string(), "-lc".to_string()]);
        assert_eq!(
            command[2],
            "echo cHJpbnQoJ2hpJykK | base64 -d | uv run --with numpy --with hf-transfer - --lr 'it'\\''s'"
        );
        let url = Program::Python {
            script: Script::Url("https://x/t.py".into()),
            dependencies: vec![],
            python: Some("3.11".into()),
            args: vec![],
        };
        assert_eq!(
            image_and_command(&url, Some("my/img")).1,
            [
                "uv",
                "run",
                "--with",
                "hf-transfer",
                "-p",
                "3.11",
                "https://x/t.py"
            ]
        );
        let cmd = Program::Command(vec!["nvidia-smi".into()]);
        assert_eq!(image_and_command(&cmd, None).0, DEFAULT_IMAGE);
    }
}
