//! Hugging Face Hub clients, written from the documented wire formats. Every client takes
//! a base URL (`HF_ENDPOINT`), so users can point it at a mirror and tests at a local
//! server.

pub mod job_logs;
pub mod jobs_api;

pub use jobs_api::{HfError, HfJobsClient};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
