//! `hf_jobs` against a local HF Jobs server written from the documented API: the exact
//! requests the client sends, and how it copes with the log stream's quirks, server
//! errors, failed jobs, scheduled jobs and unknown hardware.

mod support;

use std::sync::Arc;
use std::time::Duration;

use ml_intern::api::AgentSessionStatus;
use ml_intern::controller::job_follower;
use ml_intern::hf::HfJobsClient;
use ml_intern::hf::job_logs::LogOptions;
use ml_intern::runtime::hf_job::{HfJobs, UV_IMAGE};
use ml_intern::tools::Tool;
use ml_intern::tools::jobs::{HF_JOBS_TOOL, JobObservation, JobsTool};
use serde_json::{Value, json};
use support::HF_TEST_TOKEN;
use support::hf_hub::{FakeHfHub, JobPlan, ORG, USER};

fn backend(hub: &FakeHfHub, namespace: Option<&str>) -> HfJobs {
    let client = HfJobsClient::new(&hub.url, HF_TEST_TOKEN.into()).with_retry_delays(vec![
        Duration::from_millis(50),
        Duration::from_millis(100),
        Duration::from_millis(200),
    ]);
    let mut jobs = HfJobs::new(
        client,
        HF_TEST_TOKEN.into(),
        "train-session",
        namespace.map(str::to_string),
    );
    jobs.log_options = LogOptions {
        idle: Duration::from_millis(700),
        follow: false,
        deadline: Duration::from_secs(20),
        max_errors: 3,
        reconnect_delay: Duration::from_millis(50),
        tail: None,
    };
    jobs
}

fn tool(
    hub: &FakeHfHub,
    namespace: Option<&str>,
) -> (JobsTool, tokio::sync::mpsc::Receiver<JobObservation>) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    (
        JobsTool {
            name: HF_JOBS_TOOL,
            backend: Arc::new(backend(hub, namespace)),
            files: None,
            observed: Some(tx),
        },
        rx,
    )
}

/// A Docker-image job for `alice`, following the hub's next plan.
async fn start_job(client: &HfJobsClient) -> ml_intern::hf::jobs_api::HubJob {
    let spec = ml_intern::hf::jobs_api::JobSpec {
        docker_image: Some("python:3.12".into()),
        command: vec!["python".into()],
        flavor: "cpu-basic".into(),
        ..Default::default()
    };
    client.run(USER, &spec).await.expect("the job is created")
}

async fn call(tool: &JobsTool, args: Value) -> (bool, String) {
    let out = tool.call(args).await.expect("the tool answers");
    (out.success, out.content)
}

fn job_id(output: &str) -> String {
    output
        .lines()
        .find_map(|l| l.strip_prefix("Job: "))
        .unwrap_or_else(|| panic!("no job id in {output}"))
        .to_string()
}

#[tokio::test]
async fn run_sends_the_documented_job_spec_and_returns_at_once() {
    let hub = FakeHfHub::start().await;
    hub.plan_next_job(JobPlan::completes(
        &[
            "loading data",
            "{\"metric\": \"loss\", \"value\": 0.5, \"step\": 1}",
        ],
        Duration::from_millis(300),
    ));
    let (tool, mut observed) = tool(&hub, None);
    let (ok, out) = call(
        &tool,
        json!({
            "operation": "run",
            "script": "print('hi')\n",
            "dependencies": ["numpy"],
            "hardware_flavor": "a10g-large",
            "timeout": "2h",
            "env": {"LR": "0.1"}
        }),
    )
    .await;
    assert!(ok, "{out}");
    let id = job_id(&out);
    assert!(
        out.contains(&format!("View at: {}/jobs/{USER}/{id}", hub.url)),
        "{out}"
    );
    assert!(out.contains("$1.50/h, at most $3.00"), "{out}");
    assert!(
        out.contains("loading data"),
        "first log lines come back: {out}"
    );
    assert!(!out.contains("===== Job started"), "{out}");

    let runs = hub.requests_to("POST", &format!("/api/jobs/{USER}"));
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0].authorization.as_deref(),
        Some(format!("Bearer {HF_TEST_TOKEN}").as_str())
    );
    assert_eq!(
        runs[0].body,
        json!({
            "dockerImage": UV_IMAGE,
            "command": ["/bin/sh", "-lc", "echo cHJpbnQoJ2hpJykK | base64 -d | uv run --with numpy --with hf-transfer -"],
            "arguments": [],
            "environment": {
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_ENABLE_HF_TRANSFER": "1",
                "LR": "0.1", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "warning",
                "UV_NO_PROGRESS": "1"
            },
            "secrets": {"HF_TOKEN": HF_TEST_TOKEN, "HUGGINGFACE_HUB_TOKEN": HF_TEST_TOKEN},
            "flavor": "a10g-large",
            "timeoutSeconds": 7200,
            "labels": {"ml-intern-session": "train-session"}
        })
    );
    // The namespace came from whoami-v2; the hardware list from /api/jobs/hardware.
    assert_eq!(hub.requests_to("GET", "/api/whoami-v2").len(), 1);
    assert_eq!(hub.requests_to("GET", "/api/jobs/hardware").len(), 1);

    let mut saw_state = false;
    while let Ok(seen) = observed.try_recv() {
        if let JobObservation::State {
            backend,
            info,
            usd_per_hour,
        } = seen
        {
            assert_eq!((backend, info.id.as_str()), ("huggingface", id.as_str()));
            assert!((usd_per_hour.unwrap() - 1.5).abs() < 1e-9);
            saw_state = true;
        }
    }
    assert!(saw_state, "the run is reported for status.jobs");

    // A docker command, in an org the token may use.
    let (ok, out) = call(
        &tool,
        json!({"operation": "run", "command": ["nvidia-smi"], "namespace": ORG}),
    )
    .await;
    assert!(ok, "{out}");
    let body = &hub.requests_to("POST", &format!("/api/jobs/{ORG}"))[0].body;
    assert_eq!(body["dockerImage"], "python:3.12");
    assert_eq!(body["command"], json!(["nvidia-smi"]));
    assert_eq!(body["flavor"], "cpu-basic");
    assert_eq!(body["timeoutSeconds"], 1800);
}

#[tokio::test]
async fn unknown_hardware_and_foreign_namespaces_are_refused_before_submitting() {
    let hub = FakeHfHub::start().await;
    let (tool, _) = tool(&hub, None);
    let (ok, out) = call(
        &tool,
        json!({"operation": "run", "command": ["true"], "hardware_flavor": "a100-huge"}),
    )
    .await;
    assert!(!ok);
    assert!(
        out.contains("unknown hardware_flavor \"a100-huge\"") && out.contains("a100-large"),
        "{out}"
    );
    let (ok, out) = call(
        &tool,
        json!({"operation": "run", "command": ["true"], "namespace": "someone-else"}),
    )
    .await;
    assert!(!ok);
    assert!(out.contains(&format!("it may use: {USER}, {ORG}")), "{out}");
    assert!(
        hub.requests().iter().all(|r| r.method != "POST"),
        "nothing was submitted"
    );
}

#[tokio::test]
async fn logs_survive_replays_keep_alives_and_early_ends_without_duplicates() {
    let hub = FakeHfHub::start().await;
    let lines: Vec<String> = (1..=6).map(|i| format!("epoch {i}")).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    hub.plan_next_job(JobPlan {
        first_stream_ends_after: Some(3),
        ..JobPlan::completes(&refs, Duration::from_millis(1500))
    });
    let jobs = backend(&hub, None);
    let client = &jobs.client;
    let job = start_job(client).await;
    // Following: the first stream ends after the banner and two lines; the second replays
    // them; keep-alives come while the job runs and after it ends.
    let follow = LogOptions {
        idle: Duration::from_millis(700),
        follow: true,
        deadline: Duration::from_secs(20),
        max_errors: 3,
        reconnect_delay: Duration::from_millis(50),
        tail: None,
    };
    let logs = client
        .logs(USER, &job.id, &follow)
        .await
        .expect("the logs are read");
    let texts = |l: &[ml_intern::tools::jobs::LogLine]| -> Vec<String> {
        l.iter().map(|l| l.text.clone()).collect()
    };
    assert_eq!(texts(&logs.lines), lines, "every line once, in order");
    assert!(
        logs.lines.iter().all(|l| l.at.is_some()),
        "stamped as the hub sent them"
    );
    assert!(logs.ended, "the follower saw the job end");
    assert!(hub.log_connections(&job.id) >= 2, "it reconnected");

    // A snapshot of a finished job whose stream stays open and silent returns on idle.
    let started = std::time::Instant::now();
    let snapshot = client
        .logs(USER, &job.id, &jobs.log_options)
        .await
        .expect("the logs are read");
    assert_eq!(texts(&snapshot.lines), lines);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// A running job that prints all the time never leaves its stream idle: reading what exists
/// now stops where the replayed history ends, and following its progress reads only the
/// end of the history (`tail`).
#[tokio::test]
async fn a_chatty_running_job_is_read_up_to_now_and_followed_from_its_tail() {
    use ml_intern::tools::jobs::JobBackend;
    let hub = FakeHfHub::start().await;
    let lines: Vec<String> = (1..=3000)
        .map(|i| {
            format!(
                r#"{{"metric": "loss", "value": {}, "step": {i}}}"#,
                1.0 / i as f64
            )
        })
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    // 100 lines a second, far below the 700 ms idle time.
    hub.plan_next_job(JobPlan::completes(&refs, Duration::from_secs(30)));
    let jobs = backend(&hub, None);
    let job = start_job(&jobs.client).await;
    // Let it print a few hundred lines of history.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let started = std::time::Instant::now();
    let now = jobs.logs(&job.id, None).await.expect("the logs are read");
    let took = started.elapsed();
    let now: Vec<&str> = now.lines().collect();
    assert!(
        took < Duration::from_secs(10),
        "returned where the history ends, not at the 20 s deadline: {took:?}"
    );
    assert!(now.len() >= 250, "the history so far: {} lines", now.len());
    assert_eq!(now[0], lines[0], "from the start");
    assert_eq!(now, refs[..now.len()], "in order, once each");

    let tail = jobs
        .log_tail(&job.id, None, 50)
        .await
        .expect("the tail is read");
    let tail: Vec<&str> = tail.iter().map(|l| l.text.as_str()).collect();
    let first = refs
        .iter()
        .position(|l| *l == tail[0])
        .expect("a line the job printed");
    assert!(
        first >= now.len() - 50,
        "the end of the history: line {first}"
    );
    // 50 lines of history, then what came in the second the reader allows for clocks that
    // differ.
    assert!((50..300).contains(&tail.len()), "{} lines", tail.len());
    assert_eq!(tail, refs[first..first + tail.len()], "in order, once each");
    let asked = hub.requests_to("GET", &format!("/api/jobs/{USER}/{}/logs", job.id));
    assert_eq!(asked.len(), 2, "one connection each");
    assert_eq!(asked[0].query, None);
    assert_eq!(asked[1].query.as_deref(), Some("tail=50"));
    assert_eq!(hub.stage(&job.id).as_deref(), Some("RUNNING"));
}

#[tokio::test]
async fn server_errors_are_retried_and_failed_jobs_report_their_message() {
    let hub = FakeHfHub::start().await;
    hub.plan_next_job(JobPlan {
        ends: "ERROR",
        message: Some("CUDA out of memory. Tried to allocate 2.00 GiB".into()),
        ..JobPlan::completes(&["step 1"], Duration::from_millis(100))
    });
    let (tool, _) = tool(&hub, None);
    let (ok, out) = call(
        &tool,
        json!({"operation": "run", "command": ["python", "train.py"]}),
    )
    .await;
    assert!(ok, "{out}");
    let id = job_id(&out);
    let path = format!("/api/jobs/{USER}/{id}");
    hub.fail("GET", &path, &[503, 502]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (ok, out) = call(&tool, json!({"operation": "inspect", "job_id": id})).await;
    assert!(ok, "{out}");
    assert!(out.contains("State: Failed"), "{out}");
    assert!(out.contains("Reason: CUDA out of memory"), "{out}");
    assert_eq!(
        hub.requests_to("GET", &path).len(),
        3,
        "two 5xx, then the answer"
    );

    // 4xx is not retried, and says what the Hub said.
    let (ok, out) = call(&tool, json!({"operation": "inspect", "job_id": "nope"})).await;
    assert!(!ok);
    assert!(
        out.contains("HTTP 404") && out.contains("Job not found"),
        "{out}"
    );
    assert_eq!(
        hub.requests_to("GET", &format!("/api/jobs/{USER}/nope"))
            .len(),
        1
    );

    // ps: live only by default, all on request.
    let (_, out) = call(&tool, json!({"operation": "ps"})).await;
    assert!(out.contains("No running jobs"), "{out}");
    let (_, out) = call(&tool, json!({"operation": "ps", "all": true})).await;
    assert!(out.contains(&id) && out.contains("Failed"), "{out}");
    let ps = hub.requests_to("GET", &format!("/api/jobs/{USER}"));
    assert_eq!(
        ps[0].query.as_deref(),
        Some("stage=RUNNING&stage=SCHEDULING")
    );
    assert_eq!(ps[1].query, None);
}

#[tokio::test]
async fn cancel_stops_a_running_job() {
    let hub = FakeHfHub::start().await;
    hub.plan_next_job(JobPlan::completes(&["working"], Duration::from_secs(600)));
    let (tool, _) = tool(&hub, None);
    let (_, out) = call(
        &tool,
        json!({"operation": "run", "command": ["sleep", "600"]}),
    )
    .await;
    let id = job_id(&out);
    let (ok, out) = call(&tool, json!({"operation": "cancel", "job_id": id})).await;
    assert!(ok, "{out}");
    assert_eq!(
        hub.requests_to("POST", &format!("/api/jobs/{USER}/{id}/cancel"))
            .len(),
        1
    );
    assert_eq!(hub.stage(&id).as_deref(), Some("CANCELED"));
}

#[tokio::test]
async fn scheduled_jobs_are_created_listed_inspected_suspended_resumed_and_deleted() {
    let hub = FakeHfHub::start().await;
    let (tool, _) = tool(&hub, None);
    let (ok, out) = call(
        &tool,
        json!({"operation": "scheduled run", "command": ["python", "-c", "print(1)"], "schedule": "@daily", "hardware_flavor": "t4-small"}),
    )
    .await;
    assert!(ok, "{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("Scheduled job: "))
        .expect("an id")
        .to_string();
    let created = &hub.requests_to("POST", &format!("/api/scheduled-jobs/{USER}"))[0];
    assert_eq!(created.body["schedule"], "@daily");
    assert_eq!(created.body["jobSpec"]["flavor"], "t4-small");
    assert_eq!(
        created.body["jobSpec"]["command"],
        json!(["python", "-c", "print(1)"])
    );
    assert_eq!(
        created.body["jobSpec"]["secrets"]["HF_TOKEN"],
        HF_TEST_TOKEN
    );

    let (_, out) = call(&tool, json!({"operation": "scheduled ps"})).await;
    assert!(out.contains(&id) && out.contains("@daily"), "{out}");
    let (ok, _) = call(
        &tool,
        json!({"operation": "scheduled suspend", "scheduled_job_id": id}),
    )
    .await;
    assert!(ok);
    let (_, out) = call(
        &tool,
        json!({"operation": "scheduled inspect", "scheduled_job_id": id}),
    )
    .await;
    assert!(out.contains("Suspended: true"), "{out}");
    let (_, out) = call(&tool, json!({"operation": "scheduled ps"})).await;
    assert!(
        out.contains("No scheduled jobs"),
        "suspended ones are hidden: {out}"
    );
    let (ok, _) = call(
        &tool,
        json!({"operation": "scheduled resume", "scheduled_job_id": id}),
    )
    .await;
    assert!(ok);
    let (ok, _) = call(
        &tool,
        json!({"operation": "scheduled delete", "scheduled_job_id": id}),
    )
    .await;
    assert!(ok);
    let paths: Vec<(String, String)> = hub
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/api/scheduled-jobs"))
        .map(|r| (r.method, r.path))
        .collect();
    let base = format!("/api/scheduled-jobs/{USER}");
    assert_eq!(
        paths,
        vec![
            ("POST".to_string(), base.clone()),
            ("GET".into(), base.clone()),
            ("POST".into(), format!("{base}/{id}/suspend")),
            ("GET".into(), format!("{base}/{id}")),
            ("GET".into(), base.clone()),
            ("POST".into(), format!("{base}/{id}/resume")),
            ("DELETE".into(), format!("{base}/{id}")),
        ]
    );
    let (ok, out) = call(
        &tool,
        json!({"operation": "scheduled run", "command": ["true"]}),
    )
    .await;
    assert!(!ok && out.contains("needs schedule"), "{out}");
}

/// What the tool observed of jobs and schedules, folded into a session's status as the
/// controller does.
fn recorded(rx: &mut tokio::sync::mpsc::Receiver<JobObservation>) -> AgentSessionStatus {
    let mut status = AgentSessionStatus::default();
    while let Ok(seen) = rx.try_recv() {
        job_follower::record(&mut status, seen);
    }
    status
}

/// A stopped session (suspended, failed, over budget) cancels its running job and
/// suspends its schedule; a deleted one deletes the schedule; detached ones are left alone.
#[tokio::test]
async fn stopping_a_session_suspends_its_schedules_and_deleting_it_deletes_them() {
    let hub = FakeHfHub::start().await;
    hub.plan_next_job(JobPlan::completes(&["working"], Duration::from_secs(600)));
    let (tool, mut rx) = tool(&hub, None);
    let (_, out) = call(
        &tool,
        json!({"operation": "run", "command": ["sleep", "600"]}),
    )
    .await;
    let job = job_id(&out);
    let mut schedules = vec![];
    for args in [
        json!({"operation": "scheduled run", "command": ["python", "eval.py"], "schedule": "@daily"}),
        json!({"operation": "scheduled run", "command": ["python", "report.py"], "schedule": "@weekly", "detach": true}),
    ] {
        let (ok, out) = call(&tool, args).await;
        assert!(ok, "{out}");
        let id = out.lines().find_map(|l| l.strip_prefix("Scheduled job: "));
        schedules.push(id.expect("an id").to_string());
    }
    let mut status = recorded(&mut rx);
    let listed: Vec<(&str, &str, bool, bool)> = status
        .schedules
        .iter()
        .map(|s| (s.id.as_str(), s.schedule.as_str(), s.suspended, s.detach))
        .collect();
    assert_eq!(
        listed,
        [
            (schedules[0].as_str(), "@daily", false, false),
            (schedules[1].as_str(), "@weekly", false, true)
        ]
    );
    assert_eq!(status.schedules[0].namespace.as_deref(), Some(USER));

    let backends = job_follower::JobBackends {
        cluster: None,
        huggingface: Some(tool.backend.clone()),
    };
    let stopped = job_follower::stop_attached(&mut status, &backends, &[]).await;
    assert_eq!(stopped.jobs, [job.as_str()]);
    assert_eq!(stopped.schedules, [schedules[0].as_str()]);
    assert_eq!(
        stopped.describe(),
        format!(
            "stopped running jobs {job}; suspended schedules {}",
            schedules[0]
        )
    );
    let base = format!("/api/scheduled-jobs/{USER}");
    let suspends: Vec<String> = hub
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/suspend"))
        .map(|r| r.path)
        .collect();
    assert_eq!(suspends, [format!("{base}/{}/suspend", schedules[0])]);
    assert!(status.schedules[0].suspended && !status.schedules[1].suspended);
    assert_eq!(hub.stage(&job).as_deref(), Some("CANCELED"));
    // Stopping again asks nothing more of the platform.
    let again = job_follower::stop_attached(&mut status, &backends, &[]).await;
    assert!(again.is_empty(), "{again:?}");

    let deleted = job_follower::delete_schedules(&mut status, &backends).await;
    assert_eq!(deleted, [schedules[0].as_str()]);
    let deletes: Vec<String> = hub
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path)
        .collect();
    assert_eq!(deletes, [format!("{base}/{}", schedules[0])]);
    assert_eq!(status.schedules.len(), 1);
    assert_eq!(status.schedules[0].id, schedules[1]);

    // The agent deleting a schedule itself takes it off the list.
    let (ok, _) = call(
        &tool,
        json!({"operation": "scheduled delete", "scheduled_job_id": schedules[1]}),
    )
    .await;
    assert!(ok);
    job_follower::record(&mut status, rx.try_recv().expect("an observation"));
    assert!(status.schedules.is_empty());
}
