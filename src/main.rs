use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use ml_intern::controller::{self, ControllerConfig};
use ml_intern::llm::catalog::ModelCatalog;
use ml_intern::runtime::hardware::HardwarePresets;

#[derive(Parser)]
#[command(
    name = "ml-intern",
    version,
    about = "Autonomous ML-engineer agents on Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the AgentSession controller against the cluster in KUBECONFIG or in-cluster.
    Controller(Box<ControllerArgs>),
    /// Print a session's stored transcript as JSON lines (messages, turns and events).
    Transcript {
        /// Name of the AgentSession.
        session: String,
        /// Its namespace; the kubeconfig's namespace when unset.
        #[arg(long, short)]
        namespace: Option<String>,
        /// Only the conversation's messages, as the model last saw them.
        #[arg(long)]
        messages: bool,
    },
    /// Write the CRD manifests into a directory.
    Crdgen {
        /// Directory to write to.
        #[arg(long, default_value = "crds")]
        out_dir: PathBuf,
    },
}

#[derive(Args)]
struct ControllerArgs {
    /// Watch only this namespace (all namespaces when unset).
    #[arg(long, env = "ML_INTERN_NAMESPACE")]
    namespace: Option<String>,
    /// Agent loops that may run at once; further sessions wait in Pending.
    #[arg(long, default_value_t = 16)]
    max_concurrent_sessions: usize,
    /// Sandbox image for sessions whose spec.sandbox.image is unset.
    #[arg(long, default_value = "python:3.12-slim")]
    sandbox_image: String,
    /// Seconds a sandbox pod may take to start before the session fails.
    #[arg(long, default_value_t = 300)]
    sandbox_startup_timeout: u64,
    /// CIDRs sandboxes may connect to (comma-separated; `none` for DNS only). Enforced by
    /// the cluster's NetworkPolicy implementation.
    #[arg(long, default_value = "0.0.0.0/0,::/0")]
    sandbox_egress: String,
    /// Ranges sandboxes may never reach, carved out of the allowed CIDRs (comma-separated;
    /// `none` for no exception). The default blocks the cloud metadata endpoint.
    #[arg(long, default_value = "169.254.169.254/32")]
    sandbox_egress_except: String,
    /// Seconds one model call may take.
    #[arg(long, default_value_t = 600)]
    llm_timeout: u64,
    /// Seconds to wait before each retry of a failing model call, comma separated; their
    /// count is the number of retries.
    #[arg(long, default_value = "5,15", value_delimiter = ',')]
    llm_retry_delays: Vec<f64>,
    /// Seconds to wait before each retry of a rate-limited model call (HTTP 429 or a rate
    /// limit message), comma separated.
    #[arg(long, default_value = "30,60", value_delimiter = ',')]
    llm_rate_limit_delays: Vec<f64>,
    /// YAML file with the default model, context windows and prices (see
    /// configs/controller/models.yaml, which is built in and used when unset).
    #[arg(long, env = "ML_INTERN_MODEL_CONFIG")]
    model_config: Option<PathBuf>,
    /// YAML file of sandbox hardware presets (see configs/controller/sandbox-hardware.yaml,
    /// which is built in and used when this is unset).
    #[arg(long)]
    sandbox_hardware: Option<PathBuf>,
    /// The Hugging Face Hub for `hf_jobs` (a mirror, or a local server in tests).
    #[arg(long, env = "HF_ENDPOINT", default_value = ml_intern::hf::DEFAULT_ENDPOINT)]
    hf_endpoint: String,
    /// Seconds between the controller's looks at a session's unfinished jobs (state,
    /// metrics, cost).
    #[arg(long, default_value_t = 30.0)]
    job_follow_interval: f64,
    /// Kueue LocalQueue for cluster jobs: sets their `kueue.x-k8s.io/queue-name` label.
    #[arg(long)]
    job_queue: Option<String>,
    /// Seconds reading an HF job's logs waits for another line before returning.
    #[arg(long, default_value_t = 5.0)]
    hf_log_idle: f64,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Serve the admission webhook over TLS here (e.g. 0.0.0.0:9443); off when unset.
    #[arg(long, requires_all = ["webhook_cert", "webhook_key"])]
    webhook_addr: Option<SocketAddr>,
    /// PEM certificate chain of the webhook (its names must match the webhook's URL or
    /// Service); cert-manager or `openssl` can make one.
    #[arg(long)]
    webhook_cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long)]
    webhook_key: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Controller(args) => run_controller(*args).await,
        Command::Crdgen { out_dir } => crdgen(&out_dir),
        Command::Transcript {
            session,
            namespace,
            messages,
        } => print_transcript(&session, namespace, messages).await,
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn seconds(flag: &str, values: &[f64]) -> Result<Vec<Duration>, String> {
    values
        .iter()
        .map(|d| {
            if d.is_finite() && *d >= 0.0 {
                Ok(Duration::from_secs_f64(*d))
            } else {
                Err(format!("{flag}: {d} is not a number of seconds"))
            }
        })
        .collect()
}

async fn print_transcript(
    session: &str,
    namespace: Option<String>,
    messages_only: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    use kube::ResourceExt;
    use std::io::Write;
    ml_intern::http::install_crypto_provider();
    let client = kube::Client::try_default().await?;
    let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_string());
    let sessions: kube::Api<ml_intern::api::AgentSession> =
        kube::Api::namespaced(client.clone(), &namespace);
    let object = sessions.get(session).await?;
    let uid = object.uid().unwrap_or_default();
    let configmaps = kube::Api::namespaced(client, &namespace);
    let records =
        ml_intern::store::configmap_log::read_transcript(&configmaps, session, &uid).await?;
    let mut out = std::io::stdout().lock();
    if messages_only {
        for m in ml_intern::store::replay(&records).history {
            writeln!(out, "{}", serde_json::to_string(&m)?)?;
        }
    } else {
        for r in &records {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
    }
    Ok(())
}

fn crdgen(out_dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(out_dir)?;
    for (file, yaml) in ml_intern::crdgen::crd_manifests()? {
        let path = out_dir.join(file);
        std::fs::write(&path, yaml)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

async fn run_controller(args: ControllerArgs) -> Result<(), Box<dyn std::error::Error>> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube_runtime=warn,kube_client=warn"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    ml_intern::http::install_crypto_provider();
    let delays = seconds("--llm-retry-delays", &args.llm_retry_delays)?;
    let rate_limit_delays = seconds("--llm-rate-limit-delays", &args.llm_rate_limit_delays)?;
    let models = load_config(
        "--model-config",
        args.model_config.as_deref(),
        ModelCatalog::parse,
        ModelCatalog::builtin,
    )?;
    let hardware = load_config(
        "--sandbox-hardware",
        args.sandbox_hardware.as_deref(),
        HardwarePresets::parse,
        HardwarePresets::builtin,
    )?;
    let config = ControllerConfig {
        namespace: args.namespace,
        max_concurrent_sessions: args.max_concurrent_sessions.max(1),
        default_sandbox_image: args.sandbox_image,
        sandbox_startup_timeout: Duration::from_secs(args.sandbox_startup_timeout),
        sandbox_egress: ml_intern::runtime::sandbox_template::EgressPolicy {
            allow: cidr_list(&args.sandbox_egress),
            except: cidr_list(&args.sandbox_egress_except),
        },
        llm_timeout: Duration::from_secs(args.llm_timeout),
        llm_retry_delays: delays,
        llm_rate_limit_delays: rate_limit_delays,
        models: std::sync::Arc::new(models),
        sandbox_hardware: std::sync::Arc::new(hardware),
        hf_endpoint: args.hf_endpoint,
        job_follow_interval: seconds("--job-follow-interval", &[args.job_follow_interval])?[0],
        job_queue: args.job_queue.filter(|q| !q.is_empty()),
        hf_log_idle: seconds("--hf-log-idle", &[args.hf_log_idle])?[0],
        ..ControllerConfig::default()
    };
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot connect to Kubernetes (KUBECONFIG or in-cluster): {e}"))?;
    let webhook = match (args.webhook_addr, &args.webhook_cert, &args.webhook_key) {
        (Some(addr), Some(cert), Some(key)) => Some((
            addr,
            ml_intern::server::tls::server_config(cert, key)
                .map_err(|e| format!("--webhook-cert/--webhook-key: {e}"))?,
        )),
        _ => None,
    };
    controller::run(client, config, args.http_addr, webhook).await
}

/// A comma-separated CIDR list; `none` or nothing is empty.
fn cidr_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty() && *c != "none")
        .map(str::to_string)
        .collect()
}

/// A YAML config file given by `flag`, or the built-in one.
fn load_config<T>(
    flag: &str,
    path: Option<&std::path::Path>,
    parse: fn(&str) -> Result<T, String>,
    builtin: fn() -> T,
) -> Result<T, String> {
    let Some(path) = path else {
        return Ok(builtin());
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{flag} {}: {e}", path.display()))
}
