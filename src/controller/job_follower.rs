//! Following a session's jobs between the agent's looks: `status.jobs` (state, metrics,
//! cost so far) is kept current by the runner while a turn runs and by reconcile while
//! none does, so exactly one of them writes it at a time. Also stops a session's jobs when
//! it is suspended, fails, runs out of budget or is deleted (unless started detached).

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::{Resource, ResourceExt};

use super::context::Context;
use crate::api::session::{
    JOB_METRICS_MAX, JOBS_MAX, JobMetric, JobStatus, SCHEDULES_MAX, ScheduleStatus,
};
use crate::api::{AgentSession, AgentSessionStatus};
use crate::hf::HfJobsClient;
use crate::runtime::cluster_job::ClusterJobs;
use crate::runtime::hf_job::HfJobs;
use crate::runtime::sandbox_template::SandboxSettings;
use crate::text::truncate_chars;
use crate::tools::jobs::{
    JobBackend, JobInfo, JobObservation, LogLine, ScheduleInfo, log_text, parse_metrics,
};

/// Where a session's jobs run.
#[derive(Clone, Default)]
pub struct JobBackends {
    pub cluster: Option<Arc<dyn JobBackend>>,
    pub huggingface: Option<Arc<dyn JobBackend>>,
}

impl JobBackends {
    /// The backends of `session`: the cluster always, Hugging Face when it has a token.
    pub fn for_session(ctx: &Context, session: &AgentSession, hf_token: Option<&str>) -> Self {
        JobBackends {
            cluster: cluster_jobs(ctx, session).map(|c| Arc::new(c) as Arc<dyn JobBackend>),
            huggingface: hf_token.map(|t| Arc::new(hf_jobs(ctx, session, t)) as _),
        }
    }

    fn of(&self, backend: &str) -> Option<&Arc<dyn JobBackend>> {
        match backend {
            "cluster" => self.cluster.as_ref(),
            "huggingface" => self.huggingface.as_ref(),
            _ => None,
        }
    }
}

/// Jobs beside the sandbox, made like it (image, env, hardening).
pub fn cluster_jobs(ctx: &Context, session: &AgentSession) -> Option<ClusterJobs> {
    let namespace = session.namespace()?;
    Some(ClusterJobs {
        jobs: Api::namespaced(ctx.client.clone(), &namespace),
        pods: Api::namespaced(ctx.client.clone(), &namespace),
        session: session.name_any(),
        namespace,
        owner: session.controller_owner_ref(&())?,
        presets: ctx.config.sandbox_hardware.clone(),
        base: SandboxSettings::from_spec(&session.spec.sandbox, &ctx.config.default_sandbox_image),
        queue: ctx.config.job_queue.clone(),
    })
}

pub fn hf_jobs(ctx: &Context, session: &AgentSession, token: &str) -> HfJobs {
    let mut jobs = HfJobs::new(
        HfJobsClient::new(&ctx.config.hf_endpoint, token.to_string()),
        token.to_string(),
        &session.name_any(),
        session
            .spec
            .hugging_face
            .as_ref()
            .and_then(|h| h.namespace.clone()),
    );
    jobs.log_options.idle = ctx.config.hf_log_idle;
    jobs
}

fn usd(v: f64) -> String {
    format!("{v:.4}")
}

fn parse_usd(v: Option<&String>) -> f64 {
    v.and_then(|s| s.parse().ok()).unwrap_or(0.0)
}

/// Folds what a job tool saw into `status.jobs` and `status.schedules`.
pub fn record(status: &mut AgentSessionStatus, seen: JobObservation) {
    let id = match &seen {
        JobObservation::State { info, .. } => info.id.clone(),
        JobObservation::Metrics { id, .. } => id.clone(),
        JobObservation::LookDone | JobObservation::Log { .. } => return,
        JobObservation::ScheduleCreated { .. }
        | JobObservation::ScheduleSeen { .. }
        | JobObservation::ScheduleSuspended { .. }
        | JobObservation::ScheduleDeleted { .. } => return record_schedule(status, seen),
    };
    let at = match status.jobs.iter().position(|j| j.id == id) {
        Some(i) => i,
        None => {
            let JobObservation::State { backend, .. } = &seen else {
                // Metrics of a job never seen: nothing to attach them to.
                return;
            };
            status.jobs.push(JobStatus {
                backend: backend.to_string(),
                id: id.clone(),
                ..Default::default()
            });
            drop_oldest(status);
            status.jobs.len() - 1
        }
    };
    let job = &mut status.jobs[at];
    match seen {
        JobObservation::State {
            info, usd_per_hour, ..
        } => {
            apply_state(job, info);
            if let Some(p) = usd_per_hour {
                job.usd_per_hour = Some(format!("{p}"));
            }
        }
        JobObservation::Metrics { metrics, .. } => apply_metrics(job, &metrics),
        _ => {}
    }
    accrue(status, Timestamp::now());
}

/// Keeps `status.schedules` to the schedules the session created, as last seen.
fn record_schedule(status: &mut AgentSessionStatus, seen: JobObservation) {
    let schedules = &mut status.schedules;
    let at = |schedules: &[ScheduleStatus], id: &str| schedules.iter().position(|s| s.id == id);
    match seen {
        JobObservation::ScheduleCreated { backend, info } => {
            let entry = ScheduleStatus {
                backend: backend.to_string(),
                ..Default::default()
            };
            schedules.retain(|s| s.id != info.id);
            schedules.push(apply_schedule(entry, info));
            // Deleted ones leave the list when deleted, so past the bound go the oldest
            // suspended ones, then the oldest.
            while schedules.len() > SCHEDULES_MAX {
                let i = schedules.iter().position(|s| s.suspended).unwrap_or(0);
                let gone = schedules.remove(i);
                tracing::warn!(schedule = %gone.id, "no longer listed in status.schedules");
            }
        }
        JobObservation::ScheduleSeen { info } => {
            if let Some(i) = at(schedules, &info.id) {
                let entry = std::mem::take(&mut schedules[i]);
                schedules[i] = apply_schedule(entry, info);
            }
        }
        JobObservation::ScheduleSuspended { id, suspended } => {
            if let Some(i) = at(schedules, &id) {
                schedules[i].suspended = suspended;
            }
        }
        JobObservation::ScheduleDeleted { id } => schedules.retain(|s| s.id != id),
        _ => {}
    }
}

fn apply_schedule(entry: ScheduleStatus, info: ScheduleInfo) -> ScheduleStatus {
    ScheduleStatus {
        id: info.id,
        namespace: info.namespace.or(entry.namespace),
        schedule: info.schedule,
        suspended: info.suspended,
        detach: info.detach || entry.detach,
        next_run_at: info.next_run_at,
        backend: entry.backend,
    }
}

/// Keeps the list bounded, finished jobs going first; their cost stays counted.
fn drop_oldest(status: &mut AgentSessionStatus) {
    while status.jobs.len() > JOBS_MAX {
        let i = status
            .jobs
            .iter()
            .position(|j| is_final(&j.state))
            .unwrap_or(0);
        let gone = status.jobs.remove(i);
        let earlier = parse_usd(status.earlier_jobs_cost_usd.as_ref())
            + parse_usd(gone.estimated_cost_usd.as_ref());
        status.earlier_jobs_cost_usd = Some(usd(earlier));
    }
}

fn is_final(state: &str) -> bool {
    crate::tools::jobs::FINAL_STATES.contains(&state)
}

fn apply_state(job: &mut JobStatus, info: JobInfo) {
    if !info.flavor.is_empty() {
        job.flavor = info.flavor;
    }
    job.state = info.state;
    job.message = info.message.map(|m| truncate_chars(&m, 300));
    job.started_at = info.started_at.or(job.started_at.take());
    job.finished_at = info.finished_at.or(job.finished_at.take());
    job.url = info.url.or(job.url.take());
    job.namespace = info.namespace.or(job.namespace.take());
    job.detach |= info.detach;
}

fn apply_metrics(job: &mut JobStatus, metrics: &[crate::tools::jobs::Metric]) {
    for m in metrics {
        let entry = JobMetric {
            name: m.name.clone(),
            value: m.value.clone(),
            step: m.step,
        };
        match job.metrics.iter().position(|x| x.name == entry.name) {
            // Looks read different parts of a log (the tool from its start, the follower
            // its end): a stepped value never goes back to an earlier step.
            Some(i) if older(&entry, &job.metrics[i]) => {}
            Some(i) => job.metrics[i] = entry,
            None if job.metrics.len() < JOB_METRICS_MAX => job.metrics.push(entry),
            None => {}
        }
    }
}

fn older(new: &JobMetric, kept: &JobMetric) -> bool {
    matches!((new.step, kept.step), (Some(n), Some(k)) if n < k)
}

/// Each job's cost so far (its price times the time it has run, up to `now` for running
/// jobs) and the session's total.
pub fn accrue(status: &mut AgentSessionStatus, now: Timestamp) {
    let mut total = parse_usd(status.earlier_jobs_cost_usd.as_ref());
    for job in &mut status.jobs {
        let Some(price) = job
            .usd_per_hour
            .as_ref()
            .and_then(|p| p.parse::<f64>().ok())
        else {
            continue;
        };
        let started = job
            .started_at
            .as_deref()
            .and_then(|s| s.parse::<Timestamp>().ok());
        let ended = match job.finished_at.as_deref().and_then(|s| s.parse().ok()) {
            Some(t) => Some(t),
            None if is_final(&job.state) => started,
            None => Some(now),
        };
        let seconds = match (started, ended) {
            (Some(s), Some(e)) => e.duration_since(s).as_secs_f64().max(0.0),
            _ => 0.0,
        };
        let cost = price * seconds / 3600.0;
        job.estimated_cost_usd = Some(usd(cost));
        total += cost;
    }
    if total > 0.0 || status.jobs_cost_usd.is_some() {
        status.jobs_cost_usd = Some(usd(total));
    }
}

/// The session's job cost so far.
pub fn jobs_cost(status: &AgentSessionStatus) -> f64 {
    parse_usd(status.jobs_cost_usd.as_ref())
}

/// Whether some job may still change.
pub fn any_unfinished(status: &AgentSessionStatus) -> bool {
    status.jobs.iter().any(|j| !is_final(&j.state))
}

/// How much of a job's log one look reads: the end, where the newest metrics are.
const FOLLOW_TAIL_LINES: usize = 1000;

/// A job to look at: its backend, id and namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub backend: String,
    pub id: String,
    pub namespace: Option<String>,
    /// Its output up to this time (RFC 3339) was reported already; a look reports what
    /// came after as a `Log` observation.
    pub shown_until: Option<String>,
}

/// The jobs that may still change.
pub fn unfinished(status: &AgentSessionStatus) -> Vec<Target> {
    looked_at(status, |_| false)
}

/// The jobs that may still change, and the finished ones `also` names.
pub fn looked_at(status: &AgentSessionStatus, also: impl Fn(&str) -> bool) -> Vec<Target> {
    status
        .jobs
        .iter()
        .filter(|j| !is_final(&j.state) || also(&j.id))
        .map(|j| Target {
            backend: j.backend.clone(),
            id: j.id.clone(),
            namespace: j.namespace.clone(),
            shown_until: None,
        })
        .collect()
}

/// What the backends say of `targets` now: state, and the latest metrics in the logs. A
/// backend that cannot answer is skipped (the entry stays as it was).
pub async fn look(targets: &[Target], backends: &JobBackends) -> Vec<JobObservation> {
    let mut seen = vec![];
    for t in targets {
        let Some(backend) = backends.of(&t.backend) else {
            continue;
        };
        let looked = backend.look(&t.id, t.namespace.as_deref(), FOLLOW_TAIL_LINES);
        let tail = match looked.await {
            Ok((info, tail)) => {
                seen.push(JobObservation::State {
                    backend: backend.kind(),
                    info,
                    usd_per_hour: None,
                });
                tail
            }
            Err(e) => {
                tracing::debug!(job = %t.id, error = %e, "could not look at a job");
                continue;
            }
        };
        if let Ok(lines) = tail {
            let metrics = parse_metrics(&log_text(&lines));
            if !metrics.is_empty() {
                seen.push(JobObservation::Metrics {
                    id: t.id.clone(),
                    metrics,
                });
            }
            let new = printed_after(lines, t.shown_until.as_deref());
            if !new.is_empty() {
                seen.push(JobObservation::Log {
                    backend: backend.kind(),
                    id: t.id.clone(),
                    lines: new,
                });
            }
        }
    }
    seen
}

/// The lines stamped after `mark` (all stamped ones without a mark); unstamped lines cannot
/// be placed, so they are left out rather than shown twice.
fn printed_after(lines: Vec<LogLine>, mark: Option<&str>) -> Vec<LogLine> {
    let mark = mark.and_then(|m| m.parse::<Timestamp>().ok());
    lines
        .into_iter()
        .filter(|l| {
            let at = l.at.as_deref().and_then(|a| a.parse::<Timestamp>().ok());
            match (at, mark) {
                (Some(at), Some(mark)) => at > mark,
                (Some(_), None) => true,
                (None, _) => false,
            }
        })
        .collect()
}

/// Looks at every unfinished job and folds what it finds into `status`; returns whether
/// anything changed.
pub async fn follow(status: &mut AgentSessionStatus, backends: &JobBackends) -> bool {
    let before = status.clone();
    for seen in look(&unfinished(status), backends).await {
        record(status, seen);
    }
    accrue(status, Timestamp::now());
    *status != before
}

/// What stopping a session's compute did.
#[derive(Debug, Default, PartialEq)]
pub struct Stopped {
    /// Jobs cancelled (or recorded as such).
    pub jobs: Vec<String>,
    /// Schedules suspended.
    pub schedules: Vec<String>,
}

impl Stopped {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.schedules.is_empty()
    }

    /// For an Event: "stopped running jobs a, b; suspended schedules c".
    pub fn describe(&self) -> String {
        let mut parts = vec![];
        if !self.jobs.is_empty() {
            parts.push(format!("stopped running jobs {}", self.jobs.join(", ")));
        }
        if !self.schedules.is_empty() {
            parts.push(format!("suspended schedules {}", self.schedules.join(", ")));
        }
        parts.join("; ")
    }
}

/// Whether some schedule not created with `detach` still starts runs.
pub fn any_active_schedule(status: &AgentSessionStatus) -> bool {
    status.schedules.iter().any(|s| !s.suspended && !s.detach)
}

/// Cancels the unfinished jobs not started with `detach`, except those in `done` (stopped
/// already, only recorded here), and suspends the schedules not created with `detach` (a
/// stopped session starts no new runs; resuming them is left to a person or the agent).
pub async fn stop_attached(
    status: &mut AgentSessionStatus,
    backends: &JobBackends,
    done: &[String],
) -> Stopped {
    let mut stopped = Stopped::default();
    for job in status.jobs.iter_mut() {
        if is_final(&job.state) || job.detach {
            continue;
        }
        let Some(backend) = backends.of(&job.backend) else {
            continue;
        };
        let cancelled = if done.contains(&job.id) {
            Ok(())
        } else {
            backend.cancel(&job.id, job.namespace.as_deref()).await
        };
        match cancelled {
            Ok(()) => {
                job.state = "Cancelled".into();
                job.finished_at = Some(Timestamp::now().to_string());
                stopped.jobs.push(job.id.clone());
            }
            Err(e) => tracing::warn!(job = %job.id, error = %e, "could not stop a job"),
        }
    }
    accrue(status, Timestamp::now());
    for schedule in status.schedules.iter_mut() {
        if schedule.suspended || schedule.detach {
            continue;
        }
        let Some(scheduler) = backends.of(&schedule.backend).and_then(|b| b.scheduler()) else {
            continue;
        };
        let ns = schedule.namespace.as_deref();
        match scheduler.set_suspended(&schedule.id, ns, true).await {
            Ok(()) => {
                schedule.suspended = true;
                stopped.schedules.push(schedule.id.clone());
            }
            Err(e) => {
                tracing::warn!(schedule = %schedule.id, error = %e, "could not suspend a schedule")
            }
        }
    }
    stopped
}

/// Deletes the schedules not created with `detach` (the session is going away); returns
/// the ids deleted.
pub async fn delete_schedules(
    status: &mut AgentSessionStatus,
    backends: &JobBackends,
) -> Vec<String> {
    let mut deleted = vec![];
    for schedule in &status.schedules {
        if schedule.detach {
            continue;
        }
        let Some(scheduler) = backends.of(&schedule.backend).and_then(|b| b.scheduler()) else {
            continue;
        };
        match scheduler
            .delete(&schedule.id, schedule.namespace.as_deref())
            .await
        {
            Ok(()) => deleted.push(schedule.id.clone()),
            Err(e) => {
                tracing::warn!(schedule = %schedule.id, error = %e, "could not delete a schedule")
            }
        }
    }
    status.schedules.retain(|s| !deleted.contains(&s.id));
    deleted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(
        id: &str,
        state: &str,
        price: Option<&str>,
        started: &str,
        finished: Option<&str>,
    ) -> JobStatus {
        JobStatus {
            backend: "huggingface".into(),
            id: id.into(),
            state: state.into(),
            usd_per_hour: price.map(str::to_string),
            started_at: Some(started.into()),
            finished_at: finished.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn cost_accrues_while_running_and_stops_at_the_end() {
        let mut status = AgentSessionStatus {
            jobs: vec![
                job(
                    "a",
                    "Succeeded",
                    Some("3.6"),
                    "2026-01-01T00:00:00Z",
                    Some("2026-01-01T00:10:00Z"),
                ),
                job("b", "Running", Some("1.8"), "2026-01-01T00:00:00Z", None),
                job("c", "Running", None, "2026-01-01T00:00:00Z", None),
            ],
            earlier_jobs_cost_usd: Some("0.5".into()),
            ..Default::default()
        };
        let now: Timestamp = "2026-01-01T00:20:00Z".parse().unwrap();
        accrue(&mut status, now);
        assert_eq!(status.jobs[0].estimated_cost_usd.as_deref(), Some("0.6000"));
        assert_eq!(status.jobs[1].estimated_cost_usd.as_deref(), Some("0.6000"));
        assert_eq!(status.jobs[2].estimated_cost_usd, None);
        assert_eq!(status.jobs_cost_usd.as_deref(), Some("1.7000"));
        assert!(any_unfinished(&status));
    }

    #[test]
    fn the_list_is_bounded_and_dropped_jobs_stay_counted() {
        let mut status = AgentSessionStatus::default();
        for i in 0..JOBS_MAX + 3 {
            let info = JobInfo {
                id: format!("j{i}"),
                state: if i == 5 { "Running" } else { "Succeeded" }.into(),
                started_at: Some("2026-01-01T00:00:00Z".into()),
                finished_at: Some("2026-01-01T01:00:00Z".into()),
                ..Default::default()
            };
            record(
                &mut status,
                JobObservation::State {
                    backend: "cluster",
                    info,
                    usd_per_hour: Some(1.0),
                },
            );
        }
        assert_eq!(status.jobs.len(), JOBS_MAX);
        assert!(
            status.jobs.iter().any(|j| j.id == "j5"),
            "a running job is kept"
        );
        assert_eq!(status.jobs_cost_usd.as_deref(), Some("23.0000"));
    }

    #[test]
    fn only_output_stamped_after_the_mark_is_new() {
        let line = |at: Option<&str>, text: &str| LogLine {
            at: at.map(str::to_string),
            text: text.into(),
        };
        let lines = vec![
            line(Some("2026-11-22T10:00:01.5Z"), "a"),
            line(Some("2026-11-22T10:00:02.000000001Z"), "b"),
            line(None, "c"),
            line(Some("2026-11-22T10:00:03Z"), "d"),
        ];
        let texts = |l: Vec<LogLine>| l.into_iter().map(|l| l.text).collect::<Vec<_>>();
        assert_eq!(texts(printed_after(lines.clone(), None)), ["a", "b", "d"]);
        // Different spellings of one instant compare as times, not strings.
        let mark = Some("2026-11-22T10:00:02.000000001+00:00");
        assert_eq!(texts(printed_after(lines.clone(), mark)), ["d"]);
        assert!(printed_after(lines, Some("2026-11-22T10:00:03Z")).is_empty());
    }

    #[test]
    fn metrics_keep_the_newest_step_whatever_part_of_the_log_was_read_last() {
        let mut status = AgentSessionStatus::default();
        let metric = |name: &str, value: &str, step: Option<i64>| crate::tools::jobs::Metric {
            name: name.into(),
            value: value.into(),
            step,
        };
        let seen = |metrics| JobObservation::Metrics {
            id: "j".into(),
            metrics,
        };
        record(
            &mut status,
            JobObservation::State {
                backend: "cluster",
                info: JobInfo {
                    id: "j".into(),
                    state: "Running".into(),
                    ..Default::default()
                },
                usd_per_hour: None,
            },
        );
        // The follower reads the end of the log, then the model the start of it.
        record(
            &mut status,
            seen(vec![
                metric("loss", "0.1", Some(300)),
                metric("lr", "1e-5", None),
            ]),
        );
        record(
            &mut status,
            seen(vec![
                metric("loss", "0.9", Some(100)),
                metric("lr", "3e-5", None),
                metric("acc", "0.5", Some(100)),
            ]),
        );
        let got: Vec<(&str, &str, Option<i64>)> = status.jobs[0]
            .metrics
            .iter()
            .map(|m| (m.name.as_str(), m.value.as_str(), m.step))
            .collect();
        assert_eq!(
            got,
            [
                ("loss", "0.1", Some(300)),
                ("lr", "3e-5", None),
                ("acc", "0.5", Some(100))
            ]
        );
    }
}
