//! `AgentApproval`: a human's decision on a tool call an AgentSession is waiting on.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ml-intern.io",
    version = "v1alpha1",
    kind = "AgentApproval",
    namespaced,
    status = "AgentApprovalStatus",
    shortname = "agapproval",
    category = "ml-intern",
    printcolumn = r#"{"name":"Session","type":"string","jsonPath":".spec.sessionName","description":"Session whose call this decides"}"#,
    printcolumn = r#"{"name":"Request","type":"string","jsonPath":".spec.requestId","description":"Request in the session's status.pendingApprovals"}"#,
    printcolumn = r#"{"name":"Decision","type":"string","jsonPath":".spec.decision","description":"Approve or Reject"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Whether the controller applied it"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "A decision on a tool call an AgentSession waits for (status.pendingApprovals)."
)]
#[serde(rename_all = "camelCase")]
pub struct AgentApprovalSpec {
    /// The AgentSession, in the same namespace.
    #[schemars(length(min = 1))]
    pub session_name: String,
    /// `id` of the request in the session's `status.pendingApprovals`.
    #[schemars(length(min = 1))]
    pub request_id: String,
    /// `argumentsDigest` of that request: the decision holds only for exactly those
    /// arguments.
    #[schemars(regex(pattern = "^[0-9a-f]{64}$"))]
    pub arguments_digest: String,
    /// `Approve` runs the call; `Reject` tells the model it was refused (with `feedback`).
    pub decision: ApprovalDecision,
    /// Told to the model: why it was rejected, or what to keep in mind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4000))]
    pub feedback: Option<String>,
    /// With `Approve`: the arguments to run the call with instead (e.g. an edited training
    /// script). The model is told the call was edited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub edited_arguments: Option<serde_json::Value>,
}

fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "description": "With Approve: the arguments to run the call with instead (e.g. an edited training script). The model is told the call was edited."
    })
}

// An optional enum would get `null` among its values, which apiservers refuse.
fn phase_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": ["Applied", "Refused"],
        "description": "`Applied` once the session acted on it, `Refused` when it matches no request (the `Applied` condition says why)."
    })
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ApprovalDecision {
    Approve,
    Reject,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentApprovalStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "phase_schema")]
    pub phase: Option<ApprovalPhase>,
    /// `Applied` with the reason it was or was not applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When the session acted on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<Time>,
}

/// `Applied` once the session acted on it, `Refused` when it matches no request (the
/// `Applied` condition says why).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ApprovalPhase {
    Applied,
    Refused,
}
