//! `cluster_jobs` on the real cluster: Jobs beside the sandbox, their logs and final states.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use serde_json::{Value, json};
use support::{E2e, ScriptedLlm, Step, tool_results};
use tokio::sync::Notify;

const MINUTE: Duration = Duration::from_secs(60);

/// A pure-Python least-squares fit that reports its loss as metric lines and writes its
/// result next to it (the sandbox's /workspace, a claim the job shares).
/// It pauses first, as a real job loading its data would: the Job's timestamps have
/// one-second precision, and the cost assertion needs it to run for more than a second.
const TRAIN: &str = r#"import json, time
time.sleep(2)
xs = [0.0, 1.0, 2.0, 3.0, 4.0]
ys = [1.0, 3.1, 4.9, 7.2, 8.8]
w, b = 0.0, 0.0
for step in range(1, 301):
    gw = sum(2 * (w * x + b - y) * x for x, y in zip(xs, ys)) / len(xs)
    gb = sum(2 * (w * x + b - y) for x, y in zip(xs, ys)) / len(xs)
    w, b = w - 0.02 * gw, b - 0.02 * gb
    if step % 100 == 0:
        loss = sum((w * x + b - y) ** 2 for x, y in zip(xs, ys)) / len(xs)
        print(json.dumps({"metric": "loss", "value": round(loss, 4), "step": step}))
print(f"fitted w={w:.2f} b={b:.2f}")
json.dump({"w": round(w, 2), "b": round(b, 2)}, open("result.json", "w"))
"#;

/// The job id in the latest `Job submitted` result of a request.
fn submitted_job(request: &Value) -> String {
    let results = tool_results(request);
    let text = results
        .iter()
        .rev()
        .find(|r| r.starts_with("Job submitted."))
        .expect("a submitted job");
    text.lines()
        .find_map(|l| l.strip_prefix("Job: "))
        .expect("its id")
        .to_string()
}

/// Tool calls on the job submitted just before, once `release` is notified.
fn on_job(release: &Arc<Notify>, operation: &'static str) -> Step {
    Step::ToolCallsFrom(
        Some(release.clone()),
        Box::new(move |request| {
            vec![(
                "cluster_jobs",
                json!({"operation": operation, "job_id": submitted_job(request)}),
            )]
        }),
    )
}

async fn wait_for_job(env: &E2e, done: impl Fn(&Job) -> bool) -> Job {
    let jobs: kube::Api<Job> = kube::Api::namespaced(env.client.clone(), &env.namespace);
    let deadline = tokio::time::Instant::now() + 2 * MINUTE;
    loop {
        let list = jobs.list(&Default::default()).await.unwrap();
        if let Some(j) = list.items.iter().find(|j| done(j)) {
            return j.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no job reached the expected state: {:#?}",
            list.items
                .iter()
                .map(|j| (&j.metadata.name, &j.status))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn finished(j: &Job, condition: &str) -> bool {
    j.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == condition && c.status == "True"))
}

const HARDWARE: &str = r#"default: small
presets:
  small:
    description: a little CPU
    usdPerHour: 3.6
    resources:
      requests: {cpu: 50m, memory: 64Mi}
      limits: {cpu: 500m, memory: 256Mi}
  gpu-one:
    description: one GPU
    resources:
      limits: {nvidia.com/gpu: "1"}
"#;

#[tokio::test]
async fn cluster_jobs_run_report_fail_time_out_are_gated_on_gpus_and_go_with_the_session() {
    let env = E2e::start_with(
        "jobs",
        support::E2eOptions {
            sandbox_hardware: Some(HARDWARE.into()),
            controller_args: ["--job-follow-interval", "1"].map(str::to_string).to_vec(),
            ..Default::default()
        },
    )
    .await;
    let (trained, failed, timed_out) = (
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![("write", json!({"path": "train.py", "content": TRAIN}))]),
        Step::ToolCalls(vec![(
            "cluster_jobs",
            json!({"operation": "run", "script": "train.py", "timeout": "2m"}),
        )]),
        on_job(&trained, "logs"),
        Step::ToolCalls(vec![("read", json!({"path": "result.json"}))]),
        Step::ToolCalls(vec![(
            "cluster_jobs",
            json!({"operation": "run", "script": "import sys\nprint('bad data')\nsys.exit(3)"}),
        )]),
        on_job(&failed, "inspect"),
        Step::ToolCalls(vec![(
            "cluster_jobs",
            json!({"operation": "run", "command": ["sleep", "120"], "timeout": "3s"}),
        )]),
        on_job(&timed_out, "inspect"),
        Step::ToolCalls(vec![
            ("cluster_jobs", json!({"operation": "run", "command": ["sleep", "600"]})),
            (
                "cluster_jobs",
                json!({"operation": "run", "command": ["nvidia-smi"], "hardware_flavor": "gpu-one"}),
            ),
        ]),
        Step::ToolCalls(vec![(
            "cluster_jobs",
            json!({"operation": "ps", "all": true}),
        )]),
        Step::Answer("done".into()),
    ])
    .await;
    let pv = env.host_path_claim("work").await;
    env.create_session(
        "trainer",
        json!({"prompt": "Fit a line on the cluster.", "model": "openai/scripted",
               "llm": {"baseUrl": llm.base_url},
               "sandbox": {"image": support::PYTHON_IMAGE, "imagePullPolicy": "Never",
                           "workspace": {"claimName": "work"}}}),
    )
    .await;

    // The training job runs to the end, then the model reads its logs.
    wait_for_job(&env, |j| finished(j, "Complete")).await;
    trained.notify_one();
    let requests = llm.wait_for_requests(4, 2 * MINUTE).await;
    let submitted = &tool_results(&requests[2].body)[1];
    assert!(submitted.contains("Flavor: small"), "{submitted}");
    let logs = tool_results(&requests[3].body).pop().unwrap();
    assert!(
        logs.contains(r#"{"metric": "loss""#) && logs.contains("fitted w=1.97 b=1.05"),
        "{logs}"
    );
    // The job's result file is in the sandbox's workspace.
    let requests = llm.wait_for_requests(5, 2 * MINUTE).await;
    let result = tool_results(&requests[4].body).pop().unwrap();
    assert!(result.contains(r#"{"w": 1.97, "b": 1.05}"#), "{result}");

    // A failing job: its exit code reaches the model.
    wait_for_job(&env, |j| {
        finished(j, "Failed")
            && j.spec
                .as_ref()
                .is_none_or(|s| s.active_deadline_seconds != Some(3))
    })
    .await;
    failed.notify_one();
    let requests = llm.wait_for_requests(7, 2 * MINUTE).await;
    let inspected = tool_results(&requests[6].body).pop().unwrap();
    assert!(
        inspected.contains("State: Failed") && inspected.contains("exit code 3"),
        "{inspected}"
    );

    // A job past its timeout is stopped by Kubernetes and says so.
    wait_for_job(&env, |j| {
        finished(j, "Failed")
            && j.spec
                .as_ref()
                .is_some_and(|s| s.active_deadline_seconds == Some(3))
    })
    .await;
    timed_out.notify_one();
    let requests = llm.wait_for_requests(9, 2 * MINUTE).await;
    let inspected = tool_results(&requests[8].body).pop().unwrap();
    assert!(inspected.contains("State: DeadlineExceeded"), "{inspected}");

    // The CPU job starts; the GPU one waits for a human, who declines.
    let waiting = env
        .wait_for_session("trainer", 2 * MINUTE, "the GPU job to wait", |s| {
            s.status.as_ref().is_some_and(|st| {
                st.pending_approvals
                    .iter()
                    .any(|p| p.tool == "cluster_jobs")
            })
        })
        .await;
    let request = waiting.status.unwrap().pending_approvals.remove(0);
    assert!(
        request.summary.contains("GPU flavor gpu-one"),
        "{}",
        request.summary
    );
    let decision = json!({
        "apiVersion": "ml-intern.io/v1alpha1", "kind": "AgentApproval",
        "metadata": {"name": "no-gpu"},
        "spec": {"sessionName": "trainer", "requestId": request.id,
                 "argumentsDigest": request.arguments_digest, "decision": "Reject",
                 "feedback": "no GPUs today"}
    });
    let out = env.kubectl_apply(&decision.to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = env.wait_for_phase("trainer", "Succeeded", 2 * MINUTE).await;
    // status.jobs mirrors the jobs, with the training metrics and what they cost.
    let status = done.status.unwrap();
    let jobs_seen = status.jobs;
    let cost: f64 = jobs_seen[0]
        .estimated_cost_usd
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        cost > 0.0 && cost < 0.5,
        "3.6 $/h for a few seconds: {cost}"
    );
    assert_eq!(jobs_seen[0].usd_per_hour.as_deref(), Some("3.6"));
    assert!(status.jobs_cost_usd.is_some());
    assert_eq!(jobs_seen.len(), 4, "{jobs_seen:#?}");
    let states: Vec<&str> = jobs_seen.iter().map(|j| j.state.as_str()).collect();
    assert_eq!(
        states[..3],
        ["Succeeded", "Failed", "DeadlineExceeded"],
        "{jobs_seen:#?}"
    );
    let loss = &jobs_seen[0].metrics[0];
    assert_eq!(
        (loss.name.as_str(), loss.value.as_str(), loss.step),
        ("loss", "0.0182", Some(300))
    );
    assert!(
        jobs_seen[1]
            .message
            .as_deref()
            .is_some_and(|m| m.contains("exit code 3"))
    );
    assert_eq!(jobs_seen[0].flavor, "small");
    // While the turn ran, the jobs' output went into the transcript as tool_log events,
    // each line once.
    let training = submitted_job(&llm.requests()[3].body);
    let failing = submitted_job(&llm.requests()[6].body);
    let logged: Vec<String> = env
        .transcript("trainer")
        .await
        .into_iter()
        .filter_map(|r| match r {
            ml_intern::store::Record::Event { event, .. }
                if event["event_type"] == "tool_log" && event["tool"] == "cluster_jobs" =>
            {
                event["log"].as_str().map(str::to_string)
            }
            _ => None,
        })
        .collect();
    let count = |line: String| logged.iter().filter(|l| **l == line).count();
    assert_eq!(
        count(format!("[{training}] fitted w=1.97 b=1.05")),
        1,
        "{logged:#?}"
    );
    assert_eq!(
        count(format!(
            r#"[{training}] {{"metric": "loss", "value": 0.0182, "step": 300}}"#
        )),
        1,
        "{logged:#?}"
    );
    assert_eq!(count(format!("[{failing}] bad data")), 1, "{logged:#?}");
    let requests = llm.requests();
    let table = tool_results(&requests[10].body).pop().unwrap();
    assert_eq!(table.matches("| trainer-job-").count(), 4, "{table}");
    assert!(
        table.contains("| Succeeded |") && table.contains("| DeadlineExceeded |"),
        "{table}"
    );

    // The running job goes with its session.
    let jobs: kube::Api<Job> = kube::Api::namespaced(env.client.clone(), &env.namespace);
    let running = wait_for_job(&env, |j| {
        j.status.as_ref().is_some_and(|s| s.active == Some(1))
    })
    .await;
    env.sessions()
        .delete("trainer", &Default::default())
        .await
        .unwrap();
    env.wait_for_deletion(jobs, running.metadata.name.as_deref().unwrap(), 2 * MINUTE)
        .await;
    let _ = env.kubectl(&["delete", "pv", &pv, "--wait=false"]);
}

/// A job with more output than one read of its log (6 MB of progress lines), then a
/// metric, then a long wait.
const CHATTY: &str = r#"import json, time
for i in range(6000):
    print(f"progress {i:05d} " + "." * 1000)
print(json.dumps({"metric": "loss", "value": 0.5, "step": 7}), flush=True)
time.sleep(600)
"#;

/// The controller follows a running job from the end of its log, and a suspend stops it.
#[tokio::test]
async fn suspending_a_session_stops_its_jobs_but_not_detached_ones() {
    let env = E2e::start_with(
        "jobsuspend",
        support::E2eOptions {
            sandbox_hardware: Some(HARDWARE.into()),
            controller_args: ["--job-follow-interval", "1"].map(str::to_string).to_vec(),
            ..Default::default()
        },
    )
    .await;
    let hold = Arc::new(Notify::new());
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![
            (
                "cluster_jobs",
                json!({"operation": "run", "script": CHATTY}),
            ),
            (
                "cluster_jobs",
                json!({"operation": "run", "command": ["sleep", "601"], "detach": true}),
            ),
        ]),
        Step::AnswerWhenReleased(hold.clone(), "never".into()),
    ])
    .await;
    env.create_session(
        "pausable",
        json!({"prompt": "Train twice.", "model": "openai/scripted",
               "llm": {"baseUrl": llm.base_url},
               "sandbox": {"image": support::PYTHON_IMAGE, "imagePullPolicy": "Never"}}),
    )
    .await;
    llm.wait_for_requests(2, 2 * MINUTE).await;
    let jobs: kube::Api<Job> = kube::Api::namespaced(env.client.clone(), &env.namespace);
    let running = |j: &Job| j.status.as_ref().is_some_and(|s| s.active == Some(1));
    wait_for_job(&env, |j| {
        running(j)
            && j.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key("ml-intern.io/detach"))
    })
    .await;
    let attached = wait_for_job(&env, |j| {
        running(j)
            && !j
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key("ml-intern.io/detach"))
    })
    .await;
    // Its metric comes after more than the 4 MiB one read of a log returns.
    env.wait_for_session("pausable", 2 * MINUTE, "the job's metric", |s| {
        s.status.as_ref().is_some_and(|st| {
            st.jobs.iter().any(|j| {
                j.metrics.iter().any(|m| {
                    (m.name.as_str(), m.value.as_str(), m.step) == ("loss", "0.5", Some(7))
                })
            })
        })
    })
    .await;
    // Another session whose name shares this one's first 63 characters has the same name
    // label: only the uid tells them apart.
    let neighbour = json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "neighbour", "labels": {
            "ml-intern.io/session": "pausable", "app.kubernetes.io/component": "job",
            "ml-intern.io/session-uid": "another-session"}},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "job", "image": support::cluster::SANDBOX_IMAGE,
                            "imagePullPolicy": "Never", "command": ["sleep", "600"]}]}}}
    });
    let out = env.kubectl_apply(&neighbour.to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.patch_spec("pausable", json!({"suspend": true})).await;
    env.wait_for_event("pausable", "JobsStopped", MINUTE).await;
    env.wait_for_deletion(
        jobs.clone(),
        attached.metadata.name.as_deref().unwrap(),
        MINUTE,
    )
    .await;
    let left: Vec<Job> = jobs.list(&Default::default()).await.unwrap().items;
    let names: Vec<&str> = left
        .iter()
        .filter_map(|j| j.metadata.name.as_deref())
        .collect();
    assert_eq!(
        left.len(),
        2,
        "the detached job and the neighbour's: {names:?}"
    );
    assert!(names.contains(&"neighbour"), "{names:?}");
    assert!(left.iter().all(running), "both still run");
    hold.notify_one();
}
