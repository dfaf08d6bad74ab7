//! `cluster_jobs` on Kubernetes: each run is a `batch/v1` Job owned by the session, with the
//! sandbox's hardening, its hardware from the presets, and its deadline as
//! `activeDeadlineSeconds`.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, PersistentVolumeClaimVolumeSource, Pod, PodSpec,
    PodTemplateSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams, PropagationPolicy};

use super::hardware::HardwarePresets;
use super::sandbox_pod::kube_error_text;
use super::sandbox_template::{
    SandboxSettings, hardened_container_security, hardened_pod_security, label_value,
    merged_resources,
};
use super::{MANAGED_BY_LABEL, SESSION_LABEL};
use crate::store::configmap_log::SESSION_UID_LABEL;
use crate::tools::jobs::{Flavor, JobBackend, JobInfo, JobRequest, LogLine, Program, Script};

const JOB_CONTAINER: &str = "job";
use crate::tools::bash::DEFAULT_WORK_DIR as WORKSPACE_DIR;
/// A job started with `detach: true` keeps running when its session is suspended.
pub const DETACH_LABEL: &str = "ml-intern.io/detach";
/// Log bytes fetched per call.
const LOG_LIMIT_BYTES: i64 = 4 * 1024 * 1024;

pub struct ClusterJobs {
    pub jobs: Api<Job>,
    pub pods: Api<Pod>,
    pub session: String,
    pub namespace: String,
    pub owner: OwnerReference,
    pub presets: Arc<HardwarePresets>,
    /// The session's sandbox settings: image, pull policy, env and placement by default.
    pub base: SandboxSettings,
    /// Kueue LocalQueue the jobs are submitted to.
    pub queue: Option<String>,
}

/// Kueue admits Jobs carrying this label through the named LocalQueue.
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// How long a detached job (not owned by the session, so not deleted with it) is kept
/// after it finishes.
const DETACHED_TTL_SECS: i32 = 7 * 24 * 3600;

/// The session's name (for people; cut to 63 characters) and uid (for selection: two
/// long names may share their first 63 characters, never a uid).
fn labels(session: &str, uid: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            MANAGED_BY_LABEL.0.to_string(),
            MANAGED_BY_LABEL.1.to_string(),
        ),
        ("app.kubernetes.io/component".to_string(), "job".to_string()),
        (SESSION_LABEL.to_string(), label_value(session)),
        (SESSION_UID_LABEL.to_string(), label_value(uid)),
    ])
}

/// Selects a session's jobs, and their pods (which carry the same labels), by the
/// session's uid.
fn jobs_selector(uid: &str) -> String {
    format!(
        "{SESSION_UID_LABEL}={},app.kubernetes.io/component=job",
        label_value(uid)
    )
}

impl ClusterJobs {
    fn job_name(&self) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() ^ (d.as_secs() as u32));
        let session: String = self.session.chars().take(40).collect();
        format!("{}-job-{:08x}", session.trim_end_matches('-'), nanos)
    }

    fn manifest(&self, name: &str, request: &JobRequest) -> Result<Job, String> {
        let mut settings = self.base.clone();
        let flavor = request
            .flavor
            .clone()
            .or_else(|| self.presets.default.clone());
        if let Some(f) = &flavor {
            let preset = self
                .presets
                .get(f)
                .ok_or_else(|| format!("hardware flavor {f:?} is not configured"))?;
            settings = settings.with_preset(preset);
        } else {
            settings.resources = merged_resources(Some(&settings.resources));
        }
        let mut env = settings.env.clone();
        env.extend(request.env.iter().map(|(k, v)| EnvVar {
            name: k.clone(),
            value: Some(v.clone()),
            ..Default::default()
        }));
        env.push(EnvVar {
            name: "HOME".into(),
            value: Some("/tmp".into()),
            ..Default::default()
        });
        let mut labels = labels(&self.session, &self.owner.uid);
        if let Some(f) = &flavor {
            labels.insert("ml-intern.io/flavor".into(), label_value(f));
        }
        if request.detach {
            labels.insert(DETACH_LABEL.into(), "true".into());
        }
        let mut job_labels = labels.clone();
        if let Some(q) = &self.queue {
            job_labels.insert(KUEUE_QUEUE_LABEL.into(), label_value(q));
        }
        // The sandbox's /workspace goes with the job when it is a claim, so a job's results
        // are files the agent can read.
        let mut mounts = vec![VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        }];
        let mut volumes = vec![Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        }];
        if let Some(claim) = &settings.workspace_claim {
            mounts.push(VolumeMount {
                name: "workspace".into(),
                mount_path: WORKSPACE_DIR.into(),
                ..Default::default()
            });
            volumes.push(Volume {
                name: "workspace".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: None,
                }),
                ..Default::default()
            });
        }
        let working_dir = if settings.workspace_claim.is_some() {
            WORKSPACE_DIR
        } else {
            "/tmp"
        };
        Ok(Job {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(self.namespace.clone()),
                labels: Some(job_labels),
                // A detached job outlives its session; the TTL cleans it up instead.
                owner_references: Some(vec![self.owner.clone()]).filter(|_| !request.detach),
                ..Default::default()
            },
            spec: Some(JobSpec {
                backoff_limit: Some(0),
                ttl_seconds_after_finished: Some(DETACHED_TTL_SECS).filter(|_| request.detach),
                active_deadline_seconds: Some(request.timeout_secs as i64),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        restart_policy: Some("Never".into()),
                        automount_service_account_token: Some(false),
                        enable_service_links: Some(false),
                        security_context: Some(hardened_pod_security()),
                        node_selector: Some(settings.node_selector.clone())
                            .filter(|n| !n.is_empty()),
                        tolerations: Some(settings.tolerations.clone()).filter(|t| !t.is_empty()),
                        runtime_class_name: settings.runtime_class_name.clone(),
                        containers: vec![Container {
                            name: JOB_CONTAINER.into(),
                            image: Some(request.image.clone().unwrap_or(settings.image.clone())),
                            image_pull_policy: settings.image_pull_policy.clone(),
                            command: Some(command(&request.program)),
                            working_dir: Some(working_dir.into()),
                            env: Some(env),
                            env_from: Some(settings.env_from.clone()).filter(|e| !e.is_empty()),
                            resources: Some(settings.resources.clone()),
                            security_context: Some(hardened_container_security()),
                            volume_mounts: Some(mounts),
                            ..Default::default()
                        }],
                        volumes: Some(volumes),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            status: None,
        })
    }

    async fn pod_of(&self, job: &str) -> Option<Pod> {
        let pods = self
            .pods
            .list(&ListParams::default().labels(&format!("job-name={job}")))
            .await
            .ok()?;
        pods.items
            .into_iter()
            .max_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0))
    }

    async fn own_job(&self, id: &str) -> Result<Job, String> {
        let job = self
            .jobs
            .get_opt(id)
            .await
            .map_err(|e| kube_error_text(&e))?
            .ok_or_else(|| format!("no job {id}; list them with operation=ps"))?;
        let mine = job
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SESSION_UID_LABEL))
            .is_some_and(|s| *s == label_value(&self.owner.uid));
        if mine {
            Ok(job)
        } else {
            Err(format!("job {id} does not belong to this session"))
        }
    }

    /// The job container's output in `pod` (its last `tail_lines` lines, or from the
    /// start), at most `LOG_LIMIT_BYTES`.
    async fn pod_log(
        &self,
        pod: Option<&Pod>,
        tail_lines: Option<i64>,
        timestamps: bool,
    ) -> Result<String, String> {
        let Some(name) = pod.and_then(|p| p.metadata.name.as_deref()) else {
            return Ok(String::new());
        };
        let params = LogParams {
            container: Some(JOB_CONTAINER.into()),
            limit_bytes: Some(LOG_LIMIT_BYTES),
            tail_lines,
            timestamps,
            ..Default::default()
        };
        match self.pods.logs(name, &params).await {
            Ok(text) => Ok(text),
            // Not started yet: no logs, which is not an error.
            Err(kube::Error::Api(e)) if e.code == 400 => Ok(String::new()),
            Err(e) => Err(kube_error_text(&e)),
        }
    }

    async fn stamped_tail(&self, pod: Option<&Pod>, lines: usize) -> Result<Vec<LogLine>, String> {
        let tail = i64::try_from(lines).unwrap_or(i64::MAX);
        let text = self.pod_log(pod, Some(tail), true).await?;
        Ok(text.lines().map(stamped_line).collect())
    }

    /// `job` as the tool reports it; `pod` is its (latest) pod, if it has one.
    fn info(job: &Job, pod: Option<&Pod>) -> JobInfo {
        let id = job.metadata.name.clone().unwrap_or_default();
        let flavor = job
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("ml-intern.io/flavor").cloned())
            .unwrap_or_else(|| "default".into());
        let status = job.status.clone().unwrap_or_default();
        let failed = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Failed" && c.status == "True");
        let container_state = pod
            .and_then(|p| p.status.as_ref())
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.clone())
            .unwrap_or_default();
        let (terminated, waiting) = (container_state.terminated, container_state.waiting);
        let (state, message) = if job.metadata.deletion_timestamp.is_some() {
            ("Cancelled".to_string(), None)
        } else if status.succeeded.unwrap_or(0) > 0 {
            ("Succeeded".to_string(), None)
        } else if let Some(c) = failed {
            let reason = c.reason.clone().unwrap_or_default();
            let detail = match &terminated {
                Some(t) => format!(
                    "exit code {}{}",
                    t.exit_code,
                    t.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
                None => c.message.clone().unwrap_or_default(),
            };
            if reason == "DeadlineExceeded" {
                (
                    "DeadlineExceeded".to_string(),
                    Some(format!(
                        "stopped at its timeout: {}",
                        c.message.clone().unwrap_or_default()
                    )),
                )
            } else {
                ("Failed".to_string(), Some(detail))
            }
        } else if status.active.unwrap_or(0) > 0
            && pod
                .and_then(|p| p.status.as_ref())
                .and_then(|s| s.phase.as_deref())
                == Some("Running")
        {
            ("Running".to_string(), None)
        } else {
            (
                "Pending".to_string(),
                waiting.map(|w| {
                    format!(
                        "{} {}",
                        w.reason.unwrap_or_default(),
                        w.message.unwrap_or_default()
                    )
                    .trim()
                    .to_string()
                }),
            )
        };
        JobInfo {
            id,
            flavor,
            url: None,
            namespace: None,
            detach: job
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(DETACH_LABEL)),
            state,
            message,
            started_at: status.start_time.map(|t| t.0.to_string()),
            finished_at: status.completion_time.map(|t| t.0.to_string()).or_else(|| {
                failed.and_then(|c| c.last_transition_time.clone().map(|t| t.0.to_string()))
            }),
        }
    }
}

/// The container's argv: Python scripts run with the image's `python3`, after a `pip
/// install` of their dependencies when they name any.
fn command(program: &Program) -> Vec<String> {
    match program {
        Program::Command(argv) => argv.clone(),
        Program::Python {
            script,
            dependencies,
            args,
            ..
        } => {
            let mut run = match script {
                Script::Code(code) => vec!["python3".to_string(), "-c".to_string(), code.clone()],
                Script::Url(url) => vec![
                    "python3".to_string(),
                    "-c".to_string(),
                    "import sys, urllib.request; u = sys.argv[1]; sys.argv = sys.argv[1:]; \
                     exec(compile(urllib.request.urlopen(u).read(), u, 'exec'))"
                        .to_string(),
                    url.clone(),
                ],
            };
            run.extend(args.iter().cloned());
            if dependencies.is_empty() {
                return run;
            }
            // The packages go to a user site under /tmp (HOME), as the root filesystem is
            // read-only; the script follows as "$@".
            let install = dependencies
                .iter()
                .map(|d| crate::text::shell_quote(d))
                .collect::<Vec<_>>()
                .join(" ");
            let mut argv = vec![
                "sh".to_string(),
                "-c".to_string(),
                format!("python3 -m pip install --quiet --user {install} >&2 && exec \"$@\""),
            ];
            argv.push("job".into());
            argv.extend(run);
            argv
        }
    }
}

#[async_trait]
impl JobBackend for ClusterJobs {
    fn kind(&self) -> &'static str {
        "cluster"
    }

    async fn run(&self, request: JobRequest) -> Result<JobInfo, String> {
        let name = self.job_name();
        let job = self.manifest(&name, &request)?;
        let created = self
            .jobs
            .create(&PostParams::default(), &job)
            .await
            .map_err(|e| format!("cannot create Job {name}: {}", kube_error_text(&e)))?;
        // A moment for the pod to start, so the first log lines can come back.
        for _ in 0..20 {
            let phase = self
                .pod_of(&name)
                .await
                .and_then(|p| p.status.and_then(|s| s.phase));
            if phase.is_some_and(|p| p != "Pending") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        let current = self.jobs.get(&name).await.unwrap_or(created);
        Ok(Self::info(&current, self.pod_of(&name).await.as_ref()))
    }

    async fn list(&self, _: Option<&str>, all: bool) -> Result<Vec<JobInfo>, String> {
        let jobs = self
            .jobs
            .list(&ListParams::default().labels(&jobs_selector(&self.owner.uid)))
            .await
            .map_err(|e| kube_error_text(&e))?;
        // One pod list for all of them, matched by the Job controller's `job-name` label.
        let pods = self
            .pods
            .list(&ListParams::default().labels(&jobs_selector(&self.owner.uid)))
            .await
            .map_err(|e| kube_error_text(&e))?
            .items;
        Ok(jobs
            .items
            .iter()
            .map(|j| {
                let pod = pods
                    .iter()
                    .filter(|p| {
                        p.metadata.labels.as_ref().and_then(|l| l.get("job-name"))
                            == j.metadata.name.as_ref()
                    })
                    .max_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
                Self::info(j, pod)
            })
            .filter(|j| all || !j.is_finished())
            .collect())
    }

    async fn inspect(&self, id: &str, _: Option<&str>) -> Result<JobInfo, String> {
        let job = self.own_job(id).await?;
        Ok(Self::info(&job, self.pod_of(id).await.as_ref()))
    }

    async fn logs(&self, id: &str, _: Option<&str>) -> Result<String, String> {
        self.own_job(id).await?;
        self.pod_log(self.pod_of(id).await.as_ref(), None, false)
            .await
    }

    async fn log_tail(
        &self,
        id: &str,
        _: Option<&str>,
        lines: usize,
    ) -> Result<Vec<LogLine>, String> {
        self.own_job(id).await?;
        self.stamped_tail(self.pod_of(id).await.as_ref(), lines)
            .await
    }

    async fn look(
        &self,
        id: &str,
        _: Option<&str>,
        lines: usize,
    ) -> Result<(JobInfo, Result<Vec<LogLine>, String>), String> {
        let job = self.own_job(id).await?;
        let pod = self.pod_of(id).await;
        let tail = self.stamped_tail(pod.as_ref(), lines).await;
        Ok((Self::info(&job, pod.as_ref()), tail))
    }

    async fn cancel(&self, id: &str, _: Option<&str>) -> Result<(), String> {
        self.own_job(id).await?;
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..Default::default()
        };
        match self.jobs.delete(id, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(kube_error_text(&e)),
        }
    }

    async fn flavors(&self) -> Result<Vec<Flavor>, String> {
        Ok(self
            .presets
            .presets
            .iter()
            .map(|(n, p)| Flavor {
                name: n.clone(),
                description: p.description.clone(),
                usd_per_hour: p.usd_per_hour,
                accelerated: p.has_gpu(),
            })
            .collect())
    }

    fn default_flavor(&self) -> Option<String> {
        self.presets.default.clone()
    }

    fn flavor_hint(&self) -> String {
        if self.presets.presets.is_empty() {
            return "the cluster default".into();
        }
        self.presets
            .presets
            .iter()
            .map(|(n, p)| format!("{n} ({})", p.description))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A line the kubelet prefixed with its RFC 3339 time and a space.
fn stamped_line(line: &str) -> LogLine {
    match line.split_once(' ') {
        Some((at, text)) if at.parse::<k8s_openapi::jiff::Timestamp>().is_ok() => LogLine {
            at: Some(at.to_string()),
            text: text.to_string(),
        },
        _ => LogLine::unstamped(line),
    }
}

/// Deletes the running jobs of the session with uid `session_uid` that were not started
/// with `detach` (on suspend); returns their names.
pub async fn stop_attached_jobs(
    jobs: &Api<Job>,
    session_uid: &str,
) -> Result<Vec<String>, kube::Error> {
    let selector = format!("{},!{DETACH_LABEL}", jobs_selector(session_uid));
    let mut stopped = vec![];
    for job in jobs
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        let running = job.status.as_ref().and_then(|s| s.active).unwrap_or(0) > 0;
        let Some(name) = job.metadata.name.clone() else {
            continue;
        };
        if running {
            let params = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..Default::default()
            };
            match jobs.delete(&name, &params).await {
                Ok(_) => stopped.push(name),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(stopped)
}
