//! Throughput of the sandbox runtime through the Kubernetes API: a `bash true` round trip
//! (one exec per command) and a 10 MB `write` then `read` (exec stdin and stdout), against
//! a real sandbox pod on the cluster in KUBECONFIG.
//!
//! Run: `KUBECONFIG=$(tests/cluster/local-k8s.sh kubeconfig) cargo bench --bench sandbox_exec`
//! (ROUNDS=N for the round trips, default 50; IMAGE= for another sandbox image).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, PostParams};
use ml_intern::runtime::sandbox_template::{SandboxSettings, default_resources, sandbox_pod};
use ml_intern::runtime::{SandboxEvent, SandboxPod};
use ml_intern::tools::{CommandRunner, FileSystem};
use serde_json::json;

const TEN_MB: usize = 10 * 1024 * 1024;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    ml_intern::http::install_crypto_provider();
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let image =
        std::env::var("IMAGE").unwrap_or_else(|_| "localhost/ml-intern-sandbox:busybox".into());
    let client = kube::Client::try_default()
        .await
        .expect("a cluster in KUBECONFIG");
    let namespace = format!("bench-sandbox-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap(),
        )
        .await
        .expect("create the benchmark namespace");
    // The pod is owned by its namespace's lifetime here; no session object is needed.
    let owner = OwnerReference {
        api_version: "v1".into(),
        kind: "Namespace".into(),
        name: namespace.clone(),
        uid: namespaces
            .get(&namespace)
            .await
            .ok()
            .and_then(|n| n.metadata.uid)
            .unwrap_or_default(),
        ..Default::default()
    };
    let settings = SandboxSettings {
        image,
        image_pull_policy: Some("Never".into()),
        resources: default_resources(),
        ..Default::default()
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let (events, _keep) = tokio::sync::mpsc::channel::<SandboxEvent>(16);
    let sandbox = SandboxPod::new(
        pods,
        sandbox_pod("bench", &namespace, owner, &settings),
        Duration::from_secs(120),
        events,
    );

    let started = Instant::now();
    sandbox
        .run("true", "/workspace", Duration::from_secs(60))
        .await
        .expect("the sandbox starts");
    println!("pod start + first command: {:.2?}", started.elapsed());

    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        let out = sandbox
            .run("true", "/workspace", Duration::from_secs(60))
            .await
            .expect("a command");
        assert_eq!(out.exit_code, Some(0));
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "bash true round trip over {rounds}: median {:.2?}, p90 {:.2?}, max {:.2?}",
        percentile(&times, 0.5),
        percentile(&times, 0.9),
        times[times.len() - 1]
    );

    let content: Vec<u8> = (0..TEN_MB).map(|i| b'a' + (i % 26) as u8).collect();
    let t = Instant::now();
    sandbox
        .write("/workspace/big.txt", &content, true)
        .await
        .expect("a 10 MB write");
    let write = t.elapsed();
    let t = Instant::now();
    let back = sandbox
        .read("/workspace/big.txt", None, 16 * 1024 * 1024)
        .await
        .expect("a 10 MB read");
    let read = t.elapsed();
    assert_eq!(back, content, "the file came back unchanged");
    let mb = TEN_MB as f64 / (1024.0 * 1024.0);
    println!(
        "10 MB write: {write:.2?} ({:.1} MB/s); read: {read:.2?} ({:.1} MB/s)",
        mb / write.as_secs_f64(),
        mb / read.as_secs_f64()
    );

    let _ = namespaces
        .delete(&namespace, &DeleteParams::default())
        .await;
}
