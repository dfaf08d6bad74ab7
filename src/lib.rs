//! ml-intern: a Kubernetes operator that runs autonomous ML-engineer agents.
//!
//! The agent core (`agent`, `llm`, `tools`) has no Kubernetes types; `runtime` adapts it to
//! pods, and `controller` reconciles `AgentSession` resources (`api`).

pub mod agent;
pub mod api;
pub mod controller;
pub mod crdgen;
pub mod hf;
pub mod http;
pub mod llm;
pub mod redact;
pub mod runtime;
pub mod server;
pub mod store;
pub mod text;
pub mod tools;
