//! The session's status, kept in memory by its one writer and applied whole with
//! server-side apply, so fields the controller stopped setting disappear.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::FIELD_MANAGER;
use crate::api::{AgentSession, AgentSessionStatus, SessionPhase};
use crate::text::truncate_chars;

/// Condition types a session reports.
pub mod condition {
    /// The spec and what it refers to (the API key Secret) are usable.
    pub const ACCEPTED: &str = "Accepted";
    /// The sandbox pod runs and takes commands.
    pub const SANDBOX_READY: &str = "SandboxReady";
    /// The agent loop is running.
    pub const RUNNING: &str = "Running";
    /// The session succeeded: the model answered.
    pub const COMPLETE: &str = "Complete";
    /// The session failed; the reason and message say why and what to fix.
    pub const FAILED: &str = "Failed";
    /// Tool calls wait for a human decision.
    pub const APPROVAL_PENDING: &str = "ApprovalPending";
}

const MESSAGE_MAX_CHARS: usize = 1024;

/// Adds or replaces the condition of `type_`, keeping its `lastTransitionTime` when its
/// status did not change (the Kubernetes convention tools such as kstatus rely on).
pub fn upsert_condition(
    conditions: &mut Vec<Condition>,
    generation: Option<i64>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) {
    let status_text = if status { "True" } else { "False" };
    let previous = conditions.iter().position(|c| c.type_ == type_);
    let last_transition_time = match previous {
        Some(i) if conditions[i].status == status_text => {
            conditions[i].last_transition_time.clone()
        }
        _ => Time(Timestamp::now()),
    };
    let condition = Condition {
        type_: type_.into(),
        status: status_text.into(),
        reason: reason.into(),
        message: truncate_chars(message, MESSAGE_MAX_CHARS),
        observed_generation: generation,
        last_transition_time,
    };
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}

pub struct StatusWriter {
    api: Api<AgentSession>,
    name: String,
    generation: Option<i64>,
    pub status: AgentSessionStatus,
}

impl StatusWriter {
    pub fn new(api: Api<AgentSession>, session: &AgentSession) -> Self {
        StatusWriter {
            api,
            name: session.metadata.name.clone().unwrap_or_default(),
            generation: session.metadata.generation,
            status: session.status.clone().unwrap_or_default(),
        }
    }

    pub fn set_phase(&mut self, phase: SessionPhase, message: impl AsRef<str>) {
        self.status.phase = Some(phase);
        self.status.message = Some(truncate_chars(message.as_ref(), MESSAGE_MAX_CHARS));
        // A session is reopened by a new message, so completion is the latest turn's.
        if phase.is_terminal() {
            if self.status.completed_at.is_none() {
                self.status.completed_at = Some(Time(Timestamp::now()));
            }
        } else if phase == SessionPhase::Running {
            self.status.completed_at = None;
        }
    }

    /// Sets a condition; its transition time changes only when its status does.
    pub fn set_condition(&mut self, type_: &str, status: bool, reason: &str, message: &str) {
        upsert_condition(
            &mut self.status.conditions,
            self.generation,
            type_,
            status,
            reason,
            message,
        );
    }

    /// The status describes this generation of the spec from now on.
    pub fn observe(&mut self, generation: Option<i64>) {
        self.generation = generation;
    }

    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status.conditions.iter().find(|c| c.type_ == type_)
    }

    pub async fn apply(&mut self) -> Result<(), kube::Error> {
        self.status.observed_generation = self.generation;
        let patch = json!({
            "apiVersion": "ml-intern.io/v1alpha1",
            "kind": "AgentSession",
            "status": self.status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.api
            .patch_status(&self.name, &params, &Patch::Apply(&patch))
            .await
            .map(|_| ())
    }

    /// Applies the status, logging instead of failing: the session's work must not stop
    /// because one status write did not go through.
    pub async fn apply_or_log(&mut self) {
        if let Err(e) = self.apply().await {
            tracing::warn!(session = %self.name, error = %e, "could not write status");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let mut conditions = vec![];
        upsert_condition(&mut conditions, Some(1), "Running", true, "A", "a");
        let first = conditions[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        upsert_condition(&mut conditions, Some(2), "Running", true, "B", "b");
        assert_eq!(conditions.len(), 1);
        assert_eq!(
            conditions[0].last_transition_time, first,
            "same status keeps the time"
        );
        assert_eq!(
            (
                conditions[0].reason.as_str(),
                conditions[0].observed_generation
            ),
            ("B", Some(2))
        );
        upsert_condition(&mut conditions, Some(2), "Running", false, "C", "c");
        assert!(
            conditions[0].last_transition_time.0 > first.0,
            "a flip moves it"
        );
        upsert_condition(
            &mut conditions,
            Some(2),
            "Failed",
            true,
            "D",
            &"x".repeat(5000),
        );
        assert_eq!(conditions.len(), 2);
        assert!(conditions[1].message.chars().count() <= MESSAGE_MAX_CHARS + 1);
    }
}
