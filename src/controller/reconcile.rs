//! Reconcile: decide, for one AgentSession, whether to start its loop, wait, or clean up.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Resource, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::approvals::{for_session, standing};
use super::context::{Context, SessionEntry};
use super::credentials::{CredentialError, resolve_hf_token, resolve_model_access};
use super::job_follower::{self, JobBackends};
use super::session_runner::run_session;
use super::status::{StatusWriter, condition};
use super::{Error, FINALIZER};
use crate::api::{AgentApproval, AgentSession, AgentSessionStatus, SessionPhase};
use crate::runtime::{SandboxPod, sandbox_pod_name};

pub async fn reconcile(session: Arc<AgentSession>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = session
        .namespace()
        .ok_or(Error::MissingField("namespace"))?;
    let api: Api<AgentSession> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, session, |event| async {
        match event {
            FinalizerEvent::Apply(s) => apply(s, ctx.clone()).await,
            FinalizerEvent::Cleanup(s) => cleanup(s, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

pub fn error_policy(session: Arc<AgentSession>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(session = %session.name_any(), %error, "reconcile failed");
    ctx.metrics.reconcile_errors.inc();
    Action::requeue(Duration::from_secs(5))
}

async fn apply(session: Arc<AgentSession>, ctx: Arc<Context>) -> Result<Action, Error> {
    let uid = session.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let namespace = session
        .namespace()
        .ok_or(Error::MissingField("namespace"))?;
    let generation = session.metadata.generation;
    let status = session.status.as_ref();
    let phase = status.and_then(|s| s.phase);
    // The spec changed since the status was written: new messages, suspend, a rewrite.
    let spec_changed = status.and_then(|s| s.observed_generation) != generation;
    // A session waiting for approvals needs its runner again when AgentApprovals (or a
    // deadline) settle its requests; the session object itself does not change then.
    let waiting = match phase {
        Some(SessionPhase::WaitingForApproval) => true,
        Some(SessionPhase::Suspended) => {
            !session.spec.suspend && status.is_some_and(|s| !s.pending_approvals.is_empty())
        }
        _ => false,
    };
    let (approvals_due, approval_wake) = if waiting {
        approvals_due(&session, &ctx, &namespace).await?
    } else {
        (false, None)
    };
    let runner_done = {
        let Ok(mut sessions) = ctx.sessions.lock() else {
            return Ok(Action::await_change());
        };
        match sessions.get(&uid) {
            Some(SessionEntry::Active { spec, .. }) => {
                spec.send_replace(session.clone());
                // The runner may be retiring after setting deleteAfter: come back then.
                return Ok(match sandbox_deadline(&session) {
                    Some(left) => Action::requeue(left.max(Duration::from_secs(1))),
                    None => Action::await_change(),
                });
            }
            Some(SessionEntry::Finished { generation: done })
                if *done >= generation && !approvals_due =>
            {
                true
            }
            Some(SessionEntry::Finished { .. }) => {
                sessions.remove(&uid);
                false
            }
            None => false,
        }
    };
    if runner_done {
        let follow = follow_jobs(&session, &ctx).await;
        return Ok(sooner(
            &session,
            expire_sandbox(&session, &ctx).await?,
            earliest(approval_wake, follow),
        ));
    }
    let settled = match phase {
        Some(p) if p.is_terminal() => true,
        Some(SessionPhase::Suspended) => session.spec.suspend || (waiting && !approvals_due),
        Some(SessionPhase::WaitingForApproval) => !approvals_due,
        _ => false,
    };
    if settled && !spec_changed {
        let kept = session
            .status
            .as_ref()
            .and_then(|s| s.sandbox.as_ref())
            .is_some_and(|s| s.delete_after.is_some());
        if phase.is_some_and(|p| p.is_terminal()) && !kept {
            // The runner deletes the sandbox when it has nothing left to do; this catches a
            // pod it missed.
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
            SandboxPod::delete(&pods, &sandbox_pod_name(&session.name_any())).await?;
        }
        let follow = follow_jobs(&session, &ctx).await;
        return Ok(sooner(
            &session,
            expire_sandbox(&session, &ctx).await?,
            earliest(approval_wake, follow),
        ));
    }

    let api: Api<AgentSession> = Api::namespaced(ctx.client.clone(), &namespace);
    let hf_token = match resolve_hf_token(&ctx.client, &session.spec, &namespace).await {
        Ok(token) => token,
        Err(CredentialError::Api { source, .. }) => return Err(Error::Kube(source)),
        Err(e) => {
            wait_for_credentials(&session, &ctx, api, &e).await?;
            return Ok(Action::requeue(ctx.config.pending_recheck));
        }
    };
    let access = match resolve_model_access(
        &ctx.client,
        &session.spec,
        &namespace,
        &ctx.config.models,
    )
    .await
    {
        Ok(access) => access,
        Err(CredentialError::Api { source, .. }) => return Err(Error::Kube(source)),
        Err(e) => {
            wait_for_credentials(&session, &ctx, api, &e).await?;
            return Ok(Action::requeue(ctx.config.pending_recheck));
        }
    };

    let cancel = CancellationToken::new();
    let (spec, spec_rx) = watch::channel(session.clone());
    if let Ok(mut sessions) = ctx.sessions.lock() {
        let task = tokio::spawn(run_session(
            ctx.clone(),
            access,
            hf_token,
            cancel.clone(),
            spec_rx,
        ));
        sessions.insert(uid, SessionEntry::Active { cancel, task, spec });
    }
    Ok(Action::await_change())
}

/// Whether the session's AgentApprovals (or a passed deadline) give its runner something to
/// do, and when the next request expires.
async fn approvals_due(
    session: &AgentSession,
    ctx: &Context,
    namespace: &str,
) -> Result<(bool, Option<Duration>), Error> {
    let Some(status) = session.status.as_ref() else {
        return Ok((false, None));
    };
    let api: Api<AgentApproval> = Api::namespaced(ctx.client.clone(), namespace);
    let name = session.name_any();
    let approvals = for_session(&api, &name).await?;
    let policy = &session.spec.approval_policy;
    let now = k8s_openapi::jiff::Timestamp::now();
    let standing = standing(&status.pending_approvals, &approvals, policy, now);
    let newly_timed_out =
        standing.suspend_for_timeout(policy) && status.phase != Some(SessionPhase::Suspended);
    let due = standing.ready() || !standing.refused.is_empty() || newly_timed_out;
    let wake = standing.next_expiry.map(|t| {
        let left = t.duration_since(now);
        Duration::from_millis(left.as_millis().max(0) as u64 + 500)
    });
    Ok((due, wake))
}

fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// While no runner works on the session, reconcile follows its unfinished jobs (state,
/// metrics, cost), stops those that should not be running (a suspended or failed session,
/// or one whose jobs took it past `spec.budget.maxCostUsd`), and comes back after the
/// follow interval while any is left.
async fn follow_jobs(session: &AgentSession, ctx: &Context) -> Option<Duration> {
    let status = session.status.as_ref()?;
    let schedules_to_stop =
        job_follower::any_active_schedule(status) && stop_reason(session, status).is_some();
    if !job_follower::any_unfinished(status) && !schedules_to_stop {
        return None;
    }
    let namespace = session.namespace()?;
    let uid = session.uid()?;
    let interval = ctx.config.job_follow_interval;
    if let Ok(mut looks) = ctx.job_looks.lock() {
        let now = std::time::Instant::now();
        if let Some(last) = looks.get(&uid)
            && now.duration_since(*last) < interval
        {
            return Some(interval - now.duration_since(*last));
        }
        looks.insert(uid.clone(), now);
    }
    // Without its token (the Secret went away) the HF jobs cannot be looked at; the
    // cluster ones still can.
    let hf_token = resolve_hf_token(&ctx.client, &session.spec, &namespace)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(session = %session.name_any(), error = %e, "cannot follow HF jobs");
            None
        });
    let backends = JobBackends::for_session(ctx, session, hf_token.as_deref());
    let api = Api::namespaced(ctx.client.clone(), &namespace);
    let mut writer = StatusWriter::new(api, session);
    let mut changed = job_follower::follow(&mut writer.status, &backends).await;
    if let Some(why) = stop_reason(session, &writer.status) {
        let stopped = job_follower::stop_attached(&mut writer.status, &backends, &[]).await;
        if !stopped.is_empty() {
            changed = true;
            ctx.publish(
                &session.object_ref(&()),
                EventType::Warning,
                "JobsStopped",
                format!("{why}: {}", stopped.describe()),
            )
            .await;
        }
    }
    if changed {
        writer.apply_or_log().await;
    }
    let stop_pending = job_follower::any_active_schedule(&writer.status)
        && stop_reason(session, &writer.status).is_some();
    if job_follower::any_unfinished(&writer.status) || stop_pending {
        Some(interval)
    } else {
        if let Ok(mut looks) = ctx.job_looks.lock() {
            looks.remove(&uid);
        }
        None
    }
}

/// Why the session's jobs and schedules should stop now, if they should: it is suspended,
/// its turn failed, or its spending reached `spec.budget.maxCostUsd`.
fn stop_reason(session: &AgentSession, status: &AgentSessionStatus) -> Option<String> {
    if session.spec.suspend {
        return Some("the session is suspended".to_string());
    }
    if status.phase == Some(SessionPhase::Failed) {
        return Some("the session's turn failed".to_string());
    }
    let model_usd: f64 = status
        .usage
        .as_ref()
        .and_then(|u| u.estimated_cost_usd.as_deref())
        .and_then(|c| c.parse().ok())
        .unwrap_or(0.0);
    let max_usd = session
        .spec
        .budget
        .as_ref()
        .and_then(|b| b.max_cost_usd.as_deref())
        .and_then(|m| m.parse::<f64>().ok())?;
    let spent = model_usd + job_follower::jobs_cost(status);
    (spent >= max_usd).then(|| {
        format!(
            "the session's estimated spending ${spent:.4} reached spec.budget.maxCostUsd (${max_usd})"
        )
    })
}

/// `action` (from `expire_sandbox`), or a requeue at `wake` when that comes first.
fn sooner(session: &AgentSession, action: Action, wake: Option<Duration>) -> Action {
    let Some(wake) = wake else {
        return action;
    };
    match sandbox_deadline(session).filter(|d| !d.is_zero()) {
        Some(sandbox) if action != Action::await_change() => Action::requeue(sandbox.min(wake)),
        _ => Action::requeue(wake),
    }
}

/// Time left until the idle pod's `deleteAfter` (zero when it has passed).
fn sandbox_deadline(session: &AgentSession) -> Option<Duration> {
    let sandbox = session.status.as_ref()?.sandbox.as_ref()?;
    let Time(deadline) = sandbox.delete_after.as_ref()?;
    let left = deadline.duration_since(k8s_openapi::jiff::Timestamp::now());
    Some(Duration::from_millis(left.as_millis().max(0) as u64))
}

/// An idle session's pod is deleted once `status.sandbox.deleteAfter` has passed; until
/// then reconcile comes back at that time.
async fn expire_sandbox(session: &AgentSession, ctx: &Context) -> Result<Action, Error> {
    let Some(left) = sandbox_deadline(session) else {
        return Ok(Action::await_change());
    };
    if !left.is_zero() {
        return Ok(Action::requeue(left));
    }
    let Some(sandbox) = session.status.as_ref().and_then(|s| s.sandbox.as_ref()) else {
        return Ok(Action::await_change());
    };
    let namespace = session.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    SandboxPod::delete(&pods, &sandbox.pod_name).await?;
    let mut status = StatusWriter::new(Api::namespaced(ctx.client.clone(), &namespace), session);
    status.status.sandbox = None;
    let message = format!(
        "sandbox pod {} was deleted after its idle time ran out",
        sandbox.pod_name
    );
    status.set_condition(condition::SANDBOX_READY, false, "IdleTimeout", &message);
    status.apply_or_log().await;
    ctx.publish(
        &session.object_ref(&()),
        EventType::Normal,
        "SandboxDeleted",
        message,
    )
    .await;
    Ok(Action::await_change())
}

/// A missing or unusable Secret keeps the session Pending (the user may be about to
/// create it, as with a pod's env Secret) and says exactly what to fix.
async fn wait_for_credentials(
    session: &AgentSession,
    ctx: &Context,
    api: Api<AgentSession>,
    error: &CredentialError,
) -> Result<(), Error> {
    let mut status = StatusWriter::new(api, session);
    let message = error.to_string();
    let unchanged = status
        .condition(condition::ACCEPTED)
        .is_some_and(|c| c.status == "False" && c.reason == error.reason() && c.message == message);
    if unchanged {
        return Ok(());
    }
    status.set_phase(SessionPhase::Pending, &message);
    status.set_condition(condition::ACCEPTED, false, error.reason(), &message);
    status.apply().await?;
    ctx.publish(
        &session.object_ref(&()),
        EventType::Warning,
        error.reason(),
        &message,
    )
    .await;
    Ok(())
}

/// Deletion: stop the loop, remove the sandbox, forget the session.
async fn cleanup(session: Arc<AgentSession>, ctx: Arc<Context>) -> Result<Action, Error> {
    let uid = session.uid().unwrap_or_default();
    let entry = ctx.sessions.lock().ok().and_then(|mut s| s.remove(&uid));
    if let Ok(mut looks) = ctx.job_looks.lock() {
        looks.remove(&uid);
    }
    if let Some(SessionEntry::Active { cancel, task, .. }) = entry {
        cancel.cancel();
        if tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .is_err()
        {
            tracing::warn!(session = %session.name_any(), "agent loop did not stop within 30s");
        }
    }
    let namespace = session
        .namespace()
        .ok_or(Error::MissingField("namespace"))?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    SandboxPod::delete(&pods, &sandbox_pod_name(&session.name_any())).await?;
    // Cluster jobs go with the session (owner references); HF jobs are cancelled and
    // schedules deleted here.
    if let Some(mut status) = session.status.clone()
        && (job_follower::any_unfinished(&status) || status.schedules.iter().any(|s| !s.detach))
    {
        match resolve_hf_token(&ctx.client, &session.spec, &namespace).await {
            Ok(token) => {
                let backends = JobBackends::for_session(&ctx, &session, token.as_deref());
                let deleted = job_follower::delete_schedules(&mut status, &backends).await;
                if !deleted.is_empty() {
                    tracing::info!(session = %session.name_any(), schedules = %deleted.join(", "), "session deleted: schedules deleted");
                }
                let stopped = job_follower::stop_attached(&mut status, &backends, &[]).await;
                if !stopped.jobs.is_empty() {
                    tracing::info!(session = %session.name_any(), jobs = %stopped.jobs.join(", "), "session deleted: jobs cancelled");
                }
            }
            Err(e) => {
                tracing::warn!(session = %session.name_any(), error = %e, "session deleted but its HF jobs could not be cancelled")
            }
        }
    }
    // Decisions the controller never got to own are not left behind either.
    let approvals: Api<AgentApproval> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = session.name_any();
    for a in for_session(&approvals, &name).await? {
        if let Err(e) = approvals.delete(&a.name_any(), &Default::default()).await
            && !matches!(&e, kube::Error::Api(s) if s.code == 404)
        {
            return Err(Error::Kube(e));
        }
    }
    tracing::info!(session = %session.name_any(), "session deleted; loop stopped and sandbox removed");
    Ok(Action::await_change())
}
