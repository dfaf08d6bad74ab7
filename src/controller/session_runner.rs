//! One session's runner: it reads the transcript, then takes the user inputs of the spec
//! one turn at a time (resuming a turn that was interrupted), mirrors progress into status,
//! Events and the transcript, and stops when there is nothing left to do, when the session
//! is suspended, or when it is deleted.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::approvals::{PolicyGate, for_session, mark_approval, pending_entries, standing};
use super::context::{Context, SessionEntry};
use super::credentials::ModelAccess;
use super::job_follower::{self, JobBackends};
use super::status::{StatusWriter, condition};
use crate::agent::approval::{self, Decision, PendingCall};
use crate::agent::budget::{Budget, JobsSpend, Spend};
use crate::agent::guards;
use crate::agent::prompt::system_prompt;
use crate::agent::{AgentEvent, ChatMessage, Turn, TurnConfig, TurnFailure, TurnOutcome};
use crate::api::session::{
    APPROVAL_HISTORY_MAX, ApprovalMode, ApprovalRecord, BUDGET_REQUEST_TOOL,
    DEFAULT_AUTO_APPROVE_USD, DEFAULT_IDLE_TIMEOUT_SECS, FINAL_RESPONSE_MAX_BYTES, PLAN_MAX_ITEMS,
};
use crate::api::{AgentApproval, ApprovalPhase};
use crate::api::{
    AgentSession, AgentSessionSpec, ContextStatus, PlanEntry, SandboxStatus, SessionPhase,
    TokenUsage, TranscriptStatus,
};
use crate::llm::catalog::Price;
use crate::llm::{ChatModel, ModelSettings, client_for};
use crate::redact::Redactor;
use crate::runtime::cluster_job::stop_attached_jobs;
use crate::runtime::hardware::PodHardware;
use crate::runtime::sandbox_template::{sandbox_network_policy, sandbox_pod};
use crate::runtime::{SandboxEvent, SandboxPod, SandboxSettings, sandbox_pod_name};
use crate::store::{Record, TranscriptStore, digest, replay};
use crate::text::{truncate_bytes, truncate_chars};
use crate::tools::bash::BASH_TOOL;
use crate::tools::files::{EDIT_TOOL, READ_TOOL, WRITE_TOOL};
use crate::tools::jobs::{CLUSTER_JOBS_TOOL, HF_JOBS_TOOL, JobObservation, JobsTool, LogLine};
use crate::tools::plan::PLAN_TOOL;
use crate::tools::sandbox_create::{SANDBOX_CREATE_TOOL, SandboxCreateTool, chosen_hardware};
use crate::tools::{BashTool, Files, PlanTool, ToolFailure, ToolRouter};

/// Every tool a session can have (`spec.tools` picks among them).
const ALL_TOOLS: [&str; 8] = [
    BASH_TOOL,
    READ_TOOL,
    WRITE_TOOL,
    EDIT_TOOL,
    PLAN_TOOL,
    SANDBOX_CREATE_TOOL,
    CLUSTER_JOBS_TOOL,
    HF_JOBS_TOOL,
];

/// Runs the session until it has nothing left to do, then marks it finished in the context.
pub async fn run_session(
    ctx: Arc<Context>,
    access: ModelAccess,
    hf_token: Option<String>,
    cancel: CancellationToken,
    spec: watch::Receiver<Arc<AgentSession>>,
) {
    let session = spec.borrow().clone();
    let name = session.name_any();
    let mut run = SessionRun::new(ctx, &session, access, hf_token, spec);
    run.execute(&cancel).await;
    tracing::info!(session = %name, "session runner stopped");
}

/// The user input at `index`: 0 is the prompt, i is `spec.messages[i-1]`.
fn input_text(spec: &AgentSessionSpec, index: usize) -> Option<&str> {
    match index {
        0 => Some(spec.prompt.as_str()),
        i => spec.messages.get(i - 1).map(String::as_str),
    }
}

fn input_field(index: usize) -> String {
    match index {
        0 => "spec.prompt".to_string(),
        i => format!("spec.messages[{}]", i - 1),
    }
}

/// Why the spec no longer matches the inputs already sent, if it does not.
pub fn rewritten_input(spec: &AgentSessionSpec, sent: &[String]) -> Option<String> {
    for (i, sent_digest) in sent.iter().enumerate() {
        let field = input_field(i);
        match input_text(spec, i) {
            None => {
                return Some(format!(
                    "{field} was removed after it was sent to the agent; messages are \
                     append-only: restore it, or create a new session for a new conversation"
                ));
            }
            Some(text) if digest(text) != *sent_digest => {
                return Some(format!(
                    "{field} was changed after it was sent to the agent; the conversation \
                     cannot be rewritten: restore it and append a new entry to spec.messages \
                     instead, or create a new session"
                ));
            }
            Some(_) => {}
        }
    }
    None
}

struct SessionRun {
    ctx: Arc<Context>,
    session: Arc<AgentSession>,
    spec_rx: watch::Receiver<Arc<AgentSession>>,
    object: k8s_openapi::api::core::v1::ObjectReference,
    pods: Api<Pod>,
    configmaps: Api<ConfigMap>,
    status: StatusWriter,
    /// Status changed since it was last written.
    status_dirty: bool,
    /// Endpoint and key, decided together when the runner started.
    access: ModelAccess,
    redactor: Redactor,
    permit: Option<OwnedSemaphorePermit>,
    /// The current model's price, and what the session spent so far.
    price: Option<Price>,
    spend: Spend,
    /// A budget pause was rejected: the open turn ends with this.
    budget_refused: Option<String>,
    /// Where the session's jobs run (Hugging Face only with a token).
    jobs: JobBackends,
    /// The jobs' cost so far, which the turn counts against the budget.
    jobs_spend: Arc<JobsSpend>,
    /// A look at the unfinished jobs is under way.
    following: bool,
    /// Per job, the time up to which its output went into the transcript as tool_log
    /// events.
    shown_logs: HashMap<String, String>,
    /// Jobs to look at even when finished: ones this runner saw unfinished or a tool
    /// reported, so each gets a look after it ends, for the output it printed last.
    watching: HashSet<String>,
}

/// The conversation as the runner keeps it between turns.
struct Conversation {
    store: TranscriptStore,
    history: Vec<ChatMessage>,
    input_digests: Vec<String>,
    turn_open: bool,
}

enum TurnEnd {
    /// The turn ended; the next input, if any, may start.
    Done,
    /// Stopped by spec.suspend; the turn stays open.
    Suspended,
    /// The session is being deleted.
    Deleted,
    /// Calls wait for approval; the turn stays open and the runner may retire.
    Parked,
}

impl SessionRun {
    fn new(
        ctx: Arc<Context>,
        session: &Arc<AgentSession>,
        access: ModelAccess,
        hf_token: Option<String>,
        spec_rx: watch::Receiver<Arc<AgentSession>>,
    ) -> Self {
        let namespace = session.namespace().unwrap_or_default();
        let api = Api::namespaced(ctx.client.clone(), &namespace);
        let jobs = JobBackends::for_session(&ctx, session, hf_token.as_deref());
        let status = StatusWriter::new(api, session);
        let jobs_spend = Arc::new(JobsSpend::default());
        jobs_spend.set(job_follower::jobs_cost(&status.status));
        SessionRun {
            jobs,
            jobs_spend,
            following: false,
            shown_logs: HashMap::new(),
            watching: HashSet::new(),
            pods: Api::namespaced(ctx.client.clone(), &namespace),
            configmaps: Api::namespaced(ctx.client.clone(), &namespace),
            status,
            status_dirty: false,
            object: session.object_ref(&()),
            session: session.clone(),
            spec_rx,
            redactor: Redactor::new(access.api_key.clone().into_iter().chain(hf_token)),
            access,
            ctx,
            permit: None,
            price: None,
            spend: Spend::default(),
            budget_refused: None,
        }
    }

    /// Secret values never leave the controller: not in status, Events or logs.
    fn redact(&self, text: &str) -> String {
        self.redactor.redact(text).into_owned()
    }

    fn name(&self) -> String {
        self.session.name_any()
    }

    async fn execute(&mut self, cancel: &CancellationToken) {
        let endpoint = if self.access.from_config {
            "the controller's configured endpoint for the model"
        } else {
            "the endpoint in spec.llm"
        };
        self.status.set_condition(
            condition::ACCEPTED,
            true,
            "Accepted",
            &format!("the spec and the Secrets it names are usable; model calls go to {endpoint}"),
        );
        let Some(mut conversation) = self.open_transcript().await else {
            self.retire();
            return;
        };
        if self.status.status.phase.is_none() {
            self.status
                .set_phase(SessionPhase::Pending, "accepted; starting the agent loop");
            self.status.apply_or_log().await;
        }
        let mut resumed = conversation.turn_open;
        loop {
            self.session = self.spec_rx.borrow_and_update().clone();
            self.status.observe(self.session.metadata.generation);
            let spec = self.session.spec.clone();
            if let Some(problem) = rewritten_input(&spec, &conversation.input_digests) {
                self.refuse_rewrite(&problem).await;
                if self.retire_unless_changed() {
                    return;
                }
                continue;
            }
            if spec.suspend {
                self.suspend(conversation.turn_open).await;
                if self.retire_unless_changed() {
                    return;
                }
                continue;
            }
            if !conversation.turn_open {
                let index = conversation.input_digests.len();
                let Some(text) = input_text(&spec, index).map(str::to_string) else {
                    self.go_idle().await;
                    if self.retire_unless_changed() {
                        return;
                    }
                    continue;
                };
                if let Err(e) = self.take_input(&mut conversation, index, &text).await {
                    self.fail_transcript(&e.to_string()).await;
                    self.retire();
                    return;
                }
            }
            let mut decisions = HashMap::new();
            if conversation.turn_open && !self.status.status.pending_approvals.is_empty() {
                match self.check_approvals().await {
                    Some(_) if self.budget_refused.is_some() => {
                        let message = self.budget_refused.take().unwrap_or_default();
                        let stopped = TurnOutcome::Failed(TurnFailure::Tool(ToolFailure {
                            reason: "BudgetPauseRejected".into(),
                            message: format!("the budget pause was not approved: {message}"),
                        }));
                        self.end_turn(&mut conversation, stopped).await;
                        continue;
                    }
                    Some(decided) => decisions = decided,
                    None => {
                        if self.retire_unless_changed() {
                            return;
                        }
                        continue;
                    }
                }
            }
            if !self.wait_for_slot(cancel).await {
                return;
            }
            resumed = match self
                .run_turn(&mut conversation, resumed, cancel, decisions)
                .await
            {
                TurnEnd::Deleted => return,
                TurnEnd::Suspended => true,
                TurnEnd::Done => false,
                TurnEnd::Parked => {
                    if self.retire_unless_changed() {
                        return;
                    }
                    true
                }
            };
        }
    }

    async fn open_transcript(&mut self) -> Option<Conversation> {
        let uid = self.session.uid().unwrap_or_default();
        let Some(owner) = self.session.controller_owner_ref(&()) else {
            self.fail_transcript("the session has no uid to own its transcript")
                .await;
            return None;
        };
        match TranscriptStore::open(
            self.configmaps.clone(),
            &self.name(),
            &uid,
            owner,
            self.redactor.clone(),
        )
        .await
        {
            Ok((store, records)) => {
                let replayed = replay(&records);
                Some(Conversation {
                    store,
                    history: replayed.history,
                    input_digests: replayed.input_digests,
                    turn_open: replayed.turn_open,
                })
            }
            Err(e) => {
                self.fail_transcript(&e.to_string()).await;
                None
            }
        }
    }

    /// Records the input and the user message it becomes before the turn starts.
    async fn take_input(
        &mut self,
        conversation: &mut Conversation,
        index: usize,
        text: &str,
    ) -> Result<(), crate::store::StoreError> {
        let text_digest = digest(text);
        let mut records = vec![Record::Input {
            index,
            digest: text_digest.clone(),
            at: Timestamp::now().to_string(),
        }];
        let mut messages = vec![];
        if conversation.history.is_empty() {
            let today = Timestamp::now().strftime("%Y-%m-%d").to_string();
            let tools: Vec<String> = ALL_TOOLS
                .iter()
                .map(|t| t.to_string())
                .filter(|t| {
                    self.session.spec.tools.is_empty() || self.session.spec.tools.contains(t)
                })
                .collect();
            messages.push(ChatMessage::system(system_prompt(&tools, &today)));
        }
        messages.push(ChatMessage::user(text));
        records.extend(
            messages
                .iter()
                .map(|m| Record::Message { message: m.clone() }),
        );
        conversation.store.write(&records).await?;
        conversation.history.extend(messages);
        conversation.input_digests.push(text_digest);
        conversation.turn_open = true;
        self.status.status.processed_messages = index as u32;
        let field = input_field(index);
        self.status.set_phase(
            SessionPhase::Running,
            format!("the agent is working on {field}"),
        );
        Ok(())
    }

    /// Waits for one of the controller's session slots, once per runner.
    async fn wait_for_slot(&mut self, cancel: &CancellationToken) -> bool {
        if self.permit.is_some() {
            return true;
        }
        let permit = match self.ctx.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let msg = format!(
                    "waiting for a free session slot: {} sessions already run (controller flag --max-concurrent-sessions)",
                    self.ctx.config.max_concurrent_sessions
                );
                self.status.set_phase(SessionPhase::Pending, &msg);
                self.status
                    .set_condition(condition::RUNNING, false, "WaitingForCapacity", &msg);
                self.status.apply_or_log().await;
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    p = self.ctx.slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return false,
                    },
                }
            }
        };
        self.ctx.metrics.sessions_running.inc();
        self.ctx.metrics.sessions_started.inc();
        self.permit = Some(permit);
        true
    }

    fn release_slot(&mut self) {
        if self.permit.take().is_some() {
            self.ctx.metrics.sessions_running.dec();
        }
    }

    /// The session's model, or the controller's default.
    fn model_id(&self) -> Option<String> {
        self.session
            .spec
            .model
            .clone()
            .or_else(|| self.ctx.config.models.default_model.clone())
    }

    fn model(&self, model: &str) -> Box<dyn ChatModel> {
        let spec = &self.session.spec;
        client_for(ModelSettings {
            api: self.access.api(),
            model,
            base_url: self.access.base_url.as_deref(),
            api_key: self.access.api_key.clone(),
            timeout: self.ctx.config.llm_timeout,
            stream: spec.llm.stream,
            max_tokens: spec.llm.max_tokens,
            temperature: spec.llm.temperature,
        })
    }

    /// The session's sandbox on `hardware` (a preset name), and the handle `sandbox_create`
    /// switches presets with. None when the session is going away.
    fn sandbox(
        &self,
        lifecycle: mpsc::Sender<SandboxEvent>,
        hardware: Option<&str>,
    ) -> Option<(Arc<SandboxPod>, Arc<PodHardware>)> {
        let spec = &self.session.spec;
        let owner = self.session.controller_owner_ref(&())?;
        let base =
            SandboxSettings::from_spec(&spec.sandbox, &self.ctx.config.default_sandbox_image);
        let presets = self.ctx.config.sandbox_hardware.clone();
        let settings = match hardware.and_then(|h| presets.get(h)) {
            Some(preset) => base.clone().with_preset(preset),
            None => base.clone(),
        };
        let namespace = self.session.namespace().unwrap_or_default();
        let policy = sandbox_network_policy(
            &self.name(),
            &namespace,
            owner.clone(),
            &self.ctx.config.sandbox_egress,
        );
        let (name, ns) = (self.name(), namespace.clone());
        let template = move |s: &SandboxSettings| sandbox_pod(&name, &ns, owner.clone(), s);
        let pod = Arc::new(
            SandboxPod::new(
                self.pods.clone(),
                template(&settings),
                self.ctx.config.sandbox_startup_timeout,
                lifecycle,
            )
            .with_network_policy(Api::namespaced(self.ctx.client.clone(), &namespace), policy),
        );
        let switch = Arc::new(PodHardware {
            pod: pod.clone(),
            presets,
            base,
            template: Box::new(template),
            current: std::sync::Mutex::new(hardware.map(str::to_string)),
        });
        Some((pod, switch))
    }

    /// The preset the sandbox runs on: the agent's last switch, else the spec's, else the
    /// controller's default. Err names a preset that is not configured.
    fn hardware(&self, history: &[ChatMessage]) -> Result<Option<String>, String> {
        let presets = &self.ctx.config.sandbox_hardware;
        let chosen = chosen_hardware(history)
            .or_else(|| self.session.spec.sandbox.hardware.clone())
            .or_else(|| presets.default.clone());
        match chosen {
            Some(name) if presets.get(&name).is_none() => Err(format!(
                "spec.sandbox.hardware {name:?} is not a preset of this controller; choose one of: {}",
                presets.names().join(", ")
            )),
            other => Ok(other),
        }
    }

    /// Runs (or resumes) the open turn and records how it ended.
    async fn run_turn(
        &mut self,
        conversation: &mut Conversation,
        resumed: bool,
        cancel: &CancellationToken,
        decisions: HashMap<String, Decision>,
    ) -> TurnEnd {
        let name = self.name();
        if resumed {
            let waiting: Vec<String> = decisions.keys().cloned().collect();
            self.resume_interrupted(conversation, &waiting).await;
        }
        if self.status.status.started_at.is_none() {
            self.status.status.started_at = Some(Time(Timestamp::now()));
        }
        if self.status.status.phase != Some(SessionPhase::Running) {
            self.status
                .set_phase(SessionPhase::Running, "the agent is working on the task");
        }
        self.status.set_condition(
            condition::RUNNING,
            true,
            "AgentLoopRunning",
            "the agent loop is running",
        );
        self.status.set_condition(
            condition::COMPLETE,
            false,
            "TurnRunning",
            "a turn is running",
        );
        self.status
            .set_condition(condition::FAILED, false, "TurnRunning", "a turn is running");
        self.status_dirty = true;
        self.flush_status(&conversation.store).await;
        let config = match self.turn_config() {
            Ok(c) => c,
            Err((reason, message)) => {
                let refused = TurnOutcome::Failed(TurnFailure::Tool(ToolFailure {
                    reason: reason.into(),
                    message,
                }));
                self.end_turn(conversation, refused).await;
                return TurnEnd::Done;
            }
        };
        let model_id = self.model_id().unwrap_or_default();
        let verb = if resumed { "resumed" } else { "started" };
        self.ctx
            .publish(
                &self.object,
                EventType::Normal,
                "TurnStarted",
                format!(
                    "turn {verb} on {} with model {}",
                    input_field(conversation.input_digests.len().saturating_sub(1)),
                    model_id
                ),
            )
            .await;

        let model = self.model(&model_id);
        let (sandbox_tx, mut sandbox_rx) = mpsc::channel(8);
        let (jobs_tx, mut jobs_rx) = mpsc::channel(32);
        let hardware = match self.hardware(&conversation.history) {
            Ok(h) => h,
            Err(message) => {
                let refused = TurnOutcome::Failed(TurnFailure::Tool(ToolFailure {
                    reason: "UnknownHardware".into(),
                    message,
                }));
                self.end_turn(conversation, refused).await;
                return TurnEnd::Done;
            }
        };
        let Some((sandbox, hardware_switch)) = self.sandbox(sandbox_tx, hardware.as_deref()) else {
            return TurnEnd::Deleted;
        };
        if self.session.spec.sandbox.eager {
            let sandbox = sandbox.clone();
            tokio::spawn(async move { sandbox.start().await });
        }
        let mut tools = ToolRouter::new();
        tools.register(Arc::new(
            BashTool::new(sandbox.clone()).spilling_to(sandbox.clone()),
        ));
        tools.register(Arc::new(PlanTool));
        if !self.ctx.config.sandbox_hardware.presets.is_empty() {
            tools.register(Arc::new(SandboxCreateTool(hardware_switch)));
        }
        // Flavors (and prices) are looked up once per turn, for the tools and the gate.
        let mut job_flavors = HashMap::new();
        for (name, backend) in [
            (CLUSTER_JOBS_TOOL, self.jobs.cluster.clone()),
            (HF_JOBS_TOOL, self.jobs.huggingface.clone()),
        ] {
            let Some(backend) = backend else { continue };
            match backend.flavors().await {
                Ok(flavors) => {
                    job_flavors.insert(name, (backend.default_flavor(), flavors));
                }
                Err(e) => {
                    tracing::warn!(session = %name, error = %e, "no flavor list; job costs unknown")
                }
            }
            tools.register(Arc::new(JobsTool {
                name,
                backend,
                files: Some(sandbox.clone()),
                observed: Some(jobs_tx.clone()),
            }));
        }
        let mut history = std::mem::take(&mut conversation.history);
        let files = Files::new(sandbox.clone());
        // What the model read in earlier turns (or before a restart) counts as read.
        files.remember_from(&history);
        for tool in files.tools() {
            tools.register(tool);
        }
        if !self.session.spec.tools.is_empty() {
            tools.retain(&self.session.spec.tools);
        }
        let (events_tx, mut events_rx) = mpsc::channel(256);
        let turn_cancel = cancel.child_token();
        let gate = PolicyGate {
            policy: self.session.spec.approval_policy.clone(),
            presets: self.ctx.config.sandbox_hardware.clone(),
            decisions,
            job_flavors,
            auto_approve_cap_usd: Some(self.auto_approval_cap()),
        };
        // A look still under way from an earlier turn reports to that turn's closed channel.
        self.following = false;
        let mut follow_tick = tokio::time::interval(self.ctx.config.job_follow_interval);
        follow_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome = {
            let turn = Turn {
                model: model.as_ref(),
                tools: &tools,
                journal: &conversation.store,
                events: &events_tx,
                config: &config,
                gate: &gate,
            };
            let running = turn.run(&mut history, &turn_cancel);
            tokio::pin!(running);
            let mut spec_rx = self.spec_rx.clone();
            loop {
                tokio::select! {
                    biased;
                    Some(event) = events_rx.recv() => {
                        // Events emitted together (a model response and the tool calls it
                        // asks for) become one status write.
                        self.on_agent_event(event, &conversation.store).await;
                        while let Ok(event) = events_rx.try_recv() {
                            self.on_agent_event(event, &conversation.store).await;
                        }
                        self.flush_status(&conversation.store).await;
                    }
                    Some(event) = sandbox_rx.recv() => self.on_sandbox_event(event).await,
                    Some(seen) = jobs_rx.recv() => {
                        self.on_job_observation(seen, &conversation.store).await;
                        while let Ok(seen) = jobs_rx.try_recv() {
                            self.on_job_observation(seen, &conversation.store).await;
                        }
                        self.flush_status(&conversation.store).await;
                    }
                    _ = follow_tick.tick() => self.look_at_jobs(&jobs_tx),
                    Ok(()) = spec_rx.changed() => {
                        if spec_rx.borrow_and_update().spec.suspend {
                            turn_cancel.cancel();
                        }
                    }
                    outcome = &mut running => break outcome,
                }
            }
        };
        while let Ok(event) = events_rx.try_recv() {
            self.on_agent_event(event, &conversation.store).await;
        }
        while let Ok(seen) = jobs_rx.try_recv() {
            self.on_job_observation(seen, &conversation.store).await;
        }
        while let Ok(event) = sandbox_rx.try_recv() {
            self.on_sandbox_event(event).await;
        }
        conversation.history = history;
        if outcome == TurnOutcome::Cancelled {
            if cancel.is_cancelled() {
                tracing::info!(session = %name, "turn stopped: the session is being deleted");
                return TurnEnd::Deleted;
            }
            conversation
                .store
                .defer(&event_record(&AgentEvent::Interrupted {
                    reason: "suspended".into(),
                }));
            if let Err(e) = conversation.store.write(&[]).await {
                tracing::warn!(session = %name, error = %e, "could not record the interruption");
            }
            // What the turn recorded before it stopped is the conversation to resume from.
            if let Some(c) = self.open_transcript().await {
                *conversation = c;
            }
            return TurnEnd::Suspended;
        }
        if let TurnOutcome::WaitingForApproval { pending } = outcome {
            self.park_for_approval(conversation, &pending).await;
            return TurnEnd::Parked;
        }
        if let TurnOutcome::BudgetPause { spent_usd, cap_usd } = outcome {
            let step = self.budget_step();
            let request = PendingCall {
                tool_call_id: format!("budget-{}", conversation.history.len()),
                tool: BUDGET_REQUEST_TOOL.into(),
                arguments: serde_json::json!({
                    "capUsd": format!("{cap_usd:.2}"),
                    "spentUsd": format!("{spent_usd:.4}"),
                    "stepUsd": format!("{step:.2}"),
                }),
                summary: format!(
                    "the session spent an estimated ${spent_usd:.4}, reaching its auto-approval cap of ${cap_usd:.2}; approve to allow ${step:.2} more"
                ),
                estimated_cost_usd: Some(step),
            };
            self.park_for_approval(conversation, &[request]).await;
            return TurnEnd::Parked;
        }
        self.end_turn(conversation, outcome).await;
        TurnEnd::Done
    }

    /// The turn waits for humans: its gated calls go into status.pendingApprovals and the
    /// runner lets go of its slot; the sandbox is kept for the idle timeout.
    async fn park_for_approval(&mut self, conversation: &Conversation, pending: &[PendingCall]) {
        self.release_slot();
        let policy = self.session.spec.approval_policy.clone();
        let entries = pending_entries(pending, conversation.history.len(), &policy, |t| {
            self.redact(t)
        });
        let name = self.name();
        for e in &entries {
            let note = format!(
                "{} waits for approval as request {}: create an AgentApproval with sessionName {name}, requestId {} and argumentsDigest {}",
                e.summary, e.id, e.id, e.arguments_digest
            );
            self.ctx
                .publish(&self.object, EventType::Normal, "ApprovalRequested", note)
                .await;
        }
        let count = entries.len();
        // Earlier requests were all settled before this turn went on.
        self.status.status.pending_approvals = entries;
        let message =
            format!("{count} tool call(s) wait for approval; see status.pendingApprovals");
        self.status
            .set_phase(SessionPhase::WaitingForApproval, &message);
        self.status.set_condition(
            condition::APPROVAL_PENDING,
            true,
            "WaitingForDecision",
            &message,
        );
        self.status
            .set_condition(condition::RUNNING, false, "WaitingForApproval", &message);
        let idle = self.session.spec.sandbox.idle_timeout_seconds;
        self.keep_sandbox_for(idle.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS));
        self.flush_status(&conversation.store).await;
        self.status.apply_or_log().await;
    }

    /// The decided requests were acted on: they leave status.pendingApprovals.
    fn approvals_done(&mut self) {
        if self.status.status.pending_approvals.is_empty() {
            return;
        }
        self.status.status.pending_approvals.clear();
        self.status.set_condition(
            condition::APPROVAL_PENDING,
            false,
            "Decided",
            "every request for approval is decided",
        );
        self.status_dirty = true;
    }

    /// Matches AgentApprovals to the pending requests. Some(decisions by tool-call id)
    /// when every request is settled (the requests then move to status.approvalHistory);
    /// None while the session must keep waiting.
    async fn check_approvals(&mut self) -> Option<HashMap<String, Decision>> {
        let namespace = self.session.namespace().unwrap_or_default();
        let api: Api<AgentApproval> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let name = self.name();
        let approvals = match for_session(&api, &name).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(session = %name, error = %e, "cannot list approvals");
                return None;
            }
        };
        let policy = self.session.spec.approval_policy.clone();
        let pending = self.status.status.pending_approvals.clone();
        let standing = standing(&pending, &approvals, &policy, Timestamp::now());
        let owner = self.session.controller_owner_ref(&());
        for r in &standing.refused {
            mark_approval(
                &api,
                &r.approval,
                owner.clone(),
                ApprovalPhase::Refused,
                r.reason,
                &r.message,
            )
            .await;
            self.ctx
                .publish(
                    &self.object,
                    EventType::Warning,
                    "ApprovalRefused",
                    format!("{}: {}", r.approval, r.message),
                )
                .await;
        }
        if !standing.ready() {
            if standing.suspend_for_timeout(&policy)
                && self.status.status.phase != Some(SessionPhase::Suspended)
            {
                let message = "a request for approval timed out; the session is suspended until it is decided (an AgentApproval still resumes it)";
                self.status.set_phase(SessionPhase::Suspended, message);
                self.status
                    .set_condition(condition::APPROVAL_PENDING, true, "TimedOut", message);
                self.status.apply_or_log().await;
                self.ctx
                    .publish(
                        &self.object,
                        EventType::Warning,
                        "ApprovalTimedOut",
                        message,
                    )
                    .await;
            } else if self.status.status.phase != Some(SessionPhase::WaitingForApproval)
                && !standing.suspend_for_timeout(&policy)
            {
                self.status.set_phase(
                    SessionPhase::WaitingForApproval,
                    "tool calls wait for approval; see status.pendingApprovals",
                );
                self.status.apply_or_log().await;
            }
            return None;
        }
        let now = Time(Timestamp::now());
        let mut decisions = HashMap::new();
        for s in standing.settled {
            // Seen before a restart that came before the calls ran: same decisions, once.
            if self
                .status
                .status
                .approval_history
                .iter()
                .any(|r| r.id == s.request.id)
            {
                if s.request.tool != BUDGET_REQUEST_TOOL {
                    decisions.insert(s.request.tool_call_id.clone(), s.decision);
                }
                continue;
            }
            let outcome = match (&s.approval, s.decision.approved) {
                (None, _) => "TimedOut",
                (Some(_), true) => "Approved",
                (Some(_), false) => "Rejected",
            };
            if let Some(a) = &s.approval {
                let who = match &s.decision.by {
                    Some(by) => format!(" by {by}"),
                    None => "; who decided is not recorded (no admission webhook)".into(),
                };
                let message = format!("{outcome} request {} of session {name}{who}", s.request.id);
                mark_approval(
                    &api,
                    a,
                    owner.clone(),
                    ApprovalPhase::Applied,
                    outcome,
                    &message,
                )
                .await;
            }
            let note = format!(
                "{} request {} ({}){}",
                outcome,
                s.request.id,
                s.request.summary,
                s.approval
                    .as_deref()
                    .map(|a| format!(" by AgentApproval {a}"))
                    .unwrap_or_default()
            );
            self.ctx
                .publish(
                    &self.object,
                    EventType::Normal,
                    "ApprovalDecided",
                    self.redact(&note),
                )
                .await;
            let history = &mut self.status.status.approval_history;
            history.push(ApprovalRecord {
                id: s.request.id.clone(),
                tool: s.request.tool.clone(),
                outcome: outcome.into(),
                approval: s.approval.clone(),
                decided_by: s.decision.by.clone(),
                edited: s.decision.edited_arguments.is_some(),
                decided_at: now.clone(),
            });
            let excess = history.len().saturating_sub(APPROVAL_HISTORY_MAX);
            history.drain(..excess);
            if s.request.tool != BUDGET_REQUEST_TOOL {
                decisions.insert(s.request.tool_call_id.clone(), s.decision);
            } else if s.decision.approved {
                let cap = self.auto_approval_cap() + self.budget_step();
                self.status.status.auto_approval_cap_usd = Some(format!("{cap:.2}"));
            } else {
                self.budget_refused = Some(approval::rejection_result(&s.decision));
            }
        }
        // The requests stay pending until the turn has acted on them (see approvals_done),
        // so a restart before that decides them again rather than losing the calls.
        self.status.apply_or_log().await;
        Some(decisions)
    }

    /// Limits of the turn: iterations, retries, the model's window and the budget left.
    fn turn_config(&mut self) -> Result<TurnConfig, (&'static str, String)> {
        if let Some(unknown) = self
            .session
            .spec
            .tools
            .iter()
            .find(|t| !ALL_TOOLS.contains(&t.as_str()))
        {
            return Err((
                "UnknownTool",
                format!(
                    "spec.tools names {unknown:?}, which is not a tool; choose among {}",
                    ALL_TOOLS.join(", ")
                ),
            ));
        }
        let Some(model) = self.model_id() else {
            return Err((
                "NoModel",
                "spec.model is unset and the controller's model config has no defaultModel".into(),
            ));
        };
        let info = self.ctx.config.models.lookup(&model);
        let limits = self.session.spec.budget.clone().unwrap_or_default();
        let max_usd = match limits.max_cost_usd.as_deref().map(str::parse::<f64>) {
            None => None,
            Some(Ok(v)) if info.price.is_some() => Some(v),
            Some(Ok(_)) => {
                return Err((
                    "BudgetUnpriced",
                    format!(
                        "spec.budget.maxCostUsd is set but model {model} has no price in the controller's model config; add one there or limit spec.budget.maxTokens instead"
                    ),
                ));
            }
            Some(Err(e)) => {
                return Err((
                    "InvalidBudget",
                    format!("spec.budget.maxCostUsd is not a number: {e}"),
                ));
            }
        };
        // Status is what survives a restart; from here on the runner keeps the running sum.
        let usage = self.status.status.usage.clone().unwrap_or_default();
        self.spend = Spend {
            tokens: usage.prompt_tokens + usage.completion_tokens,
            usd: usage
                .estimated_cost_usd
                .as_deref()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0.0),
        };
        self.price = info.price;
        let pause_at_usd = match self.session.spec.approval_policy.mode {
            ApprovalMode::Budgeted if info.price.is_none() => {
                return Err((
                    "BudgetUnpriced",
                    format!(
                        "approvalPolicy.mode Budgeted pauses on estimated spending, but model {model} has no price in the controller's model config; add one there or use mode Manual"
                    ),
                ));
            }
            ApprovalMode::Budgeted => Some(self.auto_approval_cap()),
            _ => None,
        };
        let context = self
            .status
            .status
            .context
            .get_or_insert_with(ContextStatus::default);
        context.window = info.context_window;
        Ok(TurnConfig {
            max_iterations: self.session.spec.max_iterations,
            llm_retry_delays: self.ctx.config.llm_retry_delays.clone(),
            rate_limit_delays: self.ctx.config.llm_rate_limit_delays.clone(),
            context_window: info.context_window,
            budget: Budget {
                max_tokens: limits.max_tokens,
                max_usd,
                pause_at_usd,
                price: info.price,
            },
            spent: self.spend,
            jobs_spend: self.jobs_spend.clone(),
        })
    }

    /// The spending at which a `Budgeted` session pauses next: raised by each approved
    /// pause, starting at the policy's cap.
    fn auto_approval_cap(&self) -> f64 {
        let policy = &self.session.spec.approval_policy;
        self.status
            .status
            .auto_approval_cap_usd
            .as_deref()
            .or(policy.auto_approve_up_to_usd.as_deref())
            .and_then(|c| c.parse().ok())
            .unwrap_or(DEFAULT_AUTO_APPROVE_USD)
    }

    fn budget_step(&self) -> f64 {
        let policy = &self.session.spec.approval_policy;
        policy
            .budget_step_usd
            .as_deref()
            .or(policy.auto_approve_up_to_usd.as_deref())
            .and_then(|c| c.parse().ok())
            .unwrap_or(DEFAULT_AUTO_APPROVE_USD)
    }

    /// A turn that was stopped mid-way (suspend, controller restart) goes on: whatever its
    /// tool calls left running is killed, and calls without a result are answered as
    /// interrupted.
    async fn resume_interrupted(&mut self, conversation: &mut Conversation, decided: &[String]) {
        let name = self.name();
        let pod = sandbox_pod_name(&name);
        let mut repaired = conversation.history.clone();
        if guards::answer_dangling_calls_except(&mut repaired, guards::INTERRUPTED, decided) == 0 {
            return;
        }
        match SandboxPod::kill_processes(&self.pods, &pod).await {
            Ok(true) => {
                tracing::info!(session = %name, %pod, "killed the processes of interrupted tool calls")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(session = %name, error = %e, "could not kill leftover sandbox processes")
            }
        }
        let record = Record::Replace {
            history: repaired.clone(),
        };
        match conversation.store.write(&[record]).await {
            Ok(()) => conversation.history = repaired,
            Err(e) => {
                tracing::warn!(session = %name, error = %e, "could not record interrupted calls")
            }
        }
        self.ctx
            .publish(
                &self.object,
                EventType::Normal,
                "TurnResumed",
                "resuming an interrupted turn; tool calls that were running are reported to the model as interrupted",
            )
            .await;
    }

    async fn on_agent_event(&mut self, event: AgentEvent, store: &TranscriptStore) {
        if matches!(event, AgentEvent::AssistantChunk { .. }) {
            // The whole text follows in AssistantMessage; pieces are for live listeners.
            return;
        }
        store.defer(&event_record(&event));
        let ctx = self.ctx.clone();
        let metrics = &ctx.metrics;
        match event {
            AgentEvent::LlmCall {
                usage, compaction, ..
            } => {
                // A model call means the turn went past its decided calls.
                self.approvals_done();
                metrics.llm_calls.inc();
                metrics.llm_prompt_tokens.inc_by(usage.prompt_tokens);
                metrics
                    .llm_completion_tokens
                    .inc_by(usage.completion_tokens);
                self.spend.add(&usage, self.price.as_ref());
                let s = &mut self.status.status;
                if !compaction {
                    s.iterations += 1;
                    if let Some(c) = s.context.as_mut() {
                        c.tokens = usage.prompt_tokens;
                    }
                }
                let total = s.usage.get_or_insert_with(TokenUsage::default);
                total.prompt_tokens += usage.prompt_tokens;
                total.completion_tokens += usage.completion_tokens;
                total.cached_tokens += usage.cached_tokens;
                if self.price.is_some() {
                    total.estimated_cost_usd = Some(format!("{:.6}", self.spend.usd));
                }
                self.status_dirty = true;
            }
            AgentEvent::Compacted {
                old_tokens,
                new_tokens,
            } => {
                let c = self
                    .status
                    .status
                    .context
                    .get_or_insert_with(ContextStatus::default);
                c.compactions += 1;
                c.last_compacted_at = Some(Time(Timestamp::now()));
                self.status_dirty = true;
                let note = format!(
                    "the conversation was compacted from about {old_tokens} to {new_tokens} tokens to fit the model's context window"
                );
                tracing::info!(session = %self.name(), %note);
                self.ctx
                    .publish(&self.object, EventType::Normal, "Compacted", note)
                    .await;
            }
            AgentEvent::ToolCall {
                tool, arguments, ..
            } => {
                metrics.tool_calls_inc(&tool);
                self.status.status.tool_calls += 1;
                self.status_dirty = true;
                let detail = match arguments.get("command").and_then(|c| c.as_str()) {
                    Some(command) => command.to_string(),
                    None => arguments.to_string(),
                };
                let note = self.redact(&format!("{tool}: {}", truncate_chars(&detail, 300)));
                tracing::debug!(session = %self.name(), %note, "tool called");
                self.ctx
                    .publish(&self.object, EventType::Normal, "ToolCalled", note)
                    .await;
            }
            AgentEvent::ToolLog { tool, log } => {
                let log = self.redact(&log);
                tracing::info!(session = %self.name(), %tool, %log);
            }
            AgentEvent::LlmRetry {
                message,
                delay_secs,
                rate_limited,
            } => {
                let reason = if rate_limited {
                    "RateLimited"
                } else {
                    "LLMRetrying"
                };
                let note = self.redact(&format!("{message}; retrying in {delay_secs}s"));
                tracing::info!(session = %self.name(), %note, "model call retried");
                self.ctx
                    .publish(&self.object, EventType::Warning, reason, note)
                    .await;
            }
            AgentEvent::ToolOutput {
                tool,
                success,
                output,
                ..
            } => {
                let output = self.redact(&truncate_chars(&output, 500));
                tracing::debug!(session = %self.name(), %tool, success, %output, "tool finished");
            }
            AgentEvent::PlanUpdate { plan } => {
                self.status.status.plan = plan
                    .iter()
                    .take(PLAN_MAX_ITEMS)
                    .map(|item| PlanEntry {
                        id: truncate_chars(&item.id, 40),
                        content: self.redact(&truncate_chars(&item.content, 300)),
                        status: serde_json::to_value(&item.status)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default(),
                    })
                    .collect();
                self.status_dirty = true;
            }
            AgentEvent::Processing
            | AgentEvent::ApprovalRequired { .. }
            | AgentEvent::AssistantChunk { .. }
            | AgentEvent::AssistantMessage { .. }
            | AgentEvent::TurnComplete { .. }
            | AgentEvent::Interrupted { .. }
            | AgentEvent::Error { .. } => {}
        }
    }

    async fn flush_status(&mut self, store: &TranscriptStore) {
        let stats = store.stats();
        let transcript = TranscriptStatus {
            config_map_selector: store.selector(),
            chunks: stats.chunks,
            records: stats.records,
            bytes: stats.compressed_bytes,
        };
        if self.status.status.transcript.as_ref() != Some(&transcript) {
            self.status.status.transcript = Some(transcript);
            self.status_dirty = true;
        }
        if self.status_dirty {
            self.status_dirty = false;
            self.status.apply_or_log().await;
        }
    }

    /// Keeps status.jobs current with what the tools and the follower saw of the jobs, and
    /// puts the output a look found into the transcript as tool_log events.
    async fn on_job_observation(&mut self, seen: JobObservation, store: &TranscriptStore) {
        if seen == JobObservation::LookDone {
            self.following = false;
            return;
        }
        if let JobObservation::Log { backend, id, lines } = seen {
            if let Some(at) = lines.last().and_then(|l| l.at.clone()) {
                self.shown_logs.insert(id.clone(), at);
            }
            for event in job_log_events(backend, &id, &lines) {
                self.on_agent_event(event, store).await;
            }
            return;
        }
        // A job a tool saw (a run may come back already finished) gets a look for its
        // output, unless it has had one.
        if let JobObservation::State { info, .. } = &seen
            && !self.shown_logs.contains_key(&info.id)
        {
            self.watching.insert(info.id.clone());
        }
        job_follower::record(&mut self.status.status, seen);
        self.jobs_spend
            .set(job_follower::jobs_cost(&self.status.status));
        self.status_dirty = true;
    }

    /// Starts a look at the unfinished jobs, whose findings come back as observations, so
    /// the turn is not held up by slow platforms.
    fn look_at_jobs(&mut self, observed: &mpsc::Sender<JobObservation>) {
        if self.following {
            return;
        }
        let mut targets =
            job_follower::looked_at(&self.status.status, |id| self.watching.contains(id));
        if targets.is_empty() {
            return;
        }
        let unfinished = job_follower::unfinished(&self.status.status);
        self.watching = unfinished.iter().map(|t| t.id.clone()).collect();
        for t in &mut targets {
            t.shown_until = self.shown_logs.get(&t.id).cloned();
        }
        self.following = true;
        let (backends, observed) = (self.jobs.clone(), observed.clone());
        tokio::spawn(async move {
            for seen in job_follower::look(&targets, &backends).await {
                if observed.send(seen).await.is_err() {
                    return;
                }
            }
            let _ = observed.send(JobObservation::LookDone).await;
        });
    }

    /// Cancels the jobs that should not outlive what just happened to the session (a
    /// suspend, a failed turn), and says so in an Event.
    async fn stop_jobs(&mut self, why: &str) {
        let namespace = self.session.namespace().unwrap_or_default();
        let api = Api::namespaced(self.ctx.client.clone(), &namespace);
        let mut stopped = match stop_attached_jobs(&api, &self.session.uid().unwrap_or_default())
            .await
        {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(session = %self.name(), error = %e, "could not stop cluster jobs");
                vec![]
            }
        };
        // The cluster sweep (by label, for jobs status may not list) already deleted some.
        let swept = stopped.clone();
        let mut stopped_now =
            job_follower::stop_attached(&mut self.status.status, &self.jobs, &swept).await;
        stopped.retain(|id| !stopped_now.jobs.contains(id));
        stopped.append(&mut stopped_now.jobs);
        let stopped = job_follower::Stopped {
            jobs: stopped,
            schedules: stopped_now.schedules,
        };
        self.jobs_spend
            .set(job_follower::jobs_cost(&self.status.status));
        if !stopped.is_empty() {
            self.status_dirty = true;
            let note = format!(
                "{why}: {} (start jobs with detach: true to keep them running)",
                stopped.describe()
            );
            self.ctx
                .publish(&self.object, EventType::Normal, "JobsStopped", note)
                .await;
        }
    }

    async fn on_sandbox_event(&mut self, event: SandboxEvent) {
        match event {
            SandboxEvent::Creating { pod_name } => {
                self.status.status.sandbox = Some(SandboxStatus {
                    pod_name: pod_name.clone(),
                    delete_after: None,
                });
                self.status.set_condition(
                    condition::SANDBOX_READY,
                    false,
                    "Creating",
                    &format!("creating sandbox pod {pod_name}"),
                );
                self.status.apply_or_log().await;
            }
            SandboxEvent::Lost { pod_name, why } => {
                let msg = self.redact(&format!(
                    "sandbox pod {pod_name} was lost ({why}); a new one is started on the next tool call"
                ));
                self.status
                    .set_condition(condition::SANDBOX_READY, false, "PodLost", &msg);
                self.status.apply_or_log().await;
                self.ctx
                    .publish(&self.object, EventType::Warning, "SandboxLost", msg)
                    .await;
            }
            SandboxEvent::Ready { pod_name } => {
                let msg = format!("sandbox pod {pod_name} is running");
                self.status
                    .set_condition(condition::SANDBOX_READY, true, "PodRunning", &msg);
                self.status.apply_or_log().await;
                self.ctx
                    .publish(&self.object, EventType::Normal, "SandboxReady", msg)
                    .await;
            }
        }
    }

    /// Records the end of the turn in the transcript, status and Events.
    async fn end_turn(&mut self, conversation: &mut Conversation, outcome: TurnOutcome) {
        self.approvals_done();
        let iterations = self.status.status.iterations;
        let (phase, reason, message) = match outcome {
            TurnOutcome::Completed { final_response } => {
                self.status.status.final_response = Some(truncate_bytes(
                    &self.redact(&final_response),
                    FINAL_RESPONSE_MAX_BYTES,
                ));
                (
                    SessionPhase::Succeeded,
                    "AnswerReady".to_string(),
                    format!("the agent answered after {iterations} model calls"),
                )
            }
            TurnOutcome::MaxIterationsReached { iterations } => (
                SessionPhase::Failed,
                "MaxIterationsReached".to_string(),
                format!(
                    "the agent made {iterations} model calls in this turn without a final answer; raise spec.maxIterations or narrow the prompt"
                ),
            ),
            TurnOutcome::Failed(TurnFailure::Llm(e)) => (
                SessionPhase::Failed,
                e.reason().to_string(),
                self.redact(&format!("{e}; {}", e.hint(self.access.from_config))),
            ),
            TurnOutcome::Failed(TurnFailure::Tool(f)) => {
                (SessionPhase::Failed, f.reason, self.redact(&f.message))
            }
            TurnOutcome::BudgetExceeded { message } => {
                (SessionPhase::Failed, "BudgetExceeded".to_string(), message)
            }
            TurnOutcome::ContextOverflow { message } => (
                SessionPhase::Failed,
                "ContextWindowExceeded".to_string(),
                self.redact(&message),
            ),
            TurnOutcome::Failed(TurnFailure::Journal(e)) => (
                SessionPhase::Failed,
                "TranscriptWriteFailed".to_string(),
                format!(
                    "the transcript could not be stored, so the turn stopped before acting on it: {e}"
                ),
            ),
            TurnOutcome::Cancelled
            | TurnOutcome::WaitingForApproval { .. }
            | TurnOutcome::BudgetPause { .. } => return,
        };
        if phase == SessionPhase::Failed {
            // A failed turn (budget, errors, limits) leaves nobody to watch its jobs.
            self.stop_jobs(&format!("the turn failed ({reason})")).await;
            conversation.store.defer(&event_record(&AgentEvent::Error {
                reason: reason.clone(),
                message: message.clone(),
            }));
        }
        let ended = Record::TurnEnded {
            outcome: reason.clone(),
            at: Timestamp::now().to_string(),
        };
        if let Err(e) = conversation.store.write(&[ended]).await {
            tracing::warn!(session = %self.name(), error = %e, "could not record the end of the turn");
        }
        conversation.turn_open = false;
        self.status.set_phase(phase, &message);
        self.status.set_condition(
            condition::RUNNING,
            false,
            "TurnFinished",
            "the latest turn ended",
        );
        let succeeded = phase == SessionPhase::Succeeded;
        let (done, other) = if succeeded {
            (condition::COMPLETE, condition::FAILED)
        } else {
            (condition::FAILED, condition::COMPLETE)
        };
        self.status.set_condition(done, true, &reason, &message);
        self.status
            .set_condition(other, false, &reason, "see the other condition");
        self.status_dirty = true;
        self.flush_status(&conversation.store).await;
        self.ctx.metrics.sessions_finished_inc(phase);
        let (type_, event_reason) = if succeeded {
            (EventType::Normal, "Succeeded")
        } else {
            (EventType::Warning, "Failed")
        };
        self.ctx
            .publish(
                &self.object,
                type_,
                event_reason,
                format!("{reason}: {message}"),
            )
            .await;
    }

    /// Stops work for spec.suspend: whatever tool calls left running in the sandbox is
    /// killed; the pod and its workspace stay.
    async fn suspend(&mut self, turn_open: bool) {
        self.release_slot();
        if self.status.status.phase == Some(SessionPhase::Suspended) {
            return;
        }
        let pod = sandbox_pod_name(&self.name());
        if turn_open && let Err(e) = SandboxPod::kill_processes(&self.pods, &pod).await {
            tracing::warn!(session = %self.name(), error = %e, "could not kill sandbox processes on suspend");
        }
        self.stop_jobs("suspended").await;
        let message = if turn_open {
            "suspended by spec.suspend in the middle of a turn; set it to false to resume the turn"
        } else {
            "suspended by spec.suspend; set it to false to go on"
        };
        self.status.set_phase(SessionPhase::Suspended, message);
        self.status
            .set_condition(condition::RUNNING, false, "Suspended", message);
        let idle = self.session.spec.sandbox.idle_timeout_seconds;
        self.keep_sandbox_for(idle.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS));
        self.status.apply_or_log().await;
        self.ctx
            .publish(&self.object, EventType::Normal, "Suspended", message)
            .await;
    }

    async fn refuse_rewrite(&mut self, problem: &str) {
        self.release_slot();
        let unchanged = self
            .status
            .condition(condition::ACCEPTED)
            .is_some_and(|c| c.status == "False" && c.message == problem);
        self.status
            .set_condition(condition::ACCEPTED, false, "InputRewritten", problem);
        self.status.apply_or_log().await;
        if !unchanged {
            self.ctx
                .publish(&self.object, EventType::Warning, "InputRewritten", problem)
                .await;
        }
    }

    /// Nothing is left to do: the sandbox goes (its workspace with it) until a new message
    /// arrives.
    /// Leaves the pod for `seconds`; reconcile deletes it then unless work resumes.
    fn keep_sandbox_for(&mut self, seconds: u32) {
        if let Some(sandbox) = self.status.status.sandbox.as_mut() {
            let at = Timestamp::now()
                .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(seconds.into()))
                .unwrap_or_else(|_| Timestamp::now());
            sandbox.delete_after = Some(Time(at));
        }
    }

    async fn go_idle(&mut self) {
        self.release_slot();
        let name = self.name();
        let pod = sandbox_pod_name(&name);
        let keep = self
            .session
            .spec
            .sandbox
            .keep_after_completion_seconds
            .unwrap_or(0);
        if keep > 0 && self.status.status.sandbox.is_some() {
            self.keep_sandbox_for(keep);
            self.status.apply_or_log().await;
            return;
        }
        // Deleted by name even when no pod was recorded: a failed start may have left one.
        match SandboxPod::delete(&self.pods, &pod).await {
            Ok(()) if self.status.status.sandbox.is_some() => {
                self.status.status.sandbox = None;
                self.status.set_condition(
                    condition::SANDBOX_READY,
                    false,
                    "Deleted",
                    &format!("sandbox pod {pod} was deleted when the agent had nothing left to do"),
                );
                self.status.apply_or_log().await;
            }
            Ok(()) => {}
            Err(e) => tracing::warn!(session = %name, error = %e, "could not delete sandbox pod"),
        }
        if self.status.status.observed_generation != self.session.metadata.generation {
            self.status.apply_or_log().await;
        }
    }

    async fn fail_transcript(&mut self, problem: &str) {
        let message = self.redact(problem);
        self.status.set_phase(SessionPhase::Failed, &message);
        self.status
            .set_condition(condition::FAILED, true, "TranscriptUnavailable", &message);
        self.status
            .set_condition(condition::RUNNING, false, "TranscriptUnavailable", &message);
        self.status.apply_or_log().await;
        self.ctx
            .publish(
                &self.object,
                EventType::Warning,
                "TranscriptUnavailable",
                &message,
            )
            .await;
    }

    /// Hands the session back to reconcile unless the spec changed since this runner last
    /// looked at it. Decided under the sessions lock, so a spec change is either seen here
    /// or starts a new runner.
    fn retire_unless_changed(&mut self) -> bool {
        let Ok(mut sessions) = self.ctx.sessions.lock() else {
            return true;
        };
        if self.spec_rx.borrow().metadata.generation != self.session.metadata.generation {
            return false;
        }
        self.mark_finished(&mut sessions);
        drop(sessions);
        self.release_slot();
        true
    }

    fn mark_finished(&self, sessions: &mut HashMap<String, SessionEntry>) {
        let uid = self.session.uid().unwrap_or_default();
        if let Some(entry) = sessions.get_mut(&uid) {
            *entry = SessionEntry::Finished {
                generation: self.session.metadata.generation,
            };
        }
    }

    fn retire(&mut self) {
        if let Ok(mut sessions) = self.ctx.sessions.lock() {
            self.mark_finished(&mut sessions);
        }
        self.release_slot();
    }
}

/// Most lines of one job's output one look puts into the transcript: it shows progress;
/// the whole output stays with the platform.
const JOB_LOG_LINES_PER_LOOK: usize = 50;

/// A job's new output as the tool_log events of its tool, one per line, each naming the
/// job; past the bound, a line says how many were left out.
fn job_log_events(backend: &str, id: &str, lines: &[LogLine]) -> Vec<AgentEvent> {
    let tool = if backend == "huggingface" {
        HF_JOBS_TOOL
    } else {
        CLUSTER_JOBS_TOOL
    };
    let skipped = lines.len().saturating_sub(JOB_LOG_LINES_PER_LOOK);
    let mut logs = vec![];
    if skipped > 0 {
        logs.push(format!("[{id}] … {skipped} lines not shown"));
    }
    logs.extend(
        lines[skipped..]
            .iter()
            .map(|l| format!("[{id}] {}", truncate_chars(&l.text, 1000))),
    );
    logs.into_iter()
        .map(|log| AgentEvent::ToolLog {
            tool: tool.to_string(),
            log,
        })
        .collect()
}

fn event_record(event: &AgentEvent) -> Record {
    Record::Event {
        at: Timestamp::now().to_string(),
        event: serde_json::to_value(event).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(prompt: &str, messages: &[&str]) -> AgentSessionSpec {
        serde_json::from_value(serde_json::json!({
            "prompt": prompt, "model": "m", "messages": messages
        }))
        .unwrap()
    }

    #[test]
    fn a_look_logs_at_most_a_bounded_number_of_lines_naming_the_job() {
        let lines: Vec<LogLine> = (0..JOB_LOG_LINES_PER_LOOK + 3)
            .map(|i| LogLine::unstamped(&format!("step {i}")))
            .collect();
        let logs: Vec<(String, String)> = job_log_events("huggingface", "j1", &lines)
            .into_iter()
            .filter_map(|e| match e {
                AgentEvent::ToolLog { tool, log } => Some((tool, log)),
                _ => None,
            })
            .collect();
        assert_eq!(logs.len(), JOB_LOG_LINES_PER_LOOK + 1);
        assert_eq!(
            logs[0],
            ("hf_jobs".into(), "[j1] … 3 lines not shown".into())
        );
        assert_eq!(logs[1].1, "[j1] step 3");
        let last = format!("[j1] step {}", JOB_LOG_LINES_PER_LOOK + 2);
        assert_eq!(logs.last().map(|l| l.1.as_str()), Some(last.as_str()));
        let few = job_log_events("cluster", "j2", &lines[..1]);
        assert_eq!(
            few,
            [AgentEvent::ToolLog {
                tool: "cluster_jobs".into(),
                log: "[j2] step 0".into()
            }]
        );
    }

    #[test]
    fn appended_messages_are_fine_and_rewrites_are_named() {
        let sent = vec![digest("task"), digest("more")];
        assert_eq!(
            rewritten_input(&spec("task", &["more", "new"]), &sent),
            None
        );
        let changed = rewritten_input(&spec("task", &["MORE"]), &sent).unwrap();
        assert!(
            changed.starts_with("spec.messages[0] was changed"),
            "{changed}"
        );
        let prompt = rewritten_input(&spec("other", &["more"]), &sent).unwrap();
        assert!(prompt.starts_with("spec.prompt was changed"), "{prompt}");
        let removed = rewritten_input(&spec("task", &[]), &sent).unwrap();
        assert!(
            removed.starts_with("spec.messages[0] was removed"),
            "{removed}"
        );
    }
}
