//! The HF Jobs REST API (`/api/jobs`, `/api/scheduled-jobs`, `/api/whoami-v2`): requests
//! and responses in the Hub's camelCase shapes, 429 and 5xx retried with backoff, other
//! errors reported with the Hub's own message.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What the Hub runs: `POST /api/jobs/{namespace}` and the `jobSpec` of a scheduled job.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub space_id: Option<String>,
    pub command: Vec<String>,
    pub arguments: Vec<String>,
    pub environment: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
    pub flavor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A job as the Hub describes it; unknown fields are ignored, missing ones default.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HubJob {
    pub id: String,
    pub created_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub docker_image: Option<String>,
    pub space_id: Option<String>,
    pub command: Vec<String>,
    pub flavor: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub status: HubJobStatus,
    pub owner: Option<Owner>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HubJobStatus {
    /// SCHEDULING, RUNNING, UPDATING, COMPLETED, CANCELED, ERROR or DELETED.
    pub stage: String,
    pub message: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Owner {
    pub name: String,
}

impl HubJob {
    /// The stage ends the job: nothing more will happen to it.
    pub fn is_finished(&self) -> bool {
        stage_is_final(&self.status.stage)
    }
}

pub fn stage_is_final(stage: &str) -> bool {
    matches!(stage, "COMPLETED" | "CANCELED" | "ERROR" | "DELETED")
}

/// One entry of `GET /api/jobs/hardware`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Hardware {
    pub name: String,
    pub pretty_name: Option<String>,
    pub cpu: Option<String>,
    pub ram: Option<String>,
    pub accelerator: Option<Value>,
    #[serde(rename = "unitCostUSD")]
    pub unit_cost_usd: Option<f64>,
    pub unit_label: Option<String>,
}

impl Hardware {
    /// The price per hour, from the per-unit cost and its unit.
    pub fn usd_per_hour(&self) -> Option<f64> {
        let per_unit = self.unit_cost_usd?;
        let units_per_hour = match self.unit_label.as_deref().unwrap_or("minute") {
            "second" => 3600.0,
            "minute" => 60.0,
            "hour" => 1.0,
            _ => return None,
        };
        Some(per_unit * units_per_hour)
    }

    pub fn has_accelerator(&self) -> bool {
        self.accelerator.as_ref().is_some_and(|a| !a.is_null())
    }

    /// "CPU Basic: 2 vCPU, 16 GB, $0.01/h".
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = [self.cpu.clone(), self.ram.clone()]
            .into_iter()
            .flatten()
            .collect();
        if let Some(p) = self.usd_per_hour() {
            parts.push(format!("${p:.2}/h"));
        }
        format!(
            "{}: {}",
            self.pretty_name.as_deref().unwrap_or(&self.name),
            parts.join(", ")
        )
    }
}

/// A job that runs on a schedule (`/api/scheduled-jobs`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ScheduledJob {
    pub id: String,
    pub created_at: Option<String>,
    pub job_spec: Value,
    pub schedule: String,
    pub suspend: bool,
    pub concurrency: bool,
    pub status: ScheduledJobStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ScheduledJobStatus {
    pub last_job: Option<LastJob>,
    pub next_job_run_at: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LastJob {
    pub id: String,
    pub at: Option<String>,
}

/// `GET /api/whoami-v2`: who the token belongs to, and the orgs it may start jobs in.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Whoami {
    pub name: String,
    pub orgs: Vec<Owner>,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum HfError {
    /// The Hub answered with an error status.
    #[error("{method} {path} answered HTTP {status}: {message}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        message: String,
    },
    #[error("cannot reach {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("{path} answered something unexpected: {detail}")]
    InvalidResponse { path: String, detail: String },
}

impl HfError {
    pub fn status(&self) -> Option<u16> {
        match self {
            HfError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Credits run out: the namespace needs billing set up (ml-intern's billing message).
    pub fn is_billing(&self) -> bool {
        match self {
            HfError::Status {
                status, message, ..
            } => {
                let m = message.to_ascii_lowercase();
                *status == 402 || m.contains("credit") || m.contains("billing")
            }
            _ => false,
        }
    }
}

pub struct HfJobsClient {
    http: reqwest::Client,
    /// For the logs stream, which has no overall deadline; reads time out instead.
    pub(super) streaming: reqwest::Client,
    base: String,
    token: String,
    retry_delays: Vec<Duration>,
}

impl HfJobsClient {
    pub fn new(base_url: &str, token: String) -> Self {
        HfJobsClient {
            http: crate::http::http_client(Duration::from_secs(60)),
            streaming: crate::http::streaming_client(),
            base: base_url.trim_end_matches('/').to_string(),
            token,
            retry_delays: vec![
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(4),
            ],
        }
    }

    /// Waits between retries of 429 and 5xx answers (shorter in tests).
    pub fn with_retry_delays(mut self, delays: Vec<Duration>) -> Self {
        self.retry_delays = delays;
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub(super) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(super) fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        request.bearer_auth(&self.token)
    }

    /// Sends, retrying 429, 5xx and connection failures; the body of the final answer and
    /// the `Link: <…>; rel="next"` URL of a paginated one.
    async fn send(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(Vec<u8>, Option<String>), HfError> {
        let url = self.url(path);
        let mut attempt = 0;
        loop {
            let mut request = self.authorized(match method {
                "POST" => self.http.post(&url),
                "PUT" => self.http.put(&url),
                "DELETE" => self.http.delete(&url),
                _ => self.http.get(&url),
            });
            if let Some(b) = body {
                request = request.json(b);
            }
            let retry = self.retry_delays.get(attempt).copied();
            attempt += 1;
            let response = match request.send().await {
                Ok(r) => r,
                Err(e) => match retry {
                    Some(delay) => {
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    None => {
                        return Err(HfError::Unreachable {
                            url,
                            detail: crate::http::describe_error(&e),
                        });
                    }
                },
            };
            let status = response.status().as_u16();
            if (status == 429 || status >= 500)
                && let Some(delay) = retry
            {
                tokio::time::sleep(delay).await;
                continue;
            }
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let header_message = header("x-error-message");
            let next = header("link").as_deref().and_then(next_link);
            let bytes = response.bytes().await.map_err(|e| HfError::Unreachable {
                url: url.clone(),
                detail: crate::http::describe_error(&e),
            })?;
            if !(200..300).contains(&status) {
                return Err(HfError::Status {
                    method,
                    path: path.to_string(),
                    status,
                    message: header_message
                        .unwrap_or_else(|| crate::llm::transport::error_message(&bytes)),
                });
            }
            return Ok((bytes.to_vec(), next));
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, HfError> {
        let (bytes, _) = self.send(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| HfError::InvalidResponse {
            path: path.to_string(),
            detail: e.to_string(),
        })
    }

    pub async fn whoami(&self) -> Result<Whoami, HfError> {
        self.json("GET", "/api/whoami-v2", None).await
    }

    pub async fn hardware(&self) -> Result<Vec<Hardware>, HfError> {
        self.json("GET", "/api/jobs/hardware", None).await
    }

    pub async fn run(&self, namespace: &str, spec: &JobSpec) -> Result<HubJob, HfError> {
        let body = serde_json::to_value(spec).map_err(|e| HfError::InvalidResponse {
            path: "job spec".into(),
            detail: e.to_string(),
        })?;
        self.json(
            "POST",
            &format!("/api/jobs/{}", seg(namespace)),
            Some(&body),
        )
        .await
    }

    /// The namespace's jobs; only those scheduling or running unless `all`. Follows the
    /// `Link: <…>; rel="next"` pages.
    pub async fn list(&self, namespace: &str, all: bool) -> Result<Vec<HubJob>, HfError> {
        let mut path = format!("/api/jobs/{}", seg(namespace));
        if !all {
            path.push_str("?stage=RUNNING&stage=SCHEDULING");
        }
        let mut jobs = vec![];
        for _ in 0..100 {
            let (bytes, next) = self.send("GET", &path, None).await?;
            let page: Vec<HubJob> =
                serde_json::from_slice(&bytes).map_err(|e| HfError::InvalidResponse {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            jobs.extend(page);
            match next {
                // The next page is given as a full URL; only its path and query are ours
                // to follow, so a mirror's links keep going to the same base.
                Some(link) => path = path_of(&link),
                None => break,
            }
        }
        Ok(jobs)
    }

    pub async fn inspect(&self, namespace: &str, id: &str) -> Result<HubJob, HfError> {
        self.json(
            "GET",
            &format!("/api/jobs/{}/{}", seg(namespace), seg(id)),
            None,
        )
        .await
    }

    pub async fn cancel(&self, namespace: &str, id: &str) -> Result<(), HfError> {
        self.send(
            "POST",
            &format!("/api/jobs/{}/{}/cancel", seg(namespace), seg(id)),
            None,
        )
        .await
        .map(|_| ())
    }

    pub async fn schedule(
        &self,
        namespace: &str,
        spec: &JobSpec,
        schedule: &str,
    ) -> Result<ScheduledJob, HfError> {
        let body = serde_json::json!({"jobSpec": spec, "schedule": schedule});
        self.json(
            "POST",
            &format!("/api/scheduled-jobs/{}", seg(namespace)),
            Some(&body),
        )
        .await
    }

    pub async fn scheduled_list(&self, namespace: &str) -> Result<Vec<ScheduledJob>, HfError> {
        self.json(
            "GET",
            &format!("/api/scheduled-jobs/{}", seg(namespace)),
            None,
        )
        .await
    }

    pub async fn scheduled_inspect(
        &self,
        namespace: &str,
        id: &str,
    ) -> Result<ScheduledJob, HfError> {
        self.json(
            "GET",
            &format!("/api/scheduled-jobs/{}/{}", seg(namespace), seg(id)),
            None,
        )
        .await
    }

    pub async fn scheduled_delete(&self, namespace: &str, id: &str) -> Result<(), HfError> {
        let path = format!("/api/scheduled-jobs/{}/{}", seg(namespace), seg(id));
        self.send("DELETE", &path, None).await.map(|_| ())
    }

    /// `action` is `suspend` or `resume`.
    pub async fn scheduled_action(
        &self,
        namespace: &str,
        id: &str,
        action: &str,
    ) -> Result<(), HfError> {
        let path = format!(
            "/api/scheduled-jobs/{}/{}/{action}",
            seg(namespace),
            seg(id)
        );
        self.send("POST", &path, None).await.map(|_| ())
    }
}

/// A path segment as given, or percent-encoded where it holds characters a URL path
/// cannot (names and ids are plain on the Hub, so this only guards against odd input).
pub(super) fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The `rel="next"` URL of a Link header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"")
            .then(|| {
                url.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

/// "/api/jobs/ns?cursor=x" from "https://host/api/jobs/ns?cursor=x" (or a bare path).
fn path_of(link: &str) -> String {
    match link.split_once("://") {
        Some((_, rest)) => match rest.find('/') {
            Some(i) => rest[i..].to_string(),
            None => "/".to_string(),
        },
        None => link.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_give_the_next_page() {
        let h = r#"<https://huggingface.co/api/jobs/me?cursor=abc>; rel="next", <https://x/y>; rel="prev""#;
        let next = next_link(h).unwrap();
        assert_eq!(next, "https://huggingface.co/api/jobs/me?cursor=abc");
        assert_eq!(path_of(&next), "/api/jobs/me?cursor=abc");
        assert_eq!(next_link(r#"<https://x/y>; rel="prev""#), None);
    }

    #[test]
    fn hardware_prices_are_per_hour() {
        let h: Hardware = serde_json::from_value(serde_json::json!({
            "name": "t4-small", "prettyName": "1x T4", "cpu": "4 vCPU", "ram": "15 GB",
            "accelerator": {"type": "gpu", "model": "T4"}, "unitCostMicroUSD": 6667,
            "unitCostUSD": 0.006667, "unitLabel": "minute"
        }))
        .unwrap();
        assert!((h.usd_per_hour().unwrap() - 0.40002).abs() < 1e-9);
        assert!(h.has_accelerator());
        assert_eq!(h.describe(), "1x T4: 4 vCPU, 15 GB, $0.40/h");
    }

    #[test]
    fn job_specs_are_sent_in_the_hub_shape() {
        let spec = JobSpec {
            docker_image: Some("python:3.12".into()),
            command: vec!["python".into(), "-c".into(), "print(1)".into()],
            flavor: "cpu-basic".into(),
            timeout_seconds: Some(300),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            serde_json::json!({
                "dockerImage": "python:3.12",
                "command": ["python", "-c", "print(1)"],
                "arguments": [],
                "environment": {},
                "flavor": "cpu-basic",
                "timeoutSeconds": 300
            })
        );
        assert_eq!(seg("user/x y"), "user%2Fx%20y");
    }
}
