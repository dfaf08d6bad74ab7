//! What every reconcile and session runner shares.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::AgentSession;
use crate::llm::catalog::ModelCatalog;
use crate::server::Metrics;
use crate::text::truncate_chars;

/// Controller-wide settings, from the command line.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Watch only this namespace; all namespaces when None.
    pub namespace: Option<String>,
    /// Agent loops allowed to run at once; the rest wait in Pending.
    pub max_concurrent_sessions: usize,
    /// Sandbox image for sessions that name none.
    pub default_sandbox_image: String,
    /// How long a sandbox pod may take to start.
    pub sandbox_startup_timeout: Duration,
    /// Where sandboxes may connect (their NetworkPolicy).
    pub sandbox_egress: crate::runtime::sandbox_template::EgressPolicy,
    /// Timeout of one model call.
    pub llm_timeout: Duration,
    /// Waits between retries of a model call that failed transiently.
    pub llm_retry_delays: Vec<Duration>,
    /// Waits between retries of a rate-limited model call.
    pub llm_rate_limit_delays: Vec<Duration>,
    /// Context windows, prices and the default model.
    pub models: Arc<ModelCatalog>,
    /// Hardware presets for sandboxes (`spec.sandbox.hardware`, `sandbox_create`).
    pub sandbox_hardware: Arc<crate::runtime::hardware::HardwarePresets>,
    /// How often a session waiting for a Secret looks again.
    pub pending_recheck: Duration,
    /// The Hugging Face Hub the `hf_jobs` tool talks to (`HF_ENDPOINT`).
    pub hf_endpoint: String,
    /// How often the controller looks at a session's unfinished jobs.
    pub job_follow_interval: Duration,
    /// Kueue LocalQueue that cluster jobs are submitted to (`kueue.x-k8s.io/queue-name`).
    pub job_queue: Option<String>,
    /// How long reading an HF job's logs waits for a line before returning what it has.
    pub hf_log_idle: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            namespace: None,
            max_concurrent_sessions: 16,
            default_sandbox_image: "python:3.12-slim".into(),
            sandbox_startup_timeout: Duration::from_secs(300),
            sandbox_egress: Default::default(),
            llm_timeout: Duration::from_secs(600),
            llm_retry_delays: vec![Duration::from_secs(5), Duration::from_secs(15)],
            llm_rate_limit_delays: vec![Duration::from_secs(30), Duration::from_secs(60)],
            models: Arc::new(ModelCatalog::builtin()),
            sandbox_hardware: Arc::new(crate::runtime::hardware::HardwarePresets::builtin()),
            pending_recheck: Duration::from_secs(10),
            hf_endpoint: crate::hf::DEFAULT_ENDPOINT.into(),
            job_follow_interval: Duration::from_secs(30),
            job_queue: None,
            hf_log_idle: Duration::from_secs(5),
        }
    }
}

/// A session this process has taken on, by uid.
pub enum SessionEntry {
    /// Its runner works (or waits for a slot) in this task; spec changes reach it through
    /// `spec`.
    Active {
        cancel: CancellationToken,
        task: JoinHandle<()>,
        spec: watch::Sender<Arc<AgentSession>>,
    },
    /// Its runner had nothing left to do at this spec generation. A cached object that
    /// still shows an older status is not mistaken for work left over.
    Finished { generation: Option<i64> },
}

pub struct Context {
    pub client: Client,
    pub config: ControllerConfig,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub sessions: Mutex<HashMap<String, SessionEntry>>,
    pub slots: Arc<Semaphore>,
    /// When reconcile last looked at each session's jobs (by uid): its own status writes
    /// trigger reconciles, which must not turn following into a busy loop.
    pub job_looks: Mutex<HashMap<String, std::time::Instant>>,
}

impl Context {
    pub fn new(client: Client, config: ControllerConfig) -> Self {
        let reporter = Reporter {
            controller: "ml-intern-controller".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            slots: Arc::new(Semaphore::new(config.max_concurrent_sessions.max(1))),
            client,
            config,
            metrics: Arc::new(Metrics::default()),
            ready: Arc::new(AtomicBool::new(false)),
            sessions: Mutex::new(HashMap::new()),
            job_looks: Mutex::new(HashMap::new()),
        }
    }

    /// Records a Kubernetes Event on `object`. Events are best effort: a failure is logged,
    /// never passed on.
    pub async fn publish(
        &self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: impl AsRef<str>,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            // events.k8s.io caps the note at 1 kB.
            note: Some(truncate_chars(note.as_ref(), 900)),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, object).await {
            tracing::warn!(error = %e, reason, "could not record event");
        }
    }
}
