//! `AgentSession`: one task for the agent, reconciled into an agent loop and a sandbox pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Upper bound on `status.finalResponse`, so a long answer cannot push the object towards
/// etcd's size limit; the full answer belongs in the transcript.
pub const FINAL_RESPONSE_MAX_BYTES: usize = 16 * 1024;

/// An autonomous ML-engineer agent working on one task.
///
/// The controller runs the agent loop for the session: it sends the prompt to the model,
/// runs the tools the model calls in a sandbox pod owned by the session, and records the
/// model's final answer in `status.finalResponse`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ml-intern.io",
    version = "v1alpha1",
    kind = "AgentSession",
    namespaced,
    status = "AgentSessionStatus",
    shortname = "ags",
    category = "ml-intern",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Where the session is in its lifecycle"}"#,
    printcolumn = r#"{"name":"Iterations","type":"integer","jsonPath":".status.iterations","description":"Model calls made so far"}"#,
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model","description":"Model the agent talks to"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "An autonomous ML-engineer agent working on one task, with its own sandbox pod."
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSessionSpec {
    /// The task for the agent, sent as the first user message. It cannot be changed once
    /// sent: a changed prompt is refused with the `Accepted` condition.
    #[schemars(length(min = 1))]
    pub prompt: String,

    /// Follow-up user messages, append-only. Each new entry starts a new turn, with the
    /// whole conversation so far, once the previous turn is done. Entries already sent
    /// cannot be changed or removed (refused with the `Accepted` condition).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<String>,

    /// Interrupts the current turn (running tool calls are cancelled and the sandbox's
    /// processes killed) and stops all work until set back to false; the session then
    /// resumes where it stopped. The sandbox pod and its workspace are kept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,

    /// Model id; the controller's default model (its model config) when unset. With
    /// `llm.api: openai`, `openai/<id>` talks to `llm.baseUrl` (default
    /// https://api.openai.com/v1) with model `<id>`, and any other id, such as
    /// `moonshotai/Kimi-K2.6:novita`, is sent unchanged to `llm.baseUrl` (default the
    /// Hugging Face inference router, https://router.huggingface.co/v1). With
    /// `llm.api: anthropic`, `anthropic/<id>` or `<id>` is sent as `<id>` to `llm.baseUrl`
    /// (default https://api.anthropic.com).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub model: Option<String>,

    /// How to reach the model.
    #[serde(default)]
    pub llm: LlmSpec,

    /// The tools the agent may use, by name (`bash`, `read`, `write`, `edit`, `plan_tool`,
    /// `sandbox_create`, `cluster_jobs`, `hf_jobs`); all of them when empty. Small models do better
    /// with fewer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,

    /// Most model calls the agent may make before the session fails with
    /// `MaxIterationsReached`.
    #[serde(default = "default_max_iterations")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_iterations: u32,

    /// The pod in which the agent's tool calls run.
    #[serde(default)]
    pub sandbox: SandboxSpec,

    /// Which tool calls wait for a human decision (an AgentApproval) before they run.
    #[serde(default)]
    pub approval_policy: ApprovalPolicy,

    /// Spending limits over the whole session; the session fails with `BudgetExceeded`
    /// before the model call that would go past them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,

    /// Hugging Face access: the token the `hf_jobs` tool runs jobs with (and gives them as
    /// `HF_TOKEN`). Without it the session has no `hf_jobs` tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugging_face: Option<HuggingFaceSpec>,
}

/// The session's Hugging Face account.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HuggingFaceSpec {
    /// Secret key in the session's namespace holding a token allowed to run Jobs
    /// (`hf_…`, write or fine-grained with the jobs scope).
    pub token_secret_ref: SecretKeyRef,
    /// User or organization that jobs run under and are billed to; the token's user when
    /// unset. The model may pick another namespace the token can use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub namespace: Option<String>,
}

/// When tool calls wait for a human.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalPolicy {
    /// `Manual` (default): gated calls wait for an AgentApproval. `Auto`: gated calls run
    /// without asking. `Budgeted`: as Manual for gated calls, and when the session's
    /// estimated spending reaches `autoApproveUpToUsd` the loop pauses for an approval of
    /// kind `budget`; approving it raises the cap by `budgetStepUsd` (ml-intern's YOLO cap).
    #[serde(default)]
    pub mode: ApprovalMode,
    /// `Budgeted`: the spending (USD, from the model config's prices) at which the loop first
    /// pauses. Default "5".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?$"))]
    pub auto_approve_up_to_usd: Option<String>,
    /// `Budgeted`: how much an approved budget pause adds to the cap. Default: the first cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?$"))]
    pub budget_step_usd: Option<String>,
    /// Tools whose every call is gated, on top of the built-in rules (a `sandbox_create` to
    /// a GPU preset, and later training and Hub-changing jobs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gated_tools: Vec<String>,
    /// Seconds a request may wait for a decision (default 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2592000))]
    pub timeout_seconds: Option<u32>,
    /// What happens to a request nobody decided in time: `Reject` (default; the model is
    /// told) or `Suspend` (the session is suspended and a later decision still resumes it).
    #[serde(default)]
    pub on_timeout: ApprovalTimeoutAction,
    /// The session's creator may not approve its calls (enforced by the admission webhook).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forbid_self_approval: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ApprovalMode {
    #[default]
    Manual,
    Auto,
    Budgeted,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ApprovalTimeoutAction {
    #[default]
    Reject,
    Suspend,
}

/// The first budget-pause cap of `Budgeted` mode when the policy does not say (ml-intern's).
pub const DEFAULT_AUTO_APPROVE_USD: f64 = 5.0;
/// Tool name of the synthetic request a budget pause waits on.
pub const BUDGET_REQUEST_TOOL: &str = "budget";

/// How long a request waits for a decision when the policy does not say.
pub const DEFAULT_APPROVAL_TIMEOUT_SECS: u32 = 86_400;
/// Most decided requests kept in `status.approvalHistory`.
pub const APPROVAL_HISTORY_MAX: usize = 50;

/// A tool call waiting for a human, as the session's status shows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingApproval {
    /// The id an AgentApproval names in `spec.requestId`.
    pub id: String,
    /// The model's id for the call.
    pub tool_call_id: String,
    /// The tool the model called.
    pub tool: String,
    /// What the call would do, in a line.
    pub summary: String,
    /// The call's arguments as JSON, secrets removed and cut at 4 KiB.
    pub arguments: String,
    /// Hex sha256 of the canonical JSON of the full arguments (keys sorted, no spaces),
    /// which an AgentApproval quotes in `spec.argumentsDigest`.
    pub arguments_digest: String,
    /// Estimated cost in USD, when the call has a price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost_usd: Option<String>,
    pub requested_at: Time,
    /// After this the policy's `onTimeout` applies.
    pub expires_at: Time,
}

/// Most jobs kept in `status.jobs`, and metrics per job.
pub const JOBS_MAX: usize = 20;
pub const JOB_METRICS_MAX: usize = 20;

/// A job the agent started, followed by the controller until it ends.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    /// Where it runs: `cluster` (a Kubernetes Job in the session's namespace) or
    /// `huggingface` (Hugging Face Jobs).
    pub backend: String,
    /// The Job's name, or the HF job id.
    pub id: String,
    /// The job's page (HF Jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The HF namespace it runs under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Started with `detach: true`: not stopped when the session is suspended, fails or is
    /// deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detach: bool,
    /// The flavor's price per hour, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_hour: Option<String>,
    /// Cost so far: the price times the time it has been running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost_usd: Option<String>,
    /// The hardware preset.
    pub flavor: String,
    /// `Pending`, `Running`, `Succeeded`, `Failed`, `DeadlineExceeded` or `Cancelled`.
    pub state: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When it started and finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// The latest value of each metric the job printed as `{"metric": …, "value": …}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<JobMetric>,
}

/// One metric of a job.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobMetric {
    /// Its name, e.g. `loss`.
    pub name: String,
    /// Its latest value, as printed.
    pub value: String,
    /// The step it was printed at, when the line said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i64>,
}

/// Most schedules kept in `status.schedules`.
pub const SCHEDULES_MAX: usize = 20;

/// A scheduled (cron) job the agent created; it goes with the session unless created with
/// `detach: true`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleStatus {
    /// Where its runs go: `huggingface`.
    pub backend: String,
    /// The scheduled job's id.
    pub id: String,
    /// The HF namespace it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Cron expression or `@hourly`, `@daily`, `@weekly`, `@monthly`.
    pub schedule: String,
    /// Not starting runs: suspended by the agent, or by the controller when the session was
    /// suspended or stopped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
    /// Created with `detach: true`: left alone when the session stops or is deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detach: bool,
    /// The next run (RFC 3339), as the platform last said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run_at: Option<String>,
}

/// A decided request, kept in `status.approvalHistory`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRecord {
    /// The request's id.
    pub id: String,
    /// The tool the model called.
    pub tool: String,
    /// `Approved`, `Rejected` or `TimedOut`.
    pub outcome: String,
    /// The AgentApproval that decided it (none for a timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
    /// Who decided, when the admission webhook recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// The approver edited the arguments.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub edited: bool,
    pub decided_at: Time,
}

/// Limits on what a session may spend on model calls.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetSpec {
    /// Most prompt plus completion tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_tokens: Option<u64>,
    /// Most estimated cost in USD, as a decimal string such as "5" or "12.50", priced with
    /// the controller's model config. A model without a price there cannot be held to it:
    /// the session is then refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?$"))]
    pub max_cost_usd: Option<String>,
}

fn default_max_iterations() -> u32 {
    300
}

fn default_true() -> bool {
    true
}

/// The wire protocol of the model endpoint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LlmApi {
    /// OpenAI chat completions.
    #[default]
    Openai,
    /// Anthropic Messages.
    Anthropic,
}

/// How to reach the model: its wire protocol, endpoint and key.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlmSpec {
    /// Wire protocol: `openai` (chat completions; OpenAI, the Hugging Face router, vLLM,
    /// TGI, Ollama, llama.cpp) or `anthropic` (the Messages API). Default `openai`.
    /// Setting this, `baseUrl` or `apiKeySecretRef` means the session brings its own
    /// endpoint; otherwise the controller's configured endpoint for the model (and its
    /// key) is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<LlmApi>,

    /// Stream responses (server-sent events). Default true.
    #[serde(default = "default_true")]
    pub stream: bool,

    /// Base URL of the endpoint. For `openai`, up to and including the version segment
    /// (`http://vllm.models.svc:8000/v1`; `/chat/completions` is appended); for
    /// `anthropic`, the root (`https://api.anthropic.com`; `/v1/messages` is appended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub base_url: Option<String>,

    /// Secret in the session's namespace holding the API key, sent as
    /// `Authorization: Bearer <key>`. Without it no key is sent. The key is read by the
    /// controller only; it never enters the sandbox, the status or the events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,

    /// Upper bound on tokens the model may generate per call (`max_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_tokens: Option<u32>,

    /// Sampling temperature; the endpoint's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
}

/// A key of a Secret in the session's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key within the Secret's data.
    #[serde(default = "default_api_key_key")]
    #[schemars(length(min = 1))]
    pub key: String,
}

fn default_api_key_key() -> String {
    "api-key".to_string()
}

/// The sandbox pod: created on the agent's first tool call, owned by the session, deleted
/// when the session ends.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    /// Container image; the controller's `--sandbox-image` when unset. It needs `/bin/sh`
    /// and must run as a non-root user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Image pull policy (`Always`, `IfNotPresent` or `Never`); Kubernetes' default when
    /// unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^(Always|IfNotPresent|Never)$"))]
    pub image_pull_policy: Option<String>,

    /// CPU, memory and accelerator requests and limits of the sandbox container; the
    /// controller's defaults when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Environment variables of the sandbox container, e.g. `HF_TOKEN` from a Secret you
    /// name (`valueFrom.secretKeyRef`). The model API key is never put in the sandbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Variables from whole Secrets or ConfigMaps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,

    /// Nodes the sandbox may run on, e.g. a GPU node pool.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Taints the sandbox tolerates, e.g. `nvidia.com/gpu` on GPU nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// RuntimeClass of the pod, e.g. `gvisor` or `kata` for a stronger boundary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub runtime_class_name: Option<String>,

    /// ServiceAccount whose token the sandbox gets. Unset: none, and no token is mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub service_account_name: Option<String>,

    /// What backs /workspace: an emptyDir (the default; lost with the pod) or an
    /// existing PersistentVolumeClaim (kept when the pod is lost or the session ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceSpec>,

    /// A hardware preset from the controller's config (e.g. `cpu-upgrade`, `gpu-small`):
    /// its resources replace `resources`, its nodeSelector and tolerations are added. The
    /// agent may switch presets with the `sandbox_create` tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub hardware: Option<String>,

    /// Start the sandbox when the session starts instead of at the first tool call.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub eager: bool,

    /// Seconds the sandbox pod is kept after a turn ends (Succeeded or Failed), for
    /// debugging or a quick follow-up message; 0 (default) deletes it at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 604800))]
    pub keep_after_completion_seconds: Option<u32>,

    /// Seconds a suspended session keeps its sandbox pod (default 3600); the workspace
    /// goes with it unless it is a PersistentVolumeClaim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 604800))]
    pub idle_timeout_seconds: Option<u32>,
}

/// The sandbox's /workspace volume.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceSpec {
    /// An existing PersistentVolumeClaim in the session's namespace (ReadWriteOnce is
    /// enough). Unset: an emptyDir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub claim_name: Option<String>,

    /// Size limit of the emptyDir, e.g. `20Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
}

/// Where a session is in its lifecycle.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SessionPhase {
    /// Accepted but not running yet: waiting for a Secret or for a free session slot.
    Pending,
    /// The agent loop is running.
    Running,
    /// Work is stopped by `spec.suspend`, or a request for approval timed out under
    /// `onTimeout: Suspend`.
    Suspended,
    /// Tool calls wait for a human decision (`status.pendingApprovals`).
    WaitingForApproval,
    /// The model answered the latest message; a new entry in `spec.messages` starts
    /// another turn.
    Succeeded,
    /// The latest turn ended without an answer; `message` and the `Failed` condition say
    /// why. A new entry in `spec.messages` starts another turn.
    Failed,
}

impl SessionPhase {
    /// No turn is running or waiting to run unless the spec changes.
    pub fn is_terminal(self) -> bool {
        matches!(self, SessionPhase::Succeeded | SessionPhase::Failed)
    }
}

/// What the controller observed of the session.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSessionStatus {
    /// Pending, Running, Suspended, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SessionPhase>,

    /// Detailed state: `Accepted`, `SandboxReady`, `Running`, `Complete` and `Failed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Model calls made so far.
    #[serde(default)]
    pub iterations: u32,

    /// Tool calls the model made so far.
    #[serde(default)]
    pub tool_calls: u32,

    /// The agent's plan as it last set it with `plan_tool` (at most 50 items).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plan: Vec<PlanEntry>,

    /// How many entries of `spec.messages` the agent has taken so far.
    #[serde(default)]
    pub processed_messages: u32,

    /// Where the full conversation and event log are stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transcript: Option<TranscriptStatus>,

    /// The model's answer to the latest message, cut to 16 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_response: Option<String>,

    /// The sandbox pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxStatus>,

    /// Tool calls waiting for a decision: create an AgentApproval naming `id` and
    /// `argumentsDigest` to decide one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_approvals: Vec<PendingApproval>,

    /// Jobs the agent started with `cluster_jobs` and `hf_jobs`, followed by the controller
    /// until they end (the latest 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobStatus>,

    /// Scheduled jobs the agent created (`hf_jobs` `scheduled run`); those not created with
    /// `detach: true` are suspended when the session is suspended or stopped and deleted
    /// with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<ScheduleStatus>,

    /// Estimated cost of the session's jobs so far (USD), finished ones included; it counts
    /// towards `spec.budget.maxCostUsd` and the `Budgeted` cap with the model's cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs_cost_usd: Option<String>,

    /// Cost of jobs no longer listed in `jobs` (part of `jobsCostUsd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earlier_jobs_cost_usd: Option<String>,

    /// `Budgeted` mode: the spending (USD) at which the loop pauses next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_approval_cap_usd: Option<String>,

    /// The latest decided requests, newest last (at most 50).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approval_history: Vec<ApprovalRecord>,

    /// Context window use and compactions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<ContextStatus>,

    /// Tokens reported by the model endpoint, summed over the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TokenUsage>,

    /// When the agent loop started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,

    /// When the session reached Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,

    /// A human-readable summary of the current state; on failure, what to fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One item of the agent's plan.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanEntry {
    /// The agent's id for the item.
    pub id: String,
    /// What the item is about (cut to 300 characters).
    pub content: String,
    /// `pending`, `in_progress` or `completed`.
    pub status: String,
}

/// Most plan items mirrored into status.
pub const PLAN_MAX_ITEMS: usize = 50;

/// The session's transcript: gzip-compressed JSON-lines records in ConfigMaps owned by the
/// session (`ml-intern transcript <session>` prints it).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TranscriptStatus {
    /// Label selector of the ConfigMaps holding it.
    pub config_map_selector: String,
    /// ConfigMaps used.
    pub chunks: u32,
    /// Records stored: messages, turn boundaries and events.
    pub records: u64,
    /// Compressed size in bytes.
    pub bytes: u64,
}

/// The session's sandbox pod.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    /// Name of the pod in the session's namespace.
    pub pod_name: String,
    /// When the idle pod will be deleted (`keepAfterCompletionSeconds` after a turn ended,
    /// `idleTimeoutSeconds` after a suspend); unset while it is in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_after: Option<Time>,
}

/// How long a suspended session keeps its sandbox pod when the spec does not say.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u32 = 3600;

/// Token counts as the model endpoint reported them, and their estimated cost.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenUsage {
    /// Prompt (input) tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    #[serde(default)]
    pub cached_tokens: u64,
    /// Estimated cost in USD from the controller's price table; absent when the model has
    /// no price there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost_usd: Option<String>,
}

/// How full the model's context is.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContextStatus {
    /// The model's context window in tokens (from the controller's model config).
    pub window: u64,
    /// Prompt tokens of the latest model call.
    pub tokens: u64,
    /// Times the conversation was compacted.
    pub compactions: u32,
    /// When it was last compacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_compacted_at: Option<Time>,
}
