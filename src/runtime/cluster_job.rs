//! `cluster_jobs` on Kubernetes: each run is a `batch/v1` Job owned by the session, with the
//! sandbox's hardening, its hardware from the presets, and its deadline as
//! `activeDeadlineSeconds`.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, Pod, PodSpec, PodTemplateSpec, Volume, VolumeMount,
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
use crate::tools::jobs::{JobBackend, JobInfo, JobRequest};

const JOB_CONTAINER: &str = "job";
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
}

fn labels(session: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            MANAGED_BY_LABEL.0.to_string(),
            MANAGED_BY_LABEL.1.to_string(),
        ),
        ("app.kubernetes.io/component".to_string(), "job".to_string()),
        (SESSION_LABEL.to_string(), label_value(session)),
    ])
}

/// Selects a session's jobs, and their pods (which carry the same labels).
fn jobs_selector(session: &str) -> String {
    format!(
        "{SESSION_LABEL}={},app.kubernetes.io/component=job",
        label_value(session)
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
        let mut labels = labels(&self.session);
        if let Some(f) = &flavor {
            labels.insert("ml-intern.io/flavor".into(), label_value(f));
        }
        if request.detach {
            labels.insert(DETACH_LABEL.into(), "true".into());
        }
        Ok(Job {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels.clone()),
                owner_references: Some(vec![self.owner.clone()]),
                ..Default::default()
            },
            spec: Some(JobSpec {
                backoff_limit: Some(0),
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
                            command: Some(request.command.clone()),
                            working_dir: Some("/tmp".into()),
                            env: Some(env),
                            env_from: Some(settings.env_from.clone()).filter(|e| !e.is_empty()),
                            resources: Some(settings.resources.clone()),
                            security_context: Some(hardened_container_security()),
                            volume_mounts: Some(vec![VolumeMount {
                                name: "tmp".into(),
                                mount_path: "/tmp".into(),
                                ..Default::default()
                            }]),
                            ..Default::default()
                        }],
                        volumes: Some(vec![Volume {
                            name: "tmp".into(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Default::default()
                        }]),
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
            .and_then(|l| l.get(SESSION_LABEL))
            .is_some_and(|s| *s == label_value(&self.session));
        if mine {
            Ok(job)
        } else {
            Err(format!("job {id} does not belong to this session"))
        }
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
            state,
            message,
            started_at: status.start_time.map(|t| t.0.to_string()),
            finished_at: status.completion_time.map(|t| t.0.to_string()).or_else(|| {
                failed.and_then(|c| c.last_transition_time.clone().map(|t| t.0.to_string()))
            }),
        }
    }
}

#[async_trait]
impl JobBackend for ClusterJobs {
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

    async fn list(&self) -> Result<Vec<JobInfo>, String> {
        let jobs = self
            .jobs
            .list(&ListParams::default().labels(&jobs_selector(&self.session)))
            .await
            .map_err(|e| kube_error_text(&e))?;
        // One pod list for all of them, matched by the Job controller's `job-name` label.
        let pods = self
            .pods
            .list(&ListParams::default().labels(&jobs_selector(&self.session)))
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
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<JobInfo, String> {
        let job = self.own_job(id).await?;
        Ok(Self::info(&job, self.pod_of(id).await.as_ref()))
    }

    async fn logs(&self, id: &str) -> Result<String, String> {
        self.own_job(id).await?;
        let Some(pod) = self.pod_of(id).await else {
            return Ok(String::new());
        };
        let name = pod.metadata.name.unwrap_or_default();
        let params = LogParams {
            container: Some(JOB_CONTAINER.into()),
            limit_bytes: Some(LOG_LIMIT_BYTES),
            ..Default::default()
        };
        match self.pods.logs(&name, &params).await {
            Ok(text) => Ok(text),
            // Not started yet: no logs, which is not an error.
            Err(kube::Error::Api(e)) if e.code == 400 => Ok(String::new()),
            Err(e) => Err(kube_error_text(&e)),
        }
    }

    async fn cancel(&self, id: &str) -> Result<(), String> {
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

    fn flavors(&self) -> Vec<(String, String)> {
        self.presets
            .presets
            .iter()
            .map(|(n, p)| (n.clone(), p.description.clone()))
            .collect()
    }
}

/// Deletes the session's running jobs that were not started with `detach` (on suspend);
/// returns their names.
pub async fn stop_attached_jobs(
    jobs: &Api<Job>,
    session: &str,
) -> Result<Vec<String>, kube::Error> {
    let selector = format!("{},!{DETACH_LABEL}", jobs_selector(session));
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
