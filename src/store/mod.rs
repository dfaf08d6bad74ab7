//! Durable storage of what a session did, outside its custom resource (etcd caps objects
//! near 1.5 MB): the transcript format and its ConfigMap-backed log.

pub mod configmap_log;
pub mod transcript;

pub use configmap_log::{StoreError, TranscriptStore};
pub use transcript::{Record, Replayed, digest, replay};
