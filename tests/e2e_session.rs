//! AgentSession end to end on the real cluster: the controller process, a scripted model,
//! real sandbox pods, real exec.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::DeleteParams;
use ml_intern::api::SessionPhase;
use serde_json::json;
use support::{E2e, E2eOptions, ScriptedLlm, Step};
use tokio::sync::Notify;

const MINUTE: Duration = Duration::from_secs(60);

fn condition<'a>(
    s: &'a ml_intern::api::AgentSession,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    s.status
        .as_ref()
        .and_then(|st| st.conditions.iter().find(|c| c.type_ == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {:#?}", s.status))
}

#[tokio::test]
async fn scripted_session_runs_bash_in_its_sandbox_and_answers() {
    let env = E2e::start("answer").await;
    let nonce = format!("nonce-{}", std::process::id());
    let release = Arc::new(Notify::new());
    // The answer carries a canary token, which must not reach the status.
    let canary = "hf_CanaryCanaryCanaryCanaryCanary0123";
    let answer = format!("The file /workspace/notes.txt holds {nonce}.");
    let answer_with_canary = format!("{answer} My token is {canary}.");
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": format!("mkdir -p /workspace/out && echo {nonce} > /workspace/notes.txt && echo written")}),
        )]),
        Step::ToolCalls(vec![("bash", json!({"command": "cat notes.txt; id -u; exit 3"}))]),
        Step::AnswerWhenReleased(release.clone(), answer_with_canary),
    ])
    .await;
    let secret_value = "sk-scripted-0123456789";
    env.create_secret("llm-key", "api-key", secret_value).await;
    env.create_session(
        "demo",
        json!({
            "prompt": "Write a note to /workspace/notes.txt and read it back.",
            "model": "openai/scripted-model",
            "llm": {"baseUrl": llm.base_url, "apiKeySecretRef": {"name": "llm-key"}},
            "sandbox": {"imagePullPolicy": "Never"}
        }),
    )
    .await;

    // The model has seen both tool results and is holding its answer.
    let requests = llm.wait_for_requests(3, 2 * MINUTE).await;
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer sk-scripted-0123456789")),
        "every model call carries the key from the Secret"
    );
    assert_eq!(requests[0].body["model"], "scripted-model");
    assert_eq!(requests[0].body["tools"][0]["function"]["name"], "bash");
    let messages = requests[2].body["messages"].as_array().unwrap().clone();
    let tool_results: Vec<&str> = messages
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(tool_results.len(), 2, "{messages:#?}");
    assert_eq!(tool_results[0], "written\n");
    assert!(
        tool_results[1].contains(&nonce) && tool_results[1].contains("1000\n"),
        "the second command read the file as uid 1000: {}",
        tool_results[1]
    );
    assert!(
        tool_results[1].ends_with("ERROR: Exit code 3"),
        "a non-zero exit is reported: {}",
        tool_results[1]
    );

    // While the session runs, the sandbox pod is real and the file is in it.
    let running = env.wait_for_phase("demo", "Running", MINUTE).await;
    let status = running.status.clone().unwrap();
    let pod_name = status
        .sandbox
        .as_ref()
        .expect("status names the sandbox")
        .pod_name
        .clone();
    assert_eq!(pod_name, "demo-sandbox");
    assert_eq!(condition(&running, "SandboxReady").status, "True");
    assert_eq!(status.iterations, 2);
    assert_eq!(status.tool_calls, 2);
    let in_pod = env.exec(&pod_name, &["cat", "/workspace/notes.txt"]).await;
    assert_eq!(in_pod.trim(), nonce);
    let pod = env.pods().get(&pod_name).await.unwrap();
    assert_eq!(
        pod.metadata.labels.as_ref().unwrap()["ml-intern.io/session"],
        "demo"
    );
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("AgentSession", "demo")
    );
    assert_eq!(owner.uid, running.metadata.uid.clone().unwrap());
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(
        spec.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    let mounted = env
        .exec(
            &pod_name,
            &["sh", "-c", "ls /var/run/secrets/kubernetes.io 2>&1 || true"],
        )
        .await;
    assert!(
        mounted.contains("No such file"),
        "no service account token: {mounted}"
    );

    // The answer lands in status and the sandbox goes away.
    release.notify_one();
    let done = env.wait_for_phase("demo", "Succeeded", MINUTE).await;
    let status = done.status.clone().unwrap();
    assert_eq!(
        status.final_response.as_deref(),
        Some(format!("{answer} My token is [REDACTED_HF_TOKEN].").as_str())
    );
    assert_eq!(status.iterations, 3);
    let usage = status.usage.expect("usage is summed");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (300, 30));
    assert!(status.started_at.is_some() && status.completed_at.is_some());
    assert_eq!(status.observed_generation, done.metadata.generation);
    assert_eq!(condition(&done, "Complete").status, "True");
    assert_eq!(condition(&done, "Running").status, "False");
    assert!(
        done.metadata
            .finalizers
            .as_ref()
            .unwrap()
            .contains(&"ml-intern.io/cleanup".to_string())
    );
    env.wait_for_deletion(env.pods(), &pod_name, MINUTE).await;

    // Events tell the story, and the key appears nowhere.
    let events = env.events_for("demo").await;
    let reasons: Vec<&str> = events.iter().filter_map(|e| e.reason.as_deref()).collect();
    for wanted in ["TurnStarted", "SandboxReady", "ToolCalled", "Succeeded"] {
        assert!(
            reasons.contains(&wanted),
            "missing {wanted} event in {reasons:?}"
        );
    }
    // Events are coarse: repeated tool calls form one series (kubectl shows "x2").
    let tool_called = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("ToolCalled"))
        .unwrap();
    assert!(
        tool_called
            .note
            .as_deref()
            .unwrap_or("")
            .starts_with("bash: mkdir -p /workspace/out"),
        "{tool_called:?}"
    );
    assert_eq!(
        tool_called.series.as_ref().map(|s| s.count),
        Some(2),
        "{tool_called:?}"
    );
    let controller_log = std::fs::read_to_string(&env.log).unwrap();
    let transcript = env.transcript("demo").await;
    let stored = serde_json::to_string(&transcript).unwrap();
    assert!(
        stored.contains(&nonce) && stored.contains("[REDACTED_HF_TOKEN]"),
        "the transcript holds the conversation: {stored}"
    );
    let everything = format!("{done:?}{events:?}{controller_log}{stored}");
    assert!(
        !everything.contains(secret_value),
        "the API key leaked into status, events, logs or the transcript"
    );
    assert!(
        !everything.contains(canary),
        "the canary leaked into status, events, logs or the transcript"
    );
    let transcript_status = status.transcript.expect("status points at the transcript");
    assert_eq!(
        transcript_status.config_map_selector,
        format!(
            "ml-intern.io/session-uid={}",
            done.metadata.uid.clone().unwrap()
        )
    );
    assert_eq!(transcript_status.records as usize, transcript.len());

    // kubectl shows the printer columns.
    let table = env.kubectl(&["get", "ags"]);
    let table = String::from_utf8_lossy(&table.stdout);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        vec!["NAME", "PHASE", "ITERATIONS", "MODEL", "AGE"],
        "{table}"
    );
    assert!(
        table.contains("Succeeded") && table.contains("openai/scripted-model"),
        "{table}"
    );

    // The controller's own endpoints.
    let metrics = env.metrics().await;
    assert!(
        metrics.contains("ml_intern_tool_calls_total{tool=\"bash\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ml_intern_sessions_finished_total{phase=\"Succeeded\"} 1"),
        "{metrics}"
    );
    let health = reqwest::get(format!("{}/healthz", env.http)).await.unwrap();
    assert!(health.status().is_success());
}

#[tokio::test]
async fn missing_secret_keeps_the_session_pending_until_it_exists() {
    let env = E2e::start("secret").await;
    let llm = ScriptedLlm::start(vec![Step::Answer("nothing to do".into())]).await;
    env.create_session(
        "waits",
        json!({
            "prompt": "Say hello.",
            "model": "openai/scripted-model",
            "llm": {"baseUrl": llm.base_url, "apiKeySecretRef": {"name": "later-key", "key": "token"}}
        }),
    )
    .await;
    let pending = env
        .wait_for_condition("waits", "Accepted", "False", MINUTE)
        .await;
    let accepted = condition(&pending, "Accepted");
    assert_eq!(accepted.reason, "SecretNotFound");
    assert!(
        accepted.message.contains("later-key") && accepted.message.contains("kubectl"),
        "the message says which Secret and how to create it: {}",
        accepted.message
    );
    assert_eq!(
        pending.status.as_ref().unwrap().phase,
        Some(SessionPhase::Pending)
    );
    let event = env.wait_for_event("waits", "SecretNotFound", MINUTE).await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(llm.requests().is_empty(), "no model call without the key");

    // The Secret appears, but without the key the session names.
    env.create_secret("later-key", "api-key", "sk-late").await;
    let wrong_key = env
        .wait_for_condition("waits", "Accepted", "SecretKeyNotFound", MINUTE)
        .await;
    let message = &condition(&wrong_key, "Accepted").message;
    assert!(
        message.contains("\"token\"") && message.contains("it has: api-key"),
        "the message names the missing key and the keys there are: {message}"
    );

    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(env.client.clone(), &env.namespace);
    secrets
        .patch(
            "later-key",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"stringData": {"token": "sk-late"}})),
        )
        .await
        .unwrap();
    let done = env.wait_for_phase("waits", "Succeeded", MINUTE).await;
    assert_eq!(condition(&done, "Accepted").status, "True");
    assert_eq!(
        llm.requests()[0].authorization.as_deref(),
        Some("Bearer sk-late")
    );
}

#[tokio::test]
async fn unreachable_model_endpoint_fails_with_the_url() {
    let env = E2e::start("unreachable").await;
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v1");
    env.create_session(
        "nowhere",
        json!({"prompt": "Say hello.", "model": "openai/x", "llm": {"baseUrl": url}}),
    )
    .await;
    let failed = env.wait_for_phase("nowhere", "Failed", MINUTE).await;
    let c = condition(&failed, "Failed");
    assert_eq!(c.reason, "LLMUnreachable");
    assert!(
        c.message.contains(&url) && c.message.contains("spec.llm.baseUrl"),
        "{}",
        c.message
    );
    let retries = env.wait_for_event("nowhere", "LLMRetrying", MINUTE).await;
    assert_eq!(retries.type_.as_deref(), Some("Warning"));
    env.wait_for_event("nowhere", "Failed", MINUTE).await;
}

#[tokio::test]
async fn model_http_errors_fail_fast_or_are_retried() {
    let env = E2e::start("http-errors").await;
    let refused = ScriptedLlm::start(vec![Step::Error(
        401,
        json!({"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}}),
    )])
    .await;
    env.create_secret("bad-key", "api-key", "sk-wrong-key-value")
        .await;
    env.create_session(
        "unauthorized",
        json!({"prompt": "Say hello.", "model": "openai/x",
               "llm": {"baseUrl": refused.base_url, "apiKeySecretRef": {"name": "bad-key"}}}),
    )
    .await;
    let failed = env.wait_for_phase("unauthorized", "Failed", MINUTE).await;
    let c = condition(&failed, "Failed");
    assert_eq!(c.reason, "LLMRequestFailed");
    assert!(
        c.message.contains("401")
            && c.message.contains("Invalid API Key")
            && c.message.contains("apiKeySecretRef"),
        "{}",
        c.message
    );
    assert_eq!(
        refused.requests().len(),
        1,
        "an auth failure is not retried"
    );
    assert!(!format!("{failed:?}").contains("sk-wrong-key-value"));

    let flaky = ScriptedLlm::start(vec![
        Step::Error(
            429,
            json!({"error": {"message": "Rate limit reached", "type": "rate_limit_error"}}),
        ),
        Step::Error(503, json!({"error": {"message": "overloaded"}})),
        Step::Answer("fine now".into()),
    ])
    .await;
    env.create_session(
        "flaky",
        json!({"prompt": "Say hello.", "model": "openai/x", "llm": {"baseUrl": flaky.base_url}}),
    )
    .await;
    let done = env.wait_for_phase("flaky", "Succeeded", MINUTE).await;
    assert_eq!(
        done.status.unwrap().final_response.as_deref(),
        Some("fine now")
    );
    assert_eq!(flaky.requests().len(), 3);
    // Each class of failure is named in its own Event.
    env.wait_for_event("flaky", "RateLimited", MINUTE).await;
    env.wait_for_event("flaky", "LLMRetrying", MINUTE).await;
}

#[tokio::test]
async fn sandbox_that_cannot_start_fails_with_the_pod_reason() {
    let env = E2e::start("bad-image").await;
    let llm = ScriptedLlm::start(vec![Step::ToolCalls(vec![(
        "bash",
        json!({"command": "ls"}),
    )])])
    .await;
    env.create_session(
        "no-image",
        json!({
            "prompt": "List files.", "model": "openai/x", "llm": {"baseUrl": llm.base_url},
            "sandbox": {"image": "localhost/ml-intern-no-such-image:1", "imagePullPolicy": "Never"}
        }),
    )
    .await;
    let failed = env.wait_for_phase("no-image", "Failed", 2 * MINUTE).await;
    let c = condition(&failed, "Failed");
    assert_eq!(c.reason, "SandboxFailed");
    assert!(
        c.message.contains("ErrImageNeverPull")
            && c.message.contains("localhost/ml-intern-no-such-image:1"),
        "{}",
        c.message
    );
    env.wait_for_deletion_requested(env.pods(), "no-image-sandbox", MINUTE)
        .await;
}

#[tokio::test]
async fn deleting_a_running_session_stops_it_and_removes_its_sandbox() {
    let env = E2e::start("delete").await;
    let llm = ScriptedLlm::start(vec![Step::ToolCalls(vec![(
        "bash",
        json!({"command": "sleep 60", "timeout": 120}),
    )])])
    .await;
    env.create_session(
        "doomed",
        json!({"prompt": "Wait a minute.", "model": "openai/x", "llm": {"baseUrl": llm.base_url},
               "sandbox": {"imagePullPolicy": "Never"}}),
    )
    .await;
    env.wait_for_condition("doomed", "SandboxReady", "True", MINUTE)
        .await;
    let started = std::time::Instant::now();
    env.sessions()
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_for_deletion(env.sessions(), "doomed", MINUTE)
        .await;
    env.wait_for_deletion::<Pod>(env.pods(), "doomed-sandbox", MINUTE)
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "deletion did not wait for the 60 s command"
    );
    assert_eq!(
        llm.requests().len(),
        1,
        "the loop stopped: no further model call"
    );
}

#[tokio::test]
async fn max_iterations_ends_the_session_with_a_clear_reason() {
    let env = E2e::start("max-iter").await;
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![("bash", json!({"command": "true"}))]),
        Step::ToolCalls(vec![("bash", json!({"command": "true"}))]),
    ])
    .await;
    env.create_session(
        "busy",
        json!({"prompt": "Loop.", "model": "openai/x", "llm": {"baseUrl": llm.base_url},
               "maxIterations": 2, "sandbox": {"imagePullPolicy": "Never"}}),
    )
    .await;
    let failed = env.wait_for_phase("busy", "Failed", 2 * MINUTE).await;
    let c = condition(&failed, "Failed");
    assert_eq!(c.reason, "MaxIterationsReached");
    assert!(c.message.contains("spec.maxIterations"), "{}", c.message);
    assert_eq!(failed.status.unwrap().iterations, 2);
}

#[tokio::test]
async fn sessions_beyond_the_concurrency_bound_wait_in_pending() {
    let env = E2e::start_with(
        "capacity",
        E2eOptions {
            controller_args: vec!["--max-concurrent-sessions".into(), "1".into()],
            ..Default::default()
        },
    )
    .await;
    let release = Arc::new(Notify::new());
    let first = ScriptedLlm::start(vec![Step::AnswerWhenReleased(
        release.clone(),
        "one".into(),
    )])
    .await;
    let second = ScriptedLlm::start(vec![Step::Answer("two".into())]).await;
    env.create_session(
        "first",
        json!({"prompt": "1", "model": "openai/x", "llm": {"baseUrl": first.base_url}}),
    )
    .await;
    first.wait_for_requests(1, MINUTE).await;
    env.create_session(
        "second",
        json!({"prompt": "2", "model": "openai/x", "llm": {"baseUrl": second.base_url}}),
    )
    .await;
    let waiting = env
        .wait_for_condition("second", "Running", "WaitingForCapacity", MINUTE)
        .await;
    assert_eq!(waiting.status.unwrap().phase, Some(SessionPhase::Pending));
    assert!(
        second.requests().is_empty(),
        "the second loop has not started"
    );
    release.notify_one();
    env.wait_for_phase("first", "Succeeded", MINUTE).await;
    let done = env.wait_for_phase("second", "Succeeded", MINUTE).await;
    assert_eq!(done.status.unwrap().final_response.as_deref(), Some("two"));
}

#[tokio::test]
async fn invalid_specs_are_refused_at_apply_naming_the_field() {
    let env = E2e::start("schema").await;
    // (spec, what the error must name): kubectl's client-side validation names a missing
    // field as `"prompt" in ….AgentSession.spec`, the apiserver as `spec.maxIterations`.
    let cases = [
        ("model: openai/x", vec!["\"prompt\"", "AgentSession.spec"]),
        (
            "prompt: p\n  model: openai/x\n  maxIterations: 0",
            vec!["spec.maxIterations"],
        ),
        (
            "prompt: p\n  model: openai/x\n  llm: {baseUrl: 'ftp://models.example'}",
            vec!["spec.llm.baseUrl"],
        ),
        (
            "prompt: p\n  model: openai/x\n  sandbox: {imagePullPolicy: Sometimes}",
            vec!["spec.sandbox.imagePullPolicy"],
        ),
        ("prompt: p\n  model: ''", vec!["spec.model"]),
    ];
    for (i, (spec, named)) in cases.iter().enumerate() {
        let manifest = format!(
            "apiVersion: ml-intern.io/v1alpha1\nkind: AgentSession\nmetadata: {{name: bad-{i}}}\nspec:\n  {spec}\n"
        );
        let out = env.kubectl_apply(&manifest);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{spec} was accepted");
        for name in named {
            assert!(
                stderr.contains(name),
                "the error for {spec:?} names {name}: {stderr}"
            );
        }
    }
    let listed = env.sessions().list(&Default::default()).await.unwrap();
    assert!(listed.items.is_empty(), "nothing invalid was stored");
}

#[tokio::test]
async fn the_platform_endpoint_and_key_serve_sessions_that_name_none() {
    let platform = ScriptedLlm::start(vec![Step::Answer("via the platform".into())]).await;
    let own = ScriptedLlm::start(vec![Step::Answer("via my endpoint".into())]).await;
    let env = E2e::start_with(
        "platform",
        E2eOptions {
            model_config: Some(format!(
                "defaultModel: openai/platform-model\n\
                 endpoint:\n  baseUrl: {}\n  \
                 apiKeySecretRef: {{namespace: \"{{namespace}}\", name: platform-llm, key: token}}\n",
                platform.base_url
            )),
            ..Default::default()
        },
    )
    .await;
    // No model, no llm settings: the controller's default model at its endpoint.
    env.create_session("plain", json!({"prompt": "Say hello."}))
        .await;
    let pending = env
        .wait_for_condition("plain", "Accepted", "SecretNotFound", MINUTE)
        .await;
    let message = &condition(&pending, "Accepted").message;
    assert!(
        message.contains("platform-llm") && message.contains("controller's model config"),
        "the message says the Secret comes from the controller's config: {message}"
    );
    env.create_secret("platform-llm", "token", "sk-platform-0123456789")
        .await;
    let done = env.wait_for_phase("plain", "Succeeded", MINUTE).await;
    let accepted = condition(&done, "Accepted");
    assert!(
        accepted
            .message
            .contains("controller's configured endpoint"),
        "{}",
        accepted.message
    );
    let seen = platform.requests();
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer sk-platform-0123456789")
    );
    assert_eq!(seen[0].body["model"], "platform-model");

    // A session that picks its own URL never gets the platform's key.
    env.create_session(
        "own",
        json!({"prompt": "Say hello.", "llm": {"baseUrl": own.base_url}}),
    )
    .await;
    env.wait_for_phase("own", "Succeeded", MINUTE).await;
    assert_eq!(own.requests()[0].authorization, None);
    assert_eq!(platform.requests().len(), 1);
}

#[tokio::test]
async fn spec_tools_limits_what_the_model_is_offered() {
    let env = E2e::start("tools").await;
    let llm = ScriptedLlm::start(vec![Step::Answer("ok".into())]).await;
    env.create_session(
        "narrow",
        json!({"prompt": "Hi.", "model": "openai/scripted", "llm": {"baseUrl": llm.base_url},
               "tools": ["bash", "read"]}),
    )
    .await;
    env.create_session(
        "typo",
        json!({"prompt": "Hi.", "model": "openai/scripted", "llm": {"baseUrl": llm.base_url},
               "tools": ["bsh"]}),
    )
    .await;
    env.wait_for_phase("narrow", "Succeeded", MINUTE).await;
    let request = &llm.requests()[0].body;
    let offered: Vec<&str> = request["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(offered, ["bash", "read"]);
    let system = request["messages"][0]["content"].as_str().unwrap();
    assert!(system.contains("tools you have: bash, read."), "{system}");
    let failed = env.wait_for_phase("typo", "Failed", MINUTE).await;
    let c = condition(&failed, "Failed");
    assert_eq!(c.reason, "UnknownTool");
    assert!(
        c.message.contains("\"bsh\"") && c.message.contains("cluster_jobs"),
        "{}",
        c.message
    );
    assert_eq!(
        llm.requests().len(),
        1,
        "no model call for the refused session"
    );
}
