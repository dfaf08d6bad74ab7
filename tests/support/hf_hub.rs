//! A local Hugging Face Jobs server, written from the documented API (whoami-v2, jobs,
//! logs as server-sent events, hardware, scheduled jobs). Each job follows a plan the test
//! sets: its log lines, how long it runs, how it ends, and how its log stream misbehaves
//! (keep-alives, replay from the start on every connection, early ends, `tail`). Each line
//! is stamped with the time it was printed. Every request is kept for assertions.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};

pub const USER: &str = "alice";
pub const ORG: &str = "acme-org";

/// How a job goes.
#[derive(Clone, Debug)]
pub struct JobPlan {
    /// Printed evenly over `runs_for`.
    pub lines: Vec<String>,
    pub runs_for: Duration,
    /// COMPLETED or ERROR.
    pub ends: &'static str,
    pub message: Option<String>,
    /// The first log connection closes after this many events (then the stream replays).
    pub first_stream_ends_after: Option<usize>,
}

impl JobPlan {
    pub fn completes(lines: &[&str], runs_for: Duration) -> Self {
        JobPlan {
            lines: lines.iter().map(|s| s.to_string()).collect(),
            runs_for,
            ends: "COMPLETED",
            message: None,
            first_stream_ends_after: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SeenHf {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub body: Value,
}

struct FakeJob {
    info: Value,
    plan: JobPlan,
    started: Instant,
    started_at: Timestamp,
    cancelled: bool,
    log_connections: usize,
}

impl FakeJob {
    fn elapsed_fraction(&self) -> f64 {
        if self.plan.runs_for.is_zero() {
            return 1.0;
        }
        (self.started.elapsed().as_secs_f64() / self.plan.runs_for.as_secs_f64()).min(1.0)
    }

    fn stage(&self) -> &'static str {
        if self.cancelled {
            "CANCELED"
        } else if self.elapsed_fraction() >= 1.0 {
            self.plan.ends
        } else {
            "RUNNING"
        }
    }

    fn printed(&self) -> Vec<String> {
        let n = (self.plan.lines.len() as f64 * self.elapsed_fraction()).floor() as usize;
        let n = if self.stage() == "RUNNING" {
            n
        } else {
            self.plan.lines.len()
        };
        self.plan.lines[..n.min(self.plan.lines.len())].to_vec()
    }

    /// When line `i` was (or will be) printed: the lines are spread evenly over the run.
    fn printed_at(&self, i: usize) -> Timestamp {
        let share = (i + 1) as f64 / self.plan.lines.len().max(1) as f64;
        let after = self.plan.runs_for.mul_f64(share);
        self.started_at + SignedDuration::try_from(after).unwrap_or(SignedDuration::ZERO)
    }

    fn view(&self) -> Value {
        let mut info = self.info.clone();
        let stage = self.stage();
        info["status"] = json!({
            "stage": stage,
            "message": if stage == "ERROR" { json!(self.plan.message) } else { Value::Null },
        });
        if stage != "RUNNING" {
            info["finishedAt"] = json!("2026-11-22T10:00:30.000Z");
        }
        info
    }
}

#[derive(Default)]
struct Hub {
    seen: Vec<SeenHf>,
    jobs: HashMap<String, FakeJob>,
    plans: VecDeque<JobPlan>,
    scheduled: HashMap<String, Value>,
    /// Answers to give instead of the real one: (method, path) -> statuses, in order.
    failures: HashMap<(String, String), VecDeque<u16>>,
    next_id: u64,
}

type Shared = Arc<Mutex<Hub>>;

pub struct FakeHfHub {
    pub url: String,
    hub: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeHfHub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The documented hardware list (a few flavors, with the Hub's prices).
fn hardware() -> Value {
    let cpu = |name: &str, pretty: &str, cpu: &str, ram: &str, per_hour: f64| {
        json!({"name": name, "prettyName": pretty, "cpu": cpu, "ram": ram, "accelerator": null,
               "unitCostMicroUSD": (per_hour / 60.0 * 1e6).round(), "unitCostUSD": per_hour / 60.0, "unitLabel": "minute"})
    };
    let gpu = |name: &str, model: &str, per_hour: f64| {
        json!({"name": name, "prettyName": format!("1x {model}"), "cpu": "8 vCPU", "ram": "30 GB",
               "ephemeralStorage": "100 GB",
               "accelerator": {"type": "gpu", "model": model, "quantity": "1", "vram": "24 GB", "manufacturer": "Nvidia"},
               "unitCostMicroUSD": (per_hour / 60.0 * 1e6).round(), "unitCostUSD": per_hour / 60.0, "unitLabel": "minute"})
    };
    json!([
        cpu("cpu-basic", "CPU Basic", "2 vCPU", "16 GB", 0.01),
        cpu("cpu-upgrade", "CPU Upgrade", "8 vCPU", "32 GB", 0.03),
        gpu("t4-small", "T4", 0.40),
        gpu("a10g-large", "A10G", 1.50),
        gpu("a100-large", "A100", 2.50),
    ])
}

impl FakeHfHub {
    pub async fn start() -> Self {
        let hub: Shared = Arc::default();
        let app = Router::new()
            .route("/api/whoami-v2", get(whoami))
            .route("/api/jobs/hardware", get(|| async { Json(hardware()) }))
            .route("/api/jobs/{ns}", get(list_jobs).post(run_job))
            .route("/api/jobs/{ns}/{id}", get(inspect_job))
            .route("/api/jobs/{ns}/{id}/cancel", post(cancel_job))
            .route("/api/jobs/{ns}/{id}/logs", get(job_logs))
            .route(
                "/api/scheduled-jobs/{ns}",
                get(list_scheduled).post(create_scheduled),
            )
            .route(
                "/api/scheduled-jobs/{ns}/{id}",
                get(inspect_scheduled).delete(delete_scheduled),
            )
            .route(
                "/api/scheduled-jobs/{ns}/{id}/{action}",
                post(act_on_scheduled),
            )
            .layer(axum::middleware::from_fn_with_state(hub.clone(), record))
            .with_state(hub.clone());
        let (addr, server) = super::loopback::serve(app).await;
        FakeHfHub {
            url: format!("http://{addr}"),
            hub,
            server,
        }
    }

    /// The next job created follows `plan` (else it completes at once without output).
    pub fn plan_next_job(&self, plan: JobPlan) {
        self.hub.lock().unwrap().plans.push_back(plan);
    }

    /// The next `statuses.len()` requests of `method` to `path` get these statuses.
    pub fn fail(&self, method: &str, path: &str, statuses: &[u16]) {
        self.hub.lock().unwrap().failures.insert(
            (method.into(), path.into()),
            statuses.iter().copied().collect(),
        );
    }

    pub fn requests(&self) -> Vec<SeenHf> {
        self.hub.lock().unwrap().seen.clone()
    }

    pub fn requests_to(&self, method: &str, path: &str) -> Vec<SeenHf> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method && r.path == path)
            .collect()
    }

    /// Waits until `method` `path` was asked for.
    pub async fn wait_for_request(&self, method: &str, path: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while self.requests_to(method, path).is_empty() {
            assert!(
                Instant::now() < deadline,
                "no {method} {path} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn log_connections(&self, id: &str) -> usize {
        self.hub
            .lock()
            .unwrap()
            .jobs
            .get(id)
            .map_or(0, |j| j.log_connections)
    }

    pub fn stage(&self, id: &str) -> Option<String> {
        self.hub
            .lock()
            .unwrap()
            .jobs
            .get(id)
            .map(|j| j.stage().to_string())
    }
}

/// Keeps every request (body included) and answers injected failures.
async fn record(
    State(hub): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 16 << 20)
        .await
        .unwrap_or_default();
    let seen = SeenHf {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        authorization: parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    };
    let injected = {
        let mut hub = hub.lock().unwrap();
        hub.seen.push(seen.clone());
        hub.failures
            .get_mut(&(seen.method.clone(), seen.path.clone()))
            .and_then(VecDeque::pop_front)
    };
    if let Some(status) = injected {
        return (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(json!({"error": "injected failure"})),
        )
            .into_response();
    }
    if seen.authorization.as_deref() != Some(&format!("Bearer {}", super::HF_TEST_TOKEN)) {
        return (
            StatusCode::UNAUTHORIZED,
            [(
                "x-error-message",
                "Invalid credentials in Authorization header",
            )],
            Json(json!({"error": "Invalid credentials in Authorization header"})),
        )
            .into_response();
    }
    next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn allowed(ns: &str) -> Result<(), Box<Response>> {
    if ns == USER || ns == ORG {
        Ok(())
    } else {
        Err(Box::new(
            (
                StatusCode::FORBIDDEN,
                Json(json!({"error": format!("You don't have access to namespace {ns}")})),
            )
                .into_response(),
        ))
    }
}

async fn whoami() -> Json<Value> {
    Json(json!({
        "type": "user", "name": USER, "fullname": "Alice",
        "orgs": [{"name": ORG, "type": "org"}],
        "auth": {"accessToken": {"role": "write"}}
    }))
}

async fn run_job(
    State(hub): State<Shared>,
    Path(ns): Path<String>,
    Json(spec): Json<Value>,
) -> Response {
    if let Err(r) = allowed(&ns) {
        return *r;
    }
    let flavor = spec["flavor"].as_str().unwrap_or("cpu-basic").to_string();
    let known = hardware()
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["name"] == flavor.as_str());
    if !known {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("Invalid flavor {flavor}")})),
        )
            .into_response();
    }
    let mut hub = hub.lock().unwrap();
    hub.next_id += 1;
    let id = format!("68a{:021x}", hub.next_id);
    let plan = hub
        .plans
        .pop_front()
        .unwrap_or_else(|| JobPlan::completes(&[], Duration::ZERO));
    let info = json!({
        "id": id, "createdAt": "2026-11-22T10:00:00.000Z", "startedAt": "2026-11-22T10:00:00.000Z",
        "finishedAt": null, "dockerImage": spec["dockerImage"], "spaceId": null,
        "command": spec["command"], "arguments": spec["arguments"], "environment": spec["environment"],
        "secrets": {}, "flavor": flavor, "labels": spec["labels"],
        "owner": {"id": "5e9e", "name": ns, "type": "user"},
        "initiator": {"type": "user", "id": "5e9e", "name": USER},
        "someFutureField": {"ignored": true}
    });
    let job = FakeJob {
        info,
        plan,
        started: Instant::now(),
        started_at: Timestamp::now(),
        cancelled: false,
        log_connections: 0,
    };
    let view = job.view();
    hub.jobs.insert(id, job);
    Json(view).into_response()
}

async fn list_jobs(
    State(hub): State<Shared>,
    Path(ns): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(r) = allowed(&ns) {
        return *r;
    }
    let stages: Vec<String> = query
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.strip_prefix("stage=").map(str::to_string))
        .collect();
    let hub = hub.lock().unwrap();
    let jobs: Vec<Value> = hub
        .jobs
        .values()
        .filter(|j| j.info["owner"]["name"] == ns.as_str())
        .filter(|j| stages.is_empty() || stages.iter().any(|s| s == j.stage()))
        .map(FakeJob::view)
        .collect();
    Json(jobs).into_response()
}

async fn inspect_job(
    State(hub): State<Shared>,
    Path((ns, id)): Path<(String, String)>,
) -> Response {
    if let Err(r) = allowed(&ns) {
        return *r;
    }
    match hub.lock().unwrap().jobs.get(&id) {
        Some(j) => Json(j.view()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "Job not found"})),
        )
            .into_response(),
    }
}

async fn cancel_job(State(hub): State<Shared>, Path((ns, id)): Path<(String, String)>) -> Response {
    if let Err(r) = allowed(&ns) {
        return *r;
    }
    match hub.lock().unwrap().jobs.get_mut(&id) {
        Some(j) => {
            j.cancelled = true;
            StatusCode::OK.into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn event(line: &str, at: Timestamp) -> Bytes {
    Bytes::from(format!(
        "data: {}\n\n",
        json!({"data": line, "timestamp": at.to_string()})
    ))
}

/// The history from the start, then new lines as they come, with keep-alives between; the
/// stream stays open (silent but for keep-alives) after the job ends, as the Hub's does.
/// With `tail=N` the history is its last N lines, without the banner.
async fn job_logs(
    State(hub): State<Shared>,
    Path((ns, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(r) = allowed(&ns) {
        return *r;
    }
    let tail = query
        .as_deref()
        .and_then(|q| q.strip_prefix("tail="))
        .and_then(|n| n.parse::<usize>().ok());
    let (cut_after, started_at, skipped) = {
        let mut h = hub.lock().unwrap();
        let Some(job) = h.jobs.get_mut(&id) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        job.log_connections += 1;
        let cut = if job.log_connections == 1 {
            job.plan.first_stream_ends_after
        } else {
            None
        };
        let skipped = tail.map(|n| job.printed().len().saturating_sub(n));
        (cut, job.started_at, skipped)
    };
    // (hub, job id, events sent, cut after, banner sent); `sent` counts the banner, also
    // when `tail` left it out.
    let state = match skipped {
        Some(skip) => (hub, id, 1 + skip, cut_after, true),
        None => (hub, id, 0usize, cut_after, false),
    };
    let stream = futures::stream::unfold(state, move |(hub, id, sent, cut, banner)| async move {
        if !banner {
            let b = event("===== Job started at 2026-11-22 10:00:00 =====", started_at);
            return Some((Ok::<_, std::io::Error>(b), (hub, id, sent + 1, cut, true)));
        }
        if cut.is_some_and(|c| sent >= c) {
            return None;
        }
        let printed = {
            let h = hub.lock().unwrap();
            h.jobs
                .get(&id)
                .map(|j| {
                    let lines = j.printed();
                    let at = (0..lines.len())
                        .map(|i| j.printed_at(i))
                        .collect::<Vec<_>>();
                    lines.into_iter().zip(at).collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        if let Some((line, at)) = printed.get(sent - 1) {
            let b = event(line, *at);
            return Some((Ok(b), (hub, id, sent + 1, cut, true)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((
            Ok(Bytes::from_static(b": keep-alive\n\n")),
            (hub, id, sent, cut, true),
        ))
    });
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

fn scheduled_view(id: &str, ns: &str, body: &Value, suspend: bool) -> Value {
    json!({
        "id": id, "createdAt": "2026-11-22T10:00:00.000Z",
        "jobSpec": body["jobSpec"], "schedule": body["schedule"],
        "suspend": suspend, "concurrency": false,
        "status": {"lastJob": null, "nextJobRunAt": "2026-11-23T00:00:00.000Z"},
        "owner": {"id": "5e9e", "name": ns, "type": "user"}
    })
}

async fn create_scheduled(
    State(hub): State<Shared>,
    Path(ns): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    if let Err(r) = allowed(&ns) {
        return *r;
    }
    if body["schedule"].as_str().is_none() || body["jobSpec"].is_null() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "schedule and jobSpec are required"})),
        )
            .into_response();
    }
    let mut hub = hub.lock().unwrap();
    hub.next_id += 1;
    let id = format!("5c{:022x}", hub.next_id);
    let view = scheduled_view(&id, &ns, &body, body["suspend"].as_bool().unwrap_or(false));
    hub.scheduled.insert(id, view.clone());
    Json(view).into_response()
}

async fn list_scheduled(State(hub): State<Shared>, Path(ns): Path<String>) -> Response {
    if let Err(r) = allowed(&ns) {
        return *r;
    }
    let hub = hub.lock().unwrap();
    Json(hub.scheduled.values().cloned().collect::<Vec<_>>()).into_response()
}

async fn inspect_scheduled(
    State(hub): State<Shared>,
    Path((_, id)): Path<(String, String)>,
) -> Response {
    match hub.lock().unwrap().scheduled.get(&id) {
        Some(v) => Json(v.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn delete_scheduled(
    State(hub): State<Shared>,
    Path((_, id)): Path<(String, String)>,
) -> Response {
    match hub.lock().unwrap().scheduled.remove(&id) {
        Some(_) => StatusCode::OK.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn act_on_scheduled(
    State(hub): State<Shared>,
    Path((_, id, action)): Path<(String, String, String)>,
    method: Method,
    uri: Uri,
    _headers: HeaderMap,
) -> Response {
    let mut hub = hub.lock().unwrap();
    let Some(s) = hub.scheduled.get_mut(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match action.as_str() {
        "suspend" => s["suspend"] = json!(true),
        "resume" => s["suspend"] = json!(false),
        _ => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"error": format!("no route {method} {uri}")})),
            )
                .into_response();
        }
    }
    StatusCode::OK.into_response()
}
