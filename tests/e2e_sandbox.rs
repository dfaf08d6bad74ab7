//! The runtime tools (bash, read, write, edit) in a real sandbox pod on the local cluster.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{E2e, ScriptedLlm, Step, tool_results};

const MINUTE: Duration = Duration::from_secs(60);

const HARDWARE: &str = r#"default: small
presets:
  small:
    description: tiny
    resources:
      requests: {cpu: 50m, memory: 64Mi}
  big:
    description: bigger
    resources:
      requests: {cpu: 100m, memory: 128Mi}
      limits: {cpu: 300m, memory: 256Mi}
    nodeSelector: {kubernetes.io/os: linux}
"#;

#[tokio::test]
async fn read_write_edit_and_bash_keep_their_contracts_in_a_real_pod() {
    let env = E2e::start("filetools").await;
    let long_line = "λ".repeat(5000);
    let content = format!("first: ünïcödé ✓\n{long_line}\ntarget line\ndup\ndup\nlast\n");
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "printf 'original\\n' > made.txt; printf 'a\\0b' > blob.bin"}),
        )]),
        Step::ToolCalls(vec![("write", json!({"path": "made.txt", "content": "x"}))]),
        Step::ToolCalls(vec![(
            "write",
            json!({"path": "notes/ünï.txt", "content": content}),
        )]),
        Step::ToolCalls(vec![(
            "edit",
            json!({"path": "/workspace/notes/ünï.txt", "old_str": "target line", "new_str": "edited → ✓"}),
        )]),
        Step::ToolCalls(vec![(
            "edit",
            json!({"path": "notes/ünï.txt", "old_str": "dup", "new_str": "x"}),
        )]),
        Step::ToolCalls(vec![("read", json!({"path": "notes/ünï.txt"}))]),
        Step::ToolCalls(vec![
            ("read", json!({"path": "notes/ünï.txt", "offset": 3, "limit": 2})),
            ("read", json!({"path": "blob.bin"})),
            ("read", json!({"path": "/workspace"})),
            ("read", json!({"path": "missing.txt"})),
        ]),
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "head -c 1000000 /dev/zero | tr '\\0' y; echo; echo END-OF-OUTPUT"}),
        )]),
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "sleep 300 & sleep 301; echo never", "timeout": 2}),
        )]),
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "ps -o args | grep -x 'sleep 30[01]' || echo no-sleep-left; cat made.txt; wc -c < $(ls /tmp/bash_output_*.txt)"}),
        )]),
        Step::Answer("done".into()),
    ])
    .await;
    env.create_session(
        "files",
        json!({"prompt": "Work with files.", "model": "openai/scripted",
               "llm": {"baseUrl": llm.base_url}, "sandbox": {"imagePullPolicy": "Never"}}),
    )
    .await;
    env.wait_for_phase("files", "Succeeded", 3 * MINUTE).await;
    let requests = llm.requests();
    let results = tool_results(&requests.last().unwrap().body);
    assert_eq!(results.len(), 13, "{results:#?}");

    assert!(
        results[1].contains("exists and was not read in this session"),
        "a file the model never read is not overwritten: {}",
        results[1]
    );
    assert_eq!(
        results[2],
        format!(
            "Wrote {} bytes (6 lines) to /workspace/notes/ünï.txt.",
            content.len()
        )
    );
    assert!(
        results[3].starts_with("Edited /workspace/notes/ünï.txt: replaced 1 occurrence (line 3)"),
        "{}",
        results[3]
    );
    assert!(
        results[4].contains("occurs 2 times") && results[4].contains("lines 4, 5"),
        "{}",
        results[4]
    );
    let cut_line: String = long_line.chars().take(4000).collect();
    assert_eq!(
        results[5],
        format!(
            "     1\tfirst: ünïcödé ✓\n     2\t{cut_line}...\n     3\tedited → ✓\n     4\tdup\n     5\tdup\n     6\tlast\n"
        )
    );
    assert_eq!(
        results[6],
        "     3\tedited → ✓\n     4\tdup\n\n(showing lines 3-4; more follow: read again with offset=5)\n"
    );
    assert!(results[7].contains("binary file"), "{}", results[7]);
    assert!(results[8].contains("is a directory"), "{}", results[8]);
    assert_eq!(results[9], "ERROR: /workspace/missing.txt does not exist.");

    let big = &results[10];
    assert!(
        big.contains("characters omitted") && big.contains("END-OF-OUTPUT"),
        "a 1 MB output is cut to its head and tail"
    );
    assert!(big.len() < 30_000, "{} bytes reached the model", big.len());
    let saved = big
        .split_whitespace()
        .find(|w| w.starts_with("/tmp/bash_output_"))
        .expect("the path of the full output")
        .trim_end_matches('.');
    assert!(
        results[11].contains("timed out after 2s"),
        "{}",
        results[11]
    );
    let last: Vec<&str> = results[12].lines().map(str::trim).collect();
    assert_eq!(
        last[..2],
        ["no-sleep-left", "original"],
        "the timed-out command's whole process group was stopped"
    );
    assert_eq!(last[2], "1000015", "all of {saved} was saved in the pod");
}

#[tokio::test]
async fn the_sandbox_pod_is_hardened_fenced_and_shaped_by_the_spec() {
    let env = E2e::start("podspec").await;
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "id -u; printf '%s' \"$HF_TOKEN\" | wc -c; echo \"from=$FROM_SECRET\"; \
                   touch /etc/x 2>&1 || echo no-root-write; \
                   ls /var/run/secrets/kubernetes.io/serviceaccount 2>&1 || echo no-token"}),
        )]),
        Step::AnswerWhenReleased(release.clone(), "checked".into()),
    ])
    .await;
    env.create_secret("hf", "token", "hf_0123456789abcdefghij")
        .await;
    env.create_secret("extra", "FROM_SECRET", "yes").await;
    env.create_session(
        "shaped",
        json!({"prompt": "Check the sandbox.", "model": "openai/scripted",
               "llm": {"baseUrl": llm.base_url},
               "sandbox": {
                   "imagePullPolicy": "Never",
                   "resources": {"requests": {"cpu": "50m"}},
                   "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
                   "envFrom": [{"secretRef": {"name": "extra"}}],
                   "nodeSelector": {"kubernetes.io/os": "linux"},
                   "tolerations": [{"key": "example.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   "workspace": {"sizeLimit": "1Gi"}
               }}),
    )
    .await;
    let requests = llm.wait_for_requests(2, 2 * MINUTE).await;
    let out = tool_results(&requests[1].body).remove(0);
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines[0], "1000", "runs as the fixed non-root user: {out}");
    assert_eq!(lines[1], "23", "HF_TOKEN from the named Secret: {out}");
    assert_eq!(lines[2], "from=yes", "envFrom: {out}");
    assert!(out.contains("no-root-write"), "{out}");
    assert!(out.contains("no-token"), "no service account token: {out}");

    let pod = env.pods().get("shaped-sandbox").await.unwrap();
    let spec = pod.spec.unwrap();
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.enable_service_links, Some(false));
    let psc = spec.security_context.unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.run_as_user, Some(1000));
    assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    assert_eq!(spec.node_selector.unwrap()["kubernetes.io/os"], "linux");
    assert_eq!(
        spec.tolerations.unwrap()[0].key.as_deref(),
        Some("example.com/gpu")
    );
    let workspace = &spec.volumes.as_ref().unwrap()[0];
    assert_eq!(
        workspace
            .empty_dir
            .as_ref()
            .unwrap()
            .size_limit
            .as_ref()
            .unwrap()
            .0,
        "1Gi"
    );
    let c = &spec.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
        &["ALL"]
    );
    let r = c.resources.as_ref().unwrap();
    assert_eq!(r.requests.as_ref().unwrap()["cpu"].0, "50m");
    assert_eq!(r.limits.as_ref().unwrap()["cpu"].0, "50m");
    assert_eq!(r.limits.as_ref().unwrap()["memory"].0, "4Gi");

    let policies: kube::Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        kube::Api::namespaced(env.client.clone(), &env.namespace);
    let policy = policies.get("shaped-sandbox").await.unwrap();
    let owner = &policy.metadata.owner_references.unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("AgentSession", "shaped")
    );
    let p = policy.spec.unwrap();
    assert_eq!(p.policy_types.unwrap(), ["Ingress", "Egress"]);
    assert!(
        p.ingress.unwrap_or_default().is_empty(),
        "Ingress in policyTypes with no rule: nothing may connect"
    );
    let selector = p.pod_selector.unwrap().match_labels.unwrap();
    let labels = pod.metadata.labels.unwrap();
    assert!(
        selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "it selects the pod"
    );
    release.notify_one();
    env.wait_for_phase("shaped", "Succeeded", MINUTE).await;
}

/// Runs a session whose sandbox pod is deleted while a command runs, and returns what the
/// model was told by that command and by the next one.
async fn lose_the_pod(env: &E2e, session: &str, workspace: Value) -> (String, String) {
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "echo kept > /workspace/keep.txt; sleep 120"}),
        )]),
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "cat /workspace/keep.txt 2>&1 || echo missing"}),
        )]),
        Step::Answer("done".into()),
    ])
    .await;
    env.create_session(
        session,
        json!({"prompt": "Keep a file.", "model": "openai/scripted",
               "llm": {"baseUrl": llm.base_url},
               "sandbox": {"imagePullPolicy": "Never", "workspace": workspace}}),
    )
    .await;
    let pod = format!("{session}-sandbox");
    env.wait_for_exec(&pod, &["cat", "/workspace/keep.txt"], 2 * MINUTE, |out| {
        out.contains("kept")
    })
    .await;
    env.pods()
        .delete(&pod, &Default::default())
        .await
        .expect("delete the sandbox pod");
    env.wait_for_phase(session, "Succeeded", 2 * MINUTE).await;
    env.wait_for_event(session, "SandboxLost", MINUTE).await;
    let requests = llm.requests();
    let results = tool_results(&requests.last().unwrap().body);
    (results[0].clone(), results[1].clone())
}

#[tokio::test]
async fn a_sandbox_pod_lost_mid_session_is_recreated_and_the_model_is_told() {
    let env = E2e::start("podloss").await;
    let (during, after) = lose_the_pod(&env, "scratch", json!({})).await;
    assert!(
        during.contains("The sandbox pod was lost while this command ran"),
        "{during}"
    );
    assert!(
        after.starts_with(
            "[The sandbox pod was lost and a new one was started. /workspace was not persistent"
        ),
        "{after}"
    );
    assert!(
        after.contains("missing"),
        "the emptyDir went with the pod: {after}"
    );

    let pv = env.host_path_claim("work").await;
    let (during, after) = lose_the_pod(&env, "durable", json!({"claimName": "work"})).await;
    assert!(during.contains("lost while this command ran"), "{during}");
    assert!(
        after.contains("PersistentVolumeClaim and was kept") && after.contains("\nkept"),
        "the claim kept the file: {after}"
    );
    let _ = env.kubectl(&["delete", "pv", &pv, "--wait=false"]);
}

#[tokio::test]
async fn an_eager_sandbox_starts_before_any_tool_call_and_is_kept_for_a_while_after() {
    let env = E2e::start("retention").await;
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let llm = ScriptedLlm::start(vec![Step::AnswerWhenReleased(
        release.clone(),
        "nothing to run".into(),
    )])
    .await;
    env.create_session(
        "kept",
        json!({"prompt": "Answer.", "model": "openai/scripted",
               "llm": {"baseUrl": llm.base_url},
               "sandbox": {"imagePullPolicy": "Never", "eager": true,
                           "keepAfterCompletionSeconds": 5}}),
    )
    .await;
    // The model has not asked for a tool, yet the pod comes up.
    env.wait_for_condition("kept", "SandboxReady", "True", 2 * MINUTE)
        .await;
    assert_eq!(llm.requests().len(), 1);
    release.notify_one();
    env.wait_for_phase("kept", "Succeeded", MINUTE).await;
    env.wait_for_session("kept", MINUTE, "an idle deadline for the pod", |s| {
        s.status
            .as_ref()
            .and_then(|st| st.sandbox.as_ref())
            .is_some_and(|sb| sb.delete_after.is_some())
    })
    .await;
    assert!(
        env.pods().get_opt("kept-sandbox").await.unwrap().is_some(),
        "kept after the turn"
    );
    env.wait_for_event("kept", "SandboxDeleted", MINUTE).await;
    env.wait_for_deletion_requested(env.pods(), "kept-sandbox", MINUTE)
        .await;
    let after = env
        .wait_for_session("kept", MINUTE, "sandbox cleared", |s| {
            s.status.as_ref().is_some_and(|st| st.sandbox.is_none())
        })
        .await;
    assert_eq!(
        after
            .status
            .unwrap()
            .phase
            .map(|p| format!("{p:?}"))
            .as_deref(),
        Some("Succeeded")
    );
}

#[tokio::test]
async fn python_code_is_written_run_edited_and_rerun_in_a_debian_sandbox() {
    let env = E2e::start("python").await;
    let script = "import json, statistics\n\
                  xs = [1.0, 2.0, 3.0, 4.0]\n\
                  ys = [2.1, 3.9, 6.2, 7.8]\n\
                  SCALE = 1\n\
                  slope = statistics.linear_regression(xs, ys).slope * SCALE\n\
                  json.dump({\"slope\": round(slope, 3), \"note\": \"ünïcödé\"}, open(\"out/result.json\", \"w\"))\n\
                  print(f\"slope={slope:.3f}\")\n";
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![(
            "write",
            json!({"path": "fit.py", "content": script}),
        )]),
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "echo shell=${BASH_VERSION:+bash}; mkdir -p out && python3 fit.py"}),
        )]),
        Step::ToolCalls(vec![(
            "edit",
            json!({"path": "fit.py", "old_str": "SCALE = 1", "new_str": "SCALE = 10"}),
        )]),
        Step::ToolCalls(vec![("bash", json!({"command": "python3 fit.py"}))]),
        Step::ToolCalls(vec![("read", json!({"path": "out/result.json"}))]),
        Step::Answer("fitted".into()),
    ])
    .await;
    env.create_session(
        "fit",
        json!({"prompt": "Fit a line.", "model": "openai/scripted",
               "llm": {"baseUrl": llm.base_url},
               "sandbox": {"image": support::PYTHON_IMAGE, "imagePullPolicy": "Never"}}),
    )
    .await;
    env.wait_for_phase("fit", "Succeeded", 3 * MINUTE).await;
    let requests = llm.requests();
    let results = tool_results(&requests.last().unwrap().body);
    assert!(results[0].starts_with("Wrote "), "{}", results[0]);
    assert_eq!(results[1], "shell=bash\nslope=1.940\n");
    assert!(
        results[2].starts_with("Edited /workspace/fit.py"),
        "{}",
        results[2]
    );
    assert_eq!(results[3], "slope=19.400\n");
    assert_eq!(
        results[4],
        "     1\t{\"slope\": 19.4, \"note\": \"\\u00fcn\\u00efc\\u00f6d\\u00e9\"}\n"
    );
}

#[tokio::test]
async fn sandbox_create_moves_the_sandbox_to_other_hardware() {
    let env = E2e::start_with(
        "hardware",
        support::E2eOptions {
            sandbox_hardware: Some(HARDWARE.into()),
            ..Default::default()
        },
    )
    .await;
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "echo one > /workspace/a.txt"}),
        )]),
        Step::ToolCalls(vec![("sandbox_create", json!({"hardware": "big"}))]),
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "cat /workspace/a.txt 2>/dev/null || echo gone"}),
        )]),
        Step::ToolCalls(vec![("sandbox_create", json!({"hardware": "big"}))]),
        Step::AnswerWhenReleased(release.clone(), "moved".into()),
    ])
    .await;
    env.create_session(
        "mover",
        json!({"prompt": "Move to bigger hardware.", "model": "openai/scripted",
               "llm": {"baseUrl": llm.base_url}, "sandbox": {"imagePullPolicy": "Never"}}),
    )
    .await;
    let requests = llm.wait_for_requests(5, 3 * MINUTE).await;
    let tools: Vec<String> = requests[0].body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(tools.contains(&"sandbox_create".to_string()), "{tools:?}");
    let results = tool_results(&requests[4].body);
    assert_eq!(
        results[1],
        "Sandbox created: mover-sandbox\nHardware: big (bigger)\nThe previous pod was replaced; \
         /workspace was not persistent and is empty again."
    );
    assert_eq!(results[2], "gone\n");
    assert!(
        results[3].starts_with("Sandbox already active: mover-sandbox"),
        "{}",
        results[3]
    );
    let pod = env.pods().get("mover-sandbox").await.unwrap();
    let spec = pod.spec.unwrap();
    let r = spec.containers[0].resources.as_ref().unwrap();
    assert_eq!(r.requests.as_ref().unwrap()["cpu"].0, "100m");
    assert_eq!(r.limits.as_ref().unwrap()["cpu"].0, "300m");
    assert_eq!(spec.node_selector.unwrap()["kubernetes.io/os"], "linux");
    release.notify_one();
    env.wait_for_phase("mover", "Succeeded", MINUTE).await;

    env.create_session(
        "nowhere",
        json!({"prompt": "x", "model": "openai/scripted", "llm": {"baseUrl": llm.base_url},
               "sandbox": {"hardware": "a100x8"}}),
    )
    .await;
    let failed = env.wait_for_phase("nowhere", "Failed", MINUTE).await;
    let message = failed.status.unwrap().message.unwrap_or_default();
    assert!(
        message.contains("a100x8") && message.contains("big, small"),
        "{message}"
    );
}
