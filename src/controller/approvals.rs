//! Approvals on the Kubernetes side: the session's policy as a gate for the loop, and
//! matching AgentApproval objects to the requests in `status.pendingApprovals`.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::Value;

use crate::agent::approval::{ApprovalGate, Decision, PendingCall, Verdict, arguments_digest};
use crate::api::session::{
    ApprovalMode, ApprovalPolicy, ApprovalTimeoutAction, DEFAULT_APPROVAL_TIMEOUT_SECS,
    PendingApproval,
};
use crate::api::{AgentApproval, ApprovalDecision, ApprovalPhase};
use crate::runtime::hardware::HardwarePresets;
use crate::text::truncate_bytes;
use crate::tools::jobs::{
    CLUSTER_JOBS_TOOL, DEFAULT_TIMEOUT_SECS, Flavor, HF_JOBS_TOOL, cost_ceiling_usd,
    operation_name, parse_timeout,
};
use crate::tools::sandbox_create::SANDBOX_CREATE_TOOL;

/// Longest arguments text shown in a pending request.
const ARGUMENTS_MAX_BYTES: usize = 4096;

/// The session's approval policy, with the decisions already made.
pub struct PolicyGate {
    pub policy: ApprovalPolicy,
    pub presets: Arc<HardwarePresets>,
    /// By tool-call id.
    pub decisions: HashMap<String, Decision>,
    /// The flavors each job tool offers (with prices where known), by tool name.
    pub job_flavors: HashMap<&'static str, (Option<String>, Vec<Flavor>)>,
    /// `Budgeted`: calls whose estimated cost fits under this (with what was spent) run
    /// without asking.
    pub auto_approve_cap_usd: Option<f64>,
}

fn job_operation(arguments: &Value) -> String {
    operation_name(arguments["operation"].as_str().unwrap_or_default())
}

impl PolicyGate {
    /// The most a job run can cost: its flavor's price for its whole timeout.
    fn estimate(&self, tool: &str, arguments: &Value) -> Option<f64> {
        let (default, flavors) = self.job_flavors.get(tool)?;
        if !matches!(job_operation(arguments).as_str(), "run" | "scheduled run") {
            return None;
        }
        let flavor = flavor_argument(arguments).or(default.as_deref())?;
        let price = flavors.iter().find(|f| f.name == flavor)?.usd_per_hour?;
        let timeout = match arguments.get("timeout") {
            None | Some(Value::Null) => DEFAULT_TIMEOUT_SECS,
            Some(v) => parse_timeout(v).ok()?,
        };
        Some(cost_ceiling_usd(price, timeout))
    }

    /// Why the call needs a human under `Manual`, if it does.
    fn gated(&self, tool: &str, arguments: &Value, cost: Option<f64>) -> Option<String> {
        let cost_note = cost
            .map(|c| format!(", estimated at most ${c:.2}"))
            .unwrap_or_default();
        if tool == SANDBOX_CREATE_TOOL {
            let hardware = arguments["hardware"].as_str()?;
            let preset = self.presets.get(hardware).filter(|p| p.has_gpu())?;
            return Some(format!(
                "move the sandbox to GPU hardware {hardware} ({})",
                preset.description
            ));
        }
        let op = job_operation(arguments);
        if tool == HF_JOBS_TOOL && op == "scheduled run" {
            let schedule = arguments["schedule"].as_str().unwrap_or("?");
            return Some(format!(
                "schedule a Hugging Face job ({schedule}){cost_note} per run"
            ));
        }
        if tool == HF_JOBS_TOOL && op == "run" {
            let flavor =
                flavor_argument(arguments).unwrap_or(crate::runtime::hf_job::DEFAULT_FLAVOR);
            return Some(format!("run a Hugging Face job on {flavor}{cost_note}"));
        }
        if tool == CLUSTER_JOBS_TOOL && op == "run" {
            let flavor = flavor_argument(arguments).or(self.presets.default.as_deref());
            if let Some(f) = flavor
                && let Some(preset) = self.presets.get(f).filter(|p| p.has_gpu())
            {
                return Some(format!(
                    "run a cluster job on GPU flavor {f} ({}){cost_note}",
                    preset.description
                ));
            }
        }
        if self.policy.gated_tools.iter().any(|t| t == tool) {
            let shown = arguments
                .get("command")
                .or_else(|| arguments.get("path"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| arguments.to_string());
            return Some(format!(
                "{tool}: {}",
                crate::text::truncate_chars(&shown, 200)
            ));
        }
        None
    }
}

fn flavor_argument(arguments: &Value) -> Option<&str> {
    ["hardware_flavor", "flavor", "hardware"]
        .iter()
        .find_map(|k| arguments[*k].as_str())
}

impl ApprovalGate for PolicyGate {
    fn review(&self, tool: &str, arguments: &Value, spent_usd: f64) -> Verdict {
        let estimated_cost_usd = self.estimate(tool, arguments);
        let Some(summary) = self.gated(tool, arguments, estimated_cost_usd) else {
            return Verdict::Run { estimated_cost_usd };
        };
        let ask = |summary: String| Verdict::Ask {
            summary,
            estimated_cost_usd,
        };
        match self.policy.mode {
            ApprovalMode::Auto => Verdict::Run { estimated_cost_usd },
            ApprovalMode::Manual => ask(summary),
            // A schedule repeats without end: always a human's call.
            ApprovalMode::Budgeted if job_operation(arguments) == "scheduled run" => ask(summary),
            ApprovalMode::Budgeted => {
                let cap = self.auto_approve_cap_usd.unwrap_or(0.0);
                match estimated_cost_usd {
                    Some(c) if spent_usd + c <= cap => Verdict::Run { estimated_cost_usd },
                    Some(_) => ask(format!(
                        "{summary}: more than the ${:.2} left under the auto-approval cap",
                        (cap - spent_usd).max(0.0)
                    )),
                    None => ask(format!(
                        "{summary}: no price is known, so it cannot be auto-approved"
                    )),
                }
            }
        }
    }

    fn decision(&self, tool_call_id: &str) -> Option<Decision> {
        self.decisions.get(tool_call_id).cloned()
    }
}

fn timeout(policy: &ApprovalPolicy) -> SignedDuration {
    SignedDuration::from_secs(
        policy
            .timeout_seconds
            .unwrap_or(DEFAULT_APPROVAL_TIMEOUT_SECS)
            .into(),
    )
}

/// A stable id for a request: short, unique within the session, valid in a label.
fn request_id(tool_call_id: &str, at: usize) -> String {
    let digest = arguments_digest(&Value::String(format!("{at}/{tool_call_id}")));
    format!("req-{}", &digest[..12])
}

/// The status entries for calls that started waiting now; `at` is the history length,
/// which makes ids unique across turns that reuse tool-call ids.
pub fn pending_entries(
    pending: &[PendingCall],
    at: usize,
    policy: &ApprovalPolicy,
    redact: impl Fn(&str) -> String,
) -> Vec<PendingApproval> {
    let now = Timestamp::now();
    let expires = now.checked_add(timeout(policy)).unwrap_or(now);
    pending
        .iter()
        .map(|p| PendingApproval {
            id: request_id(&p.tool_call_id, at),
            tool_call_id: p.tool_call_id.clone(),
            tool: p.tool.clone(),
            summary: redact(&p.summary),
            arguments: truncate_bytes(&redact(&p.arguments.to_string()), ARGUMENTS_MAX_BYTES),
            arguments_digest: arguments_digest(&p.arguments),
            estimated_cost_usd: p.estimated_cost_usd.map(|c| format!("{c:.2}")),
            requested_at: Time(now),
            expires_at: Time(expires),
        })
        .collect()
}

/// How a request was settled.
#[derive(Clone, Debug, PartialEq)]
pub struct Settled {
    pub request: PendingApproval,
    pub decision: Decision,
    /// The AgentApproval behind it; None when it timed out.
    pub approval: Option<String>,
}

/// An AgentApproval that cannot be applied, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub approval: String,
    pub reason: &'static str,
    pub message: String,
}

/// Where the session's requests stand against the AgentApprovals that exist.
#[derive(Debug, Default, PartialEq)]
pub struct Standing {
    pub settled: Vec<Settled>,
    pub undecided: Vec<PendingApproval>,
    pub refused: Vec<Refusal>,
    /// The earliest deadline among undecided requests.
    pub next_expiry: Option<Timestamp>,
    /// An undecided request is past its deadline.
    pub expired: bool,
}

impl Standing {
    /// Every request has an outcome, so the turn can go on.
    pub fn ready(&self) -> bool {
        self.undecided.is_empty()
    }

    /// Undecided requests past their deadline under `onTimeout: Suspend`.
    pub fn suspend_for_timeout(&self, policy: &ApprovalPolicy) -> bool {
        self.expired && policy.on_timeout == ApprovalTimeoutAction::Suspend
    }
}

/// Who created an approval, as the admission webhook recorded it.
pub const REQUESTED_BY_ANNOTATION: &str = "ml-intern.io/requested-by";

/// Matches approvals to the pending requests: by request id, then digest. Under
/// `onTimeout: Reject`, an undecided request past its deadline is settled as rejected.
pub fn standing(
    pending: &[PendingApproval],
    approvals: &[AgentApproval],
    policy: &ApprovalPolicy,
    now: Timestamp,
) -> Standing {
    let mut out = Standing::default();
    for a in approvals {
        let name = a.metadata.name.clone().unwrap_or_default();
        if a.status.as_ref().and_then(|s| s.phase).is_some() {
            continue;
        }
        match pending.iter().find(|p| p.id == a.spec.request_id) {
            None => out.refused.push(Refusal {
                approval: name,
                reason: "UnknownRequest",
                message: format!(
                    "session {} has no pending request {}; see its status.pendingApprovals",
                    a.spec.session_name, a.spec.request_id
                ),
            }),
            Some(p) if p.arguments_digest != a.spec.arguments_digest => out.refused.push(Refusal {
                approval: name,
                reason: "DigestMismatch",
                message: format!(
                    "request {} is for arguments with digest {}, not {}: the decision would not be about the call that waits",
                    p.id, p.arguments_digest, a.spec.arguments_digest
                ),
            }),
            Some(_) => {}
        }
    }
    for p in pending {
        let decided = approvals.iter().find(|a| {
            a.spec.request_id == p.id
                && a.spec.arguments_digest == p.arguments_digest
                && a.status.as_ref().and_then(|s| s.phase) != Some(ApprovalPhase::Refused)
        });
        match decided {
            Some(a) => out.settled.push(Settled {
                request: p.clone(),
                decision: Decision {
                    approved: a.spec.decision == ApprovalDecision::Approve,
                    by: a
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|m| m.get(REQUESTED_BY_ANNOTATION).cloned()),
                    feedback: a.spec.feedback.clone(),
                    edited_arguments: a
                        .spec
                        .edited_arguments
                        .clone()
                        .filter(|_| a.spec.decision == ApprovalDecision::Approve),
                },
                approval: a.metadata.name.clone(),
            }),
            None if p.expires_at.0 <= now => {
                out.expired = true;
                if policy.on_timeout == ApprovalTimeoutAction::Reject {
                    out.settled.push(Settled {
                        request: p.clone(),
                        decision: Decision {
                            approved: false,
                            by: None,
                            feedback: Some(format!(
                                "nobody decided within {}s, so the call was not run",
                                timeout(policy).as_secs()
                            )),
                            edited_arguments: None,
                        },
                        approval: None,
                    });
                } else {
                    out.undecided.push(p.clone());
                }
            }
            None => {
                out.next_expiry = Some(match out.next_expiry {
                    Some(t) if t < p.expires_at.0 => t,
                    _ => p.expires_at.0,
                });
                out.undecided.push(p.clone());
            }
        }
    }
    out
}

/// The AgentApprovals in `api`'s namespace that name session `name`.
pub async fn for_session(
    api: &kube::Api<AgentApproval>,
    name: &str,
) -> Result<Vec<AgentApproval>, kube::Error> {
    Ok(api
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|a| a.spec.session_name == name)
        .collect())
}

/// Records on an AgentApproval what became of it, and makes the session own it so it is
/// garbage collected with the session.
pub async fn mark_approval(
    api: &kube::Api<AgentApproval>,
    name: &str,
    owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    phase: ApprovalPhase,
    reason: &str,
    message: &str,
) {
    use kube::api::{Patch, PatchParams};
    if let Some(mut owner) = owner {
        // Owned, not controlled: deleting the session removes it, nothing more.
        owner.controller = None;
        owner.block_owner_deletion = None;
        let patch = serde_json::json!({"metadata": {"ownerReferences": [owner]}});
        if let Err(e) = api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(approval = name, error = %e, "cannot set the approval's owner");
        }
    }
    let now = Time(Timestamp::now());
    let status = serde_json::json!({"status": {
        "phase": phase,
        "appliedAt": (phase == ApprovalPhase::Applied).then_some(&now),
        "conditions": [{
            "type": "Applied",
            "status": if phase == ApprovalPhase::Applied { "True" } else { "False" },
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
        }]
    }});
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
    {
        tracing::warn!(approval = name, error = %e, "cannot record the approval's status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn approval(name: &str, request: &str, digest: &str, decision: &str) -> AgentApproval {
        serde_json::from_value(json!({
            "apiVersion": "ml-intern.io/v1alpha1", "kind": "AgentApproval",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"sessionName": "s", "requestId": request, "argumentsDigest": digest,
                     "decision": decision, "feedback": "why"}
        }))
        .unwrap()
    }

    fn requests(policy: &ApprovalPolicy) -> Vec<PendingApproval> {
        let calls = vec![
            PendingCall {
                tool_call_id: "a".into(),
                tool: "write".into(),
                arguments: json!({"path": "x"}),
                summary: "write: x".into(),
                estimated_cost_usd: None,
            },
            PendingCall {
                tool_call_id: "b".into(),
                tool: "write".into(),
                arguments: json!({"path": "y"}),
                summary: "write: y".into(),
                estimated_cost_usd: Some(1.5),
            },
        ];
        pending_entries(&calls, 7, policy, |s| s.to_string())
    }

    #[test]
    fn decisions_match_by_id_and_digest_and_the_rest_are_refused() {
        let policy = ApprovalPolicy::default();
        let reqs = requests(&policy);
        assert_ne!(reqs[0].id, reqs[1].id);
        let approvals = vec![
            approval("ok", &reqs[0].id, &reqs[0].arguments_digest, "Approve"),
            approval("wrong", &reqs[1].id, &"0".repeat(64), "Approve"),
            approval("stray", "req-nothing", &reqs[1].arguments_digest, "Reject"),
        ];
        let s = standing(&reqs, &approvals, &policy, Timestamp::now());
        assert_eq!(s.settled.len(), 1);
        assert!(s.settled[0].decision.approved);
        assert_eq!(s.undecided.len(), 1);
        let reasons: Vec<&str> = s.refused.iter().map(|r| r.reason).collect();
        assert_eq!(reasons, ["DigestMismatch", "UnknownRequest"]);
        assert!(!s.ready());
    }

    #[test]
    fn an_expired_request_is_rejected_or_suspends_as_the_policy_says() {
        let mut policy = ApprovalPolicy {
            timeout_seconds: Some(1),
            ..Default::default()
        };
        let reqs = requests(&policy);
        let later = Timestamp::now()
            .checked_add(SignedDuration::from_secs(5))
            .unwrap();
        let s = standing(&reqs, &[], &policy, later);
        assert!(s.ready() && s.expired);
        assert!(s.settled.iter().all(|d| !d.decision.approved));
        policy.on_timeout = ApprovalTimeoutAction::Suspend;
        let s = standing(&reqs, &[], &policy, later);
        assert!(!s.ready() && s.suspend_for_timeout(&policy));
    }

    fn asks(v: Verdict) -> Option<String> {
        match v {
            Verdict::Ask { summary, .. } => Some(summary),
            Verdict::Run { .. } => None,
        }
    }

    #[test]
    fn the_policy_gates_gpu_sandboxes_and_named_tools_unless_auto() {
        let mut gate = PolicyGate {
            policy: ApprovalPolicy {
                gated_tools: vec!["write".into()],
                ..Default::default()
            },
            presets: Arc::new(HardwarePresets::builtin()),
            decisions: HashMap::new(),
            job_flavors: HashMap::new(),
            auto_approve_cap_usd: None,
        };
        let review = |g: &PolicyGate, tool: &str, args: Value| asks(g.review(tool, &args, 0.0));
        assert!(
            review(&gate, SANDBOX_CREATE_TOOL, json!({"hardware": "gpu-small"}))
                .is_some_and(|s| s.contains("gpu-small"))
        );
        assert!(review(&gate, SANDBOX_CREATE_TOOL, json!({"hardware": "cpu-basic"})).is_none());
        assert_eq!(
            review(&gate, "write", json!({"path": "/workspace/a"})).as_deref(),
            Some("write: /workspace/a")
        );
        assert!(review(&gate, "bash", json!({"command": "ls"})).is_none());
        gate.policy.mode = ApprovalMode::Auto;
        assert!(review(&gate, "write", json!({"path": "a"})).is_none());
    }

    #[test]
    fn job_runs_carry_their_cost_ceiling_and_budgeted_mode_runs_what_fits() {
        let flavors = vec![
            Flavor {
                name: "cpu-basic".into(),
                usd_per_hour: Some(0.01),
                ..Default::default()
            },
            Flavor {
                name: "a100-large".into(),
                usd_per_hour: Some(2.5),
                accelerated: true,
                ..Default::default()
            },
        ];
        let mut gate = PolicyGate {
            policy: ApprovalPolicy::default(),
            presets: Arc::new(HardwarePresets::builtin()),
            decisions: HashMap::new(),
            job_flavors: HashMap::from([(HF_JOBS_TOOL, (Some("cpu-basic".into()), flavors))]),
            auto_approve_cap_usd: Some(5.0),
        };
        let a100 = json!({"operation": "run", "script": "x", "hardware_flavor": "a100-large", "timeout": "90m"});
        match gate.review(HF_JOBS_TOOL, &a100, 0.0) {
            Verdict::Ask {
                summary,
                estimated_cost_usd,
            } => {
                assert_eq!(estimated_cost_usd, Some(3.75));
                assert!(
                    summary.contains("a100-large") && summary.contains("$3.75"),
                    "{summary}"
                );
            }
            other => panic!("{other:?}"),
        }
        let ps = json!({"operation": "ps"});
        assert!(asks(gate.review(HF_JOBS_TOOL, &ps, 0.0)).is_none());
        gate.policy.mode = ApprovalMode::Budgeted;
        assert_eq!(
            gate.review(HF_JOBS_TOOL, &a100, 1.0),
            Verdict::Run {
                estimated_cost_usd: Some(3.75)
            }
        );
        assert!(
            asks(gate.review(HF_JOBS_TOOL, &a100, 1.5)).is_some_and(|s| s.contains("$3.50 left"))
        );
        let unknown = json!({"operation": "run", "script": "x", "hardware_flavor": "h200"});
        assert!(
            asks(gate.review(HF_JOBS_TOOL, &unknown, 0.0)).is_some_and(|s| s.contains("no price"))
        );
        let scheduled = json!({"operation": "scheduled run", "script": "x", "schedule": "@daily"});
        assert!(asks(gate.review(HF_JOBS_TOOL, &scheduled, 0.0)).is_some());
    }
}
