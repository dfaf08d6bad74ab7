//! The AgentSession controller: reconciles sessions, runs one agent loop per session in a
//! bounded pool, and records progress in status and Kubernetes Events.

pub mod approvals;
pub mod context;
pub mod credentials;
pub mod job_follower;
pub mod reconcile;
pub mod session_runner;
pub mod status;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

pub use context::{Context, ControllerConfig};

use crate::api::{AgentApproval, AgentSession};
use crate::runtime::MANAGED_BY_LABEL;

/// Name under which the controller writes status (server-side apply) and Events.
pub const FIELD_MANAGER: &str = "ml-intern-controller";
/// Finalizer that lets the controller stop a session's loop and remove its sandbox first.
pub const FINALIZER: &str = "ml-intern.io/cleanup";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the object has no {0}")]
    MissingField(&'static str),
    #[error(
        "the AgentSession CRD is not installed or not readable ({0}); install it with `kubectl apply -f crds/`"
    )]
    CrdMissing(String),
}

/// Runs the controller and its HTTP server until SIGTERM or Ctrl-C.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    http_addr: SocketAddr,
    webhook: Option<(SocketAddr, Arc<rustls::ServerConfig>)>,
) -> Result<(), Box<dyn std::error::Error>> {
    let (sessions, pods): (Api<AgentSession>, Api<Pod>) = match &config.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    // Fail at start with an install hint rather than with a watch that errors forever.
    sessions
        .list(&ListParams::default().limit(1))
        .await
        .map_err(|e| Error::CrdMissing(crate::runtime::sandbox_pod::kube_error_text(&e)))?;

    let ctx = Arc::new(Context::new(client.clone(), config));
    let server = crate::server::serve(http_addr, ctx.metrics.clone(), ctx.ready.clone());
    let server = tokio::spawn(server);
    let webhook = match webhook {
        Some((addr, tls)) => {
            let listener = crate::server::tls::TlsListener::bind(addr, tls).await?;
            tracing::info!(%addr, "serving the admission webhook");
            let app = webhook::router(client.clone());
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "admission webhook stopped");
                }
            }))
        }
        None => None,
    };

    let pod_watch = watcher::Config::default()
        .labels(&format!("{}={}", MANAGED_BY_LABEL.0, MANAGED_BY_LABEL.1));
    let controller_config = controller::Config::default()
        .concurrency(8)
        .debounce(Duration::from_millis(200));
    ctx.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::info!(namespace = ?ctx.config.namespace, "controller started");
    // A decision re-runs its session's reconcile (the session object does not change).
    let approvals: Api<AgentApproval> = match &ctx.config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    Controller::new(sessions, watcher::Config::default())
        .owns(pods, pod_watch)
        .watches(approvals, watcher::Config::default(), |a: AgentApproval| {
            let namespace = a.namespace()?;
            Some(ObjectRef::<AgentSession>::new(&a.spec.session_name).within(&namespace))
        })
        .with_config(controller_config)
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile did not complete");
            }
        })
        .await;
    ctx.ready.store(false, std::sync::atomic::Ordering::SeqCst);
    server.abort();
    if let Some(w) = webhook {
        w.abort();
    }
    tracing::info!("controller stopped");
    Ok(())
}
