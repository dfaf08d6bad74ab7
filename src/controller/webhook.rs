//! The admission webhook (`admissionregistration.k8s.io/v1`, mutating): it stamps who created
//! each AgentSession and AgentApproval, keeps those stamps and decided approvals unchanged,
//! and refuses a self-approval when the session's policy forbids it.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use kube::Api;
use serde_json::{Value, json};

use super::approvals::REQUESTED_BY_ANNOTATION;
use crate::api::AgentSession;

/// Path the webhook configuration points at.
pub const ADMIT_PATH: &str = "/admit";

/// What the webhook decided about one request.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Allowed, with JSON Patch operations to apply (possibly none).
    Allow(Vec<Value>),
    Deny(String),
}

/// The parts of an AdmissionRequest the rules look at.
pub struct Request<'a> {
    pub kind: &'a str,
    pub operation: &'a str,
    pub username: &'a str,
    pub object: &'a Value,
    pub old_object: &'a Value,
}

fn stamp(object: &Value) -> Option<&str> {
    object["metadata"]["annotations"][REQUESTED_BY_ANNOTATION].as_str()
}

/// The rules that need nothing but the request. `session_creator` answers for an approval
/// who created its session and whether that session forbids self-approval.
pub fn admit(request: &Request<'_>, session_creator: Option<(Option<String>, bool)>) -> Verdict {
    match request.operation {
        "CREATE" => {
            if request.kind == "AgentApproval"
                && let Some((Some(creator), true)) = &session_creator
                && creator == request.username
            {
                return Verdict::Deny(format!(
                    "{} created session {} and its approvalPolicy.forbidSelfApproval is true: someone else must approve",
                    request.username,
                    request.object["spec"]["sessionName"].as_str().unwrap_or("")
                ));
            }
            // Whatever the creator wrote there, the stamp is the authenticated user.
            let patch = if request.object["metadata"]["annotations"].is_object() {
                json!({"op": "add",
                       "path": format!("/metadata/annotations/{}", REQUESTED_BY_ANNOTATION.replace('~', "~0").replace('/', "~1")),
                       "value": request.username})
            } else {
                json!({"op": "add", "path": "/metadata/annotations",
                       "value": {REQUESTED_BY_ANNOTATION: request.username}})
            };
            Verdict::Allow(vec![patch])
        }
        "UPDATE" => {
            if stamp(request.object) != stamp(request.old_object) {
                return Verdict::Deny(format!(
                    "annotation {REQUESTED_BY_ANNOTATION} records who created this object and cannot change"
                ));
            }
            if request.kind == "AgentApproval"
                && request.object["spec"] != request.old_object["spec"]
            {
                return Verdict::Deny(
                    "an AgentApproval's decision cannot change once made; create a new AgentApproval instead"
                        .into(),
                );
            }
            Verdict::Allow(vec![])
        }
        _ => Verdict::Allow(vec![]),
    }
}

#[derive(Clone)]
struct WebhookState {
    client: kube::Client,
}

pub fn router(client: kube::Client) -> Router {
    Router::new()
        .route(ADMIT_PATH, post(review))
        .with_state(Arc::new(WebhookState { client }))
}

/// Who created the approval's session, and whether it forbids self-approval.
async fn session_creator(
    client: &kube::Client,
    namespace: &str,
    session: &str,
) -> Option<(Option<String>, bool)> {
    let api: Api<AgentSession> = Api::namespaced(client.clone(), namespace);
    let s = api.get_opt(session).await.ok().flatten()?;
    let creator = s
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REQUESTED_BY_ANNOTATION).cloned());
    Some((creator, s.spec.approval_policy.forbid_self_approval))
}

async fn review(State(state): State<Arc<WebhookState>>, Json(review): Json<Value>) -> Json<Value> {
    let req = &review["request"];
    let uid = req["uid"].clone();
    let request = Request {
        kind: req["kind"]["kind"].as_str().unwrap_or(""),
        operation: req["operation"].as_str().unwrap_or(""),
        username: req["userInfo"]["username"].as_str().unwrap_or(""),
        object: &req["object"],
        old_object: &req["oldObject"],
    };
    let creator = if request.kind == "AgentApproval" && request.operation == "CREATE" {
        let namespace = req["namespace"].as_str().unwrap_or("");
        let session = request.object["spec"]["sessionName"].as_str().unwrap_or("");
        session_creator(&state.client, namespace, session).await
    } else {
        None
    };
    let verdict = admit(&request, creator);
    tracing::debug!(
        kind = request.kind,
        operation = request.operation,
        user = request.username,
        ?verdict,
        "admission"
    );
    let response = match verdict {
        Verdict::Allow(patch) if patch.is_empty() => json!({"uid": uid, "allowed": true}),
        Verdict::Allow(patch) => json!({
            "uid": uid,
            "allowed": true,
            "patchType": "JSONPatch",
            "patch": base64::engine::general_purpose::STANDARD.encode(Value::Array(patch).to_string()),
        }),
        Verdict::Deny(message) => json!({
            "uid": uid,
            "allowed": false,
            "status": {"code": 403, "reason": "Forbidden", "message": message},
        }),
    };
    Json(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval(annotations: Value, decision: &str) -> Value {
        json!({"metadata": {"name": "a", "annotations": annotations},
               "spec": {"sessionName": "s", "decision": decision}})
    }

    #[test]
    fn creation_is_stamped_with_the_authenticated_user_even_over_a_forged_stamp() {
        let forged = approval(json!({REQUESTED_BY_ANNOTATION: "mallory"}), "Approve");
        let r = Request {
            kind: "AgentApproval",
            operation: "CREATE",
            username: "alice",
            object: &forged,
            old_object: &Value::Null,
        };
        assert_eq!(
            admit(&r, None),
            Verdict::Allow(vec![json!({"op": "add",
                "path": "/metadata/annotations/ml-intern.io~1requested-by", "value": "alice"})])
        );
        let bare = json!({"metadata": {"name": "s"}, "spec": {}});
        let r = Request {
            kind: "AgentSession",
            object: &bare,
            ..r
        };
        let Verdict::Allow(patch) = admit(&r, None) else {
            panic!("allowed");
        };
        assert_eq!(patch[0]["value"][REQUESTED_BY_ANNOTATION], "alice");
    }

    #[test]
    fn self_approval_is_refused_only_when_forbidden() {
        let a = approval(Value::Null, "Approve");
        let r = Request {
            kind: "AgentApproval",
            operation: "CREATE",
            username: "alice",
            object: &a,
            old_object: &Value::Null,
        };
        assert!(
            matches!(admit(&r, Some((Some("alice".into()), true))), Verdict::Deny(m) if m.contains("forbidSelfApproval"))
        );
        assert!(matches!(
            admit(&r, Some((Some("alice".into()), false))),
            Verdict::Allow(_)
        ));
        assert!(matches!(
            admit(&r, Some((Some("bob".into()), true))),
            Verdict::Allow(_)
        ));
    }

    #[test]
    fn stamps_and_decisions_do_not_change() {
        let old = approval(json!({REQUESTED_BY_ANNOTATION: "alice"}), "Reject");
        let flipped = approval(json!({REQUESTED_BY_ANNOTATION: "alice"}), "Approve");
        let restamped = approval(json!({REQUESTED_BY_ANNOTATION: "bob"}), "Reject");
        let r = |object| Request {
            kind: "AgentApproval",
            operation: "UPDATE",
            username: "bob",
            object,
            old_object: &old,
        };
        assert!(
            matches!(admit(&r(&flipped), None), Verdict::Deny(m) if m.contains("cannot change once made"))
        );
        assert!(
            matches!(admit(&r(&restamped), None), Verdict::Deny(m) if m.contains("requested-by"))
        );
        assert_eq!(admit(&r(&old), None), Verdict::Allow(vec![]));
    }
}
