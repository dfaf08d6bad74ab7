//! Where tool calls execute. Kubernetes-aware adapters that implement the agent core's
//! execution traits.

pub mod cluster_job;
pub mod hardware;
pub mod hf_job;
pub mod sandbox_pod;
pub mod sandbox_template;

pub use sandbox_pod::{SandboxEvent, SandboxPod};
pub use sandbox_template::{SandboxSettings, sandbox_pod_name};

/// Label every object this operator creates carries, so they can be listed and watched.
pub const MANAGED_BY_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "ml-intern");
/// Label naming the session a child object belongs to.
pub const SESSION_LABEL: &str = "ml-intern.io/session";
