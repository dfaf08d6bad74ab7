//! One namespace and one controller process per test, on the cluster in KUBECONFIG. The
//! controller runs as its ServiceAccount with the shipped ClusterRole, so every test also
//! proves the RBAC rules are enough.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, AttachParams, ListParams, PostParams};
use kube::runtime::wait::await_condition;
use ml_intern::api::AgentSession;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

/// The busybox sandbox image that tests/run.sh loads into the node.
pub const SANDBOX_IMAGE: &str = "localhost/ml-intern-sandbox:busybox";
/// Debian bookworm with Python 3, loaded by tests/run.sh as well.
pub const PYTHON_IMAGE: &str = "localhost/ml-intern-sandbox:python";

#[derive(Default)]
pub struct E2eOptions {
    pub controller_args: Vec<String>,
    /// A model config for the controller (`--model-config`); `{namespace}` in it becomes
    /// the test's namespace.
    pub model_config: Option<String>,
    /// Serve the admission webhook and register it for the test's namespace.
    pub webhook: bool,
    /// Hardware presets for the controller (`--sandbox-hardware`).
    pub sandbox_hardware: Option<String>,
}

pub struct E2e {
    pub client: Client,
    pub namespace: String,
    /// Base URL of the controller's health and metrics server.
    pub http: String,
    controller: Option<Child>,
    controller_args: Vec<String>,
    pub log: PathBuf,
    /// The MutatingWebhookConfiguration registered for this test, if any.
    webhook: Option<String>,
}

struct Setup {
    controller_kubeconfig: PathBuf,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn kubectl(args: &[&str]) -> Output {
    Command::new("kubectl")
        .args(args)
        .output()
        .expect("kubectl runs")
}

fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl(args);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Installs the CRDs and the controller's RBAC, and writes a kubeconfig that authenticates
/// as the controller's ServiceAccount. Once per test process.
fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        assert!(
            std::env::var_os("KUBECONFIG").is_some(),
            "the e2e tests need a cluster: run them with tests/run.sh, or export KUBECONFIG \
             (tests/cluster/local-k8s.sh up starts a local one)"
        );
        kubectl_ok(&["apply", "-f", repo().join("crds").to_str().unwrap()]);
        kubectl_ok(&[
            "apply",
            "-f",
            repo().join("configs/rbac/controller.yaml").to_str().unwrap(),
        ]);
        kubectl_ok(&[
            "apply",
            "-f",
            repo().join("configs/rbac/user-roles.yaml").to_str().unwrap(),
        ]);
        kubectl_ok(&[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/agentsessions.ml-intern.io",
            "crd/agentapprovals.ml-intern.io",
        ]);
        // Kubernetes 1.20 creates a token Secret for every ServiceAccount.
        let mut token = String::new();
        for _ in 0..120 {
            let secret = kubectl(&[
                "-n",
                "ml-intern-system",
                "get",
                "serviceaccount",
                "ml-intern-controller",
                "-o",
                "jsonpath={.secrets[0].name}",
            ]);
            let name = String::from_utf8_lossy(&secret.stdout).trim().to_string();
            if !name.is_empty() {
                let data = kubectl(&[
                    "-n",
                    "ml-intern-system",
                    "get",
                    "secret",
                    &name,
                    "-o",
                    "jsonpath={.data.token}",
                ]);
                let b64 = String::from_utf8_lossy(&data.stdout).trim().to_string();
                if !b64.is_empty() {
                    let decoded = Command::new("base64")
                        .arg("-d")
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .spawn()
                        .and_then(|mut c| {
                            use std::io::Write;
                            c.stdin.take().unwrap().write_all(b64.as_bytes())?;
                            c.wait_with_output()
                        })
                        .expect("base64 runs");
                    token = String::from_utf8_lossy(&decoded.stdout).into_owned();
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        assert!(!token.is_empty(), "no token for the controller's ServiceAccount");
        let server = kubectl_ok(&[
            "config",
            "view",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ]);
        let dir = repo().join("target/e2e");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("controller.kubeconfig");
        let kubeconfig = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": server.trim(), "insecure-skip-tls-verify": true}}],
            "users": [{"name": "ml-intern-controller", "user": {"token": token}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "ml-intern-controller"}}],
            "current-context": "c"
        });
        std::fs::write(&path, kubeconfig.to_string()).unwrap();
        Setup {
            controller_kubeconfig: path,
        }
    })
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{:x}{:x}{}",
        std::process::id() % 0xfff,
        nanos % 0xffff,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A CA and a certificate for 127.0.0.1 signed by it, made once per test process.
fn webhook_certs() -> &'static Path {
    static CERTS: OnceLock<PathBuf> = OnceLock::new();
    CERTS.get_or_init(|| {
        let dir = repo().join(format!("target/e2e/webhook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        for args in [
            "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=ml-intern-e2e-ca",
            "req -newkey rsa:2048 -nodes -keyout tls.key -out tls.csr -subj /CN=127.0.0.1",
            "x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out tls.crt -days 2 -extfile san.ext",
        ] {
            let out = Command::new("openssl")
                .args(args.split(' '))
                .current_dir(&dir)
                .output()
                .expect("openssl runs");
            assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
        }
        dir
    })
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl E2e {
    pub async fn start(name: &str) -> Self {
        Self::start_with(name, E2eOptions::default()).await
    }

    pub async fn start_with(name: &str, options: E2eOptions) -> Self {
        setup();
        ml_intern::http::install_crypto_provider();
        let client = Client::try_default()
            .await
            .expect("a client for KUBECONFIG");
        let namespace = format!("e2e-{name}-{}", unique_suffix());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": namespace,
                    "labels": {"ml-intern.io/e2e-namespace": namespace}}}))
                .unwrap(),
            )
            .await
            .expect("create the test namespace");

        let mut controller_args = options.controller_args;
        if let Some(config) = options.model_config {
            let dir = repo().join("target/e2e/configs");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{namespace}-models.yaml"));
            std::fs::write(&path, config.replace("{namespace}", &namespace)).unwrap();
            controller_args.extend(["--model-config".into(), path.display().to_string()]);
        }
        if let Some(presets) = options.sandbox_hardware {
            let dir = repo().join("target/e2e/configs");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{namespace}-hardware.yaml"));
            std::fs::write(&path, presets).unwrap();
            controller_args.extend(["--sandbox-hardware".into(), path.display().to_string()]);
        }
        let webhook_port = free_port();
        if options.webhook {
            let certs = webhook_certs();
            controller_args.extend([
                "--webhook-addr".into(),
                format!("127.0.0.1:{webhook_port}"),
                "--webhook-cert".into(),
                certs.join("tls.crt").display().to_string(),
                "--webhook-key".into(),
                certs.join("tls.key").display().to_string(),
            ]);
        }
        let mut e2e = E2e {
            client,
            namespace,
            http: String::new(),
            controller: None,
            controller_args,
            log: PathBuf::new(),
            webhook: None,
        };
        e2e.start_controller().await;
        if options.webhook {
            e2e.register_webhook(webhook_port).await;
        }
        e2e
    }

    /// Points the apiserver at this test's controller for AgentSessions and AgentApprovals
    /// in this namespace, and waits until it answers.
    async fn register_webhook(&mut self, port: u16) {
        let name = format!("ml-intern-{}", self.namespace);
        let ca = std::fs::read(webhook_certs().join("ca.crt")).unwrap();
        let ca = base64_encode(&ca);
        let config = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{
                "name": "admission.ml-intern.io",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 5,
                "clientConfig": {"url": format!("https://127.0.0.1:{port}/admit"), "caBundle": ca},
                "namespaceSelector": {"matchLabels": {"ml-intern.io/e2e-namespace": self.namespace}},
                "rules": [{"apiGroups": ["ml-intern.io"], "apiVersions": ["v1alpha1"],
                           "operations": ["CREATE", "UPDATE"],
                           "resources": ["agentsessions", "agentapprovals"]}]
            }]
        });
        let out = self.kubectl_apply(&config.to_string());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.webhook = Some(name);
        // The apiserver picks up new webhook configurations after a moment.
        let probe = json!({"apiVersion": "ml-intern.io/v1alpha1", "kind": "AgentApproval",
            "metadata": {"name": "webhook-probe"},
            "spec": {"sessionName": "none", "requestId": "none", "argumentsDigest": "0".repeat(64),
                     "decision": "Reject"}})
        .to_string();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.kubectl_input(
                &["create", "--dry-run=server", "-o", "json", "-f", "-"],
                &probe,
            );
            if String::from_utf8_lossy(&out.stdout).contains("ml-intern.io/requested-by") {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the webhook did not start answering: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Starts a controller process for this namespace (again, after `stop_controller`).
    pub async fn start_controller(&mut self) {
        let setup = setup();
        let log_dir = repo().join("target/e2e/logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        self.log = log_dir.join(format!("{}.log", self.namespace));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let port = free_port();
        self.http = format!("http://127.0.0.1:{port}");
        let controller = Command::new(env!("CARGO_BIN_EXE_ml-intern"))
            .args([
                "controller",
                "--namespace",
                &self.namespace,
                "--http-addr",
                &format!("127.0.0.1:{port}"),
                "--sandbox-image",
                SANDBOX_IMAGE,
                "--sandbox-startup-timeout",
                "60",
                "--llm-retry-delays",
                "0.2,0.2",
                "--llm-rate-limit-delays",
                "0.2,0.2",
            ])
            .args(&self.controller_args)
            .env("KUBECONFIG", &setup.controller_kubeconfig)
            .env("RUST_LOG", "info,ml_intern=debug,kube_runtime=warn")
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start the controller");
        self.controller = Some(controller);
        self.wait_until_ready().await;
    }

    async fn wait_until_ready(&mut self) {
        let http = reqwest::Client::new();
        for _ in 0..120 {
            if let Some(Ok(Some(status))) = self.controller.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "the controller exited ({status}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            if let Ok(r) = http.get(format!("{}/readyz", self.http)).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "the controller was not ready within 30s:\n{}",
            self.log_tail()
        );
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Stops the controller process (as a crash or a rollout would).
    pub fn stop_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn sessions(&self) -> Api<AgentSession> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub async fn create_secret(&self, name: &str, key: &str, value: &str) {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name}, "stringData": {key: value}
        }))
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .expect("create the secret");
    }

    pub async fn create_session(&self, name: &str, spec: Value) -> AgentSession {
        let session: AgentSession = serde_json::from_value(json!({
            "apiVersion": "ml-intern.io/v1alpha1", "kind": "AgentSession",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": spec
        }))
        .expect("a valid AgentSession");
        self.sessions()
            .create(&PostParams::default(), &session)
            .await
            .expect("create the session")
    }

    /// Waits until `done` holds for the session, failing with its last status and the
    /// controller's log otherwise.
    pub async fn wait_for_session(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&AgentSession) -> bool + Send + 'static,
    ) -> AgentSession {
        let cond = move |s: Option<&AgentSession>| s.is_some_and(&done);
        match tokio::time::timeout(timeout, await_condition(self.sessions(), name, cond)).await {
            Ok(Ok(Some(s))) => s,
            other => {
                let last = self.sessions().get_opt(name).await.ok().flatten();
                panic!(
                    "session {name} did not reach '{what}' within {timeout:?} ({:?}); status: {:#?}\ncontroller log:\n{}",
                    other.err(),
                    last.and_then(|s| s.status),
                    self.log_tail()
                )
            }
        }
    }

    /// Waits until the session's `type_` condition has `status` ("True"/"False") or, when
    /// `status` is neither, that reason.
    pub async fn wait_for_condition(
        &self,
        name: &str,
        type_: &str,
        status_or_reason: &str,
        timeout: Duration,
    ) -> AgentSession {
        let (t, want) = (type_.to_string(), status_or_reason.to_string());
        let what = format!("{type_}={status_or_reason}");
        self.wait_for_session(name, timeout, &what, move |s| {
            s.status.as_ref().is_some_and(|st| {
                st.conditions
                    .iter()
                    .any(|c| c.type_ == t && (c.status == want || c.reason == want))
            })
        })
        .await
    }

    pub async fn wait_for_phase(&self, name: &str, phase: &str, timeout: Duration) -> AgentSession {
        let wanted = phase.to_string();
        self.wait_for_session(name, timeout, phase, move |s| {
            s.status
                .as_ref()
                .and_then(|st| st.phase)
                .is_some_and(|p| format!("{p:?}") == wanted)
        })
        .await
    }

    /// Waits until no object of `api` has this name.
    pub async fn wait_for_deletion<K>(&self, api: Api<K>, name: &str, timeout: Duration)
    where
        K: Clone + std::fmt::Debug + Send + serde::de::DeserializeOwned + kube::Resource + 'static,
    {
        self.wait_for_object(api, name, timeout, "gone", |o: Option<&K>| o.is_none())
            .await;
    }

    /// Waits until the object is gone or its deletion has been requested. For a pod that
    /// never started (an image that cannot be pulled) the 1.20 kubelet may take minutes to
    /// finish a deletion the controller asked for at once.
    pub async fn wait_for_deletion_requested<K>(&self, api: Api<K>, name: &str, timeout: Duration)
    where
        K: Clone + std::fmt::Debug + Send + serde::de::DeserializeOwned + kube::Resource + 'static,
    {
        let deleting = |o: Option<&K>| o.is_none_or(|o| o.meta().deletion_timestamp.is_some());
        self.wait_for_object(api, name, timeout, "being deleted", deleting)
            .await;
    }

    async fn wait_for_object<K>(
        &self,
        api: Api<K>,
        name: &str,
        timeout: Duration,
        what: &str,
        cond: impl Fn(Option<&K>) -> bool,
    ) where
        K: Clone + std::fmt::Debug + Send + serde::de::DeserializeOwned + kube::Resource + 'static,
    {
        if tokio::time::timeout(timeout, await_condition(api, name, cond))
            .await
            .is_err()
        {
            panic!(
                "{name} was still not {what} after {timeout:?}\ncontroller log:\n{}",
                self.log_tail()
            );
        }
    }

    /// Events recorded on the object named `name`, oldest first.
    pub async fn events_for(&self, name: &str) -> Vec<Event> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut list: Vec<Event> = events
            .list(&ListParams::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect();
        list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
        list
    }

    /// Waits until an Event with `reason` is recorded on `name`.
    pub async fn wait_for_event(&self, name: &str, reason: &str, timeout: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(e) = self
                .events_for(name)
                .await
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(reason))
            {
                return e;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {reason} event on {name} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Runs a command in a pod and returns its stdout.
    pub async fn exec(&self, pod: &str, command: &[&str]) -> String {
        self.try_exec(pod, command)
            .await
            .expect("exec into the pod")
    }

    async fn try_exec(&self, pod: &str, command: &[&str]) -> Result<String, kube::Error> {
        let mut process = self
            .pods()
            .exec(
                pod,
                command.to_vec(),
                &AttachParams::default().stderr(false),
            )
            .await?;
        let mut out = String::new();
        if let Some(mut stdout) = process.stdout() {
            let _ = stdout.read_to_string(&mut out).await;
        }
        let _ = process.join().await;
        Ok(out)
    }

    /// Waits until `command` run in the pod prints something `done` accepts; the pod may
    /// not exist yet.
    pub async fn wait_for_exec(
        &self,
        pod: &str,
        command: &[&str],
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::new();
        loop {
            let ready = self
                .pods()
                .get_opt(pod)
                .await
                .ok()
                .flatten()
                .is_some_and(|p| p.status.and_then(|s| s.phase).as_deref() == Some("Running"));
            if ready && let Ok(out) = self.try_exec(pod, command).await {
                if done(&out) {
                    return out;
                }
                last = out;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{command:?} in {pod} did not print what was expected within {timeout:?}; last output: {last:?}\ncontroller log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Merge-patches the session's spec, as `kubectl patch --type merge` would.
    pub async fn patch_spec(&self, name: &str, spec: Value) -> AgentSession {
        self.sessions()
            .patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .expect("patch the session spec")
    }

    /// The session's stored transcript records.
    pub async fn transcript(&self, name: &str) -> Vec<ml_intern::store::Record> {
        let session = self.sessions().get(name).await.expect("the session exists");
        let configmaps = Api::namespaced(self.client.clone(), &self.namespace);
        ml_intern::store::configmap_log::read_transcript(
            &configmaps,
            name,
            session.metadata.uid.as_deref().unwrap_or_default(),
        )
        .await
        .expect("the transcript is readable")
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        let mut full = vec!["-n", self.namespace.as_str()];
        full.extend_from_slice(args);
        kubectl(&full)
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.http))
            .await
            .expect("metrics endpoint answers")
            .text()
            .await
            .unwrap()
    }
}

impl Drop for E2e {
    fn drop(&mut self) {
        self.stop_controller();
        if let Some(name) = &self.webhook {
            let _ = kubectl(&[
                "delete",
                "mutatingwebhookconfiguration",
                name,
                "--wait=false",
            ]);
        }
        // Sessions carry a finalizer that only the (now stopped) controller removes.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "kubectl -n {ns} get agentsessions -o name | xargs -r kubectl -n {ns} patch --type=merge -p '{{\"metadata\":{{\"finalizers\":null}}}}' >/dev/null 2>&1; \
                 kubectl delete namespace {ns} --wait=false >/dev/null 2>&1",
                ns = self.namespace
            ))
            .status();
    }
}

impl E2e {
    /// `kubectl apply -f -` of `manifest` in the test namespace.
    /// A hostPath PersistentVolume bound to a claim `name` in the test namespace, writable
    /// by the sandbox user (the local cluster's node is this machine).
    pub async fn host_path_claim(&self, name: &str) -> String {
        let env = self;
        let dir = format!("/tmp/ml-intern-e2e-pv/{}", env.namespace);
        std::fs::create_dir_all(&dir).unwrap();
        std::process::Command::new("chmod")
            .args(["0777", &dir])
            .status()
            .unwrap();
        let pv_name = format!("{}-{name}", env.namespace);
        let pv = format!(
            r#"{{"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {{"name": "{pv_name}"}},
               "spec": {{"capacity": {{"storage": "1Gi"}}, "accessModes": ["ReadWriteOnce"],
                        "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                        "hostPath": {{"path": "{dir}", "type": "Directory"}}}}}}"#
        );
        let claim = format!(
            r#"{{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {{"name": "{name}"}},
               "spec": {{"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": "{pv_name}",
                        "resources": {{"requests": {{"storage": "1Gi"}}}}}}}}"#
        );
        for manifest in [pv, claim] {
            let out = env.kubectl_apply(&manifest);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        pv_name
    }

    pub fn kubectl_apply(&self, manifest: &str) -> Output {
        self.kubectl_apply_as(None, manifest)
    }

    /// `kubectl apply` as `user` (impersonated, so RBAC and admission see that user).
    pub fn kubectl_apply_as(&self, user: Option<&str>, manifest: &str) -> Output {
        let mut args = vec![];
        let as_user = user.map(|u| format!("--as={u}"));
        if let Some(a) = &as_user {
            args.push(a.as_str());
        }
        args.extend(["apply", "-f", "-"]);
        self.kubectl_input(&args, manifest)
    }

    /// kubectl in the test namespace with `input` on stdin.
    pub fn kubectl_input(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .args(["-n", &self.namespace])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }
}
