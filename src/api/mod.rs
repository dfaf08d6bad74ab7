//! Custom resource types of the `ml-intern.io/v1alpha1` API.

pub mod approval;
pub mod session;

pub use approval::{
    AgentApproval, AgentApprovalSpec, AgentApprovalStatus, ApprovalDecision, ApprovalPhase,
};
pub use session::{
    AgentSession, AgentSessionSpec, AgentSessionStatus, BudgetSpec, ContextStatus, HuggingFaceSpec,
    LlmApi, LlmSpec, PlanEntry, SandboxSpec, SandboxStatus, SecretKeyRef, SessionPhase, TokenUsage,
    TranscriptStatus, WorkspaceSpec,
};

/// API group of every resource this operator defines.
pub const GROUP: &str = "ml-intern.io";

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    /// Everything in `written` survives the round trip into `read` (defaults may be added).
    fn kept(written: &serde_json::Value, read: &serde_json::Value) -> bool {
        match written {
            serde_json::Value::Object(m) => m.iter().all(|(k, v)| kept(v, &read[k])),
            other => other == read,
        }
    }

    /// The samples users start from are valid sessions (unknown fields would be dropped
    /// by the apiserver's pruning, so they are refused here).
    #[test]
    fn the_sample_sessions_are_valid() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/samples");
        let mut sessions = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_norway::Deserializer::from_str(&text) {
                let value = serde_json::Value::deserialize(doc).unwrap();
                if value["kind"] != "AgentSession" {
                    continue;
                }
                let session: super::AgentSession = serde_json::from_value(value.clone())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let back = serde_json::to_value(&session).unwrap();
                assert!(
                    kept(&value["spec"], &back["spec"]),
                    "{}: a field is unknown or misspelled",
                    path.display()
                );
                sessions += 1;
            }
        }
        assert!(sessions >= 2);
    }
}
