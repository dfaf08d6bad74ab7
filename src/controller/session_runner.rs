//! One session's run: wait for a slot, run the agent loop with a sandbox pod for its tools,
//! mirror progress into status and Events, and clean up when it ends.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::context::{Context, SessionEntry};
use super::status::{StatusWriter, condition};
use crate::agent::prompt::SYSTEM_PROMPT;
use crate::agent::{AgentEvent, ChatMessage, TurnConfig, TurnFailure, TurnOutcome, run_turn};
use crate::api::session::FINAL_RESPONSE_MAX_BYTES;
use crate::api::{AgentSession, LlmApi, SandboxStatus, SessionPhase, TokenUsage};
use crate::llm::{ModelSettings, WireApi, client_for};
use crate::redact::Redactor;
use crate::runtime::sandbox_template::{default_resources, sandbox_pod};
use crate::runtime::{SandboxEvent, SandboxPod, SandboxSettings};
use crate::text::{truncate_bytes, truncate_chars};
use crate::tools::{BashTool, ToolRouter};

/// Runs the session to its end and then marks it finished in the context.
pub async fn run_session(
    ctx: Arc<Context>,
    session: Arc<AgentSession>,
    api_key: Option<String>,
    cancel: CancellationToken,
) {
    let uid = session.uid().unwrap_or_default();
    let name = session.name_any();
    let mut run = SessionRun::new(ctx.clone(), &session, api_key);
    run.execute(&cancel).await;
    if let Ok(mut sessions) = ctx.sessions.lock()
        && sessions.contains_key(&uid)
    {
        sessions.insert(uid, SessionEntry::Finished);
    }
    tracing::info!(session = %name, "session run ended");
}

struct SessionRun {
    ctx: Arc<Context>,
    session: AgentSession,
    object: k8s_openapi::api::core::v1::ObjectReference,
    pods: Api<Pod>,
    status: StatusWriter,
    /// Status changed since it was last written.
    status_dirty: bool,
    api_key: Option<String>,
    redactor: Redactor,
}

impl SessionRun {
    fn new(ctx: Arc<Context>, session: &AgentSession, api_key: Option<String>) -> Self {
        let namespace = session.namespace().unwrap_or_default();
        let api = Api::namespaced(ctx.client.clone(), &namespace);
        SessionRun {
            pods: Api::namespaced(ctx.client.clone(), &namespace),
            status: StatusWriter::new(api, session),
            status_dirty: false,
            object: session.object_ref(&()),
            session: session.clone(),
            redactor: Redactor::new(api_key.clone()),
            api_key,
            ctx,
        }
    }

    /// Secret values never leave the controller: not in status, Events or logs.
    fn redact(&self, text: &str) -> String {
        self.redactor.redact(text).into_owned()
    }

    async fn execute(&mut self, cancel: &CancellationToken) {
        self.status.set_condition(
            condition::ACCEPTED,
            true,
            "Accepted",
            "the spec and the Secrets it names are usable",
        );
        if self.status.status.phase.is_none() {
            self.status
                .set_phase(SessionPhase::Pending, "accepted; starting the agent loop");
            self.status.apply_or_log().await;
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
                    _ = cancel.cancelled() => return,
                    p = self.ctx.slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                }
            }
        };
        self.ctx.metrics.sessions_running.inc();
        self.ctx.metrics.sessions_started.inc();
        let outcome = self.run_loop(cancel).await;
        self.ctx.metrics.sessions_running.dec();
        drop(permit);
        if let Some(outcome) = outcome {
            self.finish(outcome).await;
        }
    }

    /// Runs the turn; None when it was cancelled (the session is being deleted).
    async fn run_loop(&mut self, cancel: &CancellationToken) -> Option<TurnOutcome> {
        let spec = self.session.spec.clone();
        let name = self.session.name_any();
        self.status.status.started_at = Some(Time(Timestamp::now()));
        self.status
            .set_phase(SessionPhase::Running, "the agent is working on the task");
        self.status.set_condition(
            condition::RUNNING,
            true,
            "AgentLoopRunning",
            "the agent loop is running",
        );
        self.status.apply_or_log().await;
        self.ctx
            .publish(
                &self.object,
                EventType::Normal,
                "Started",
                format!("agent loop started with model {}", spec.model),
            )
            .await;

        let model = client_for(ModelSettings {
            api: match spec.llm.api {
                LlmApi::Openai => WireApi::OpenAiChat,
                LlmApi::Anthropic => WireApi::AnthropicMessages,
            },
            model: &spec.model,
            base_url: spec.llm.base_url.as_deref(),
            api_key: self.api_key.clone(),
            timeout: self.ctx.config.llm_timeout,
            stream: spec.llm.stream,
            max_tokens: spec.llm.max_tokens,
            temperature: spec.llm.temperature,
        });

        let Some(owner) = self.session.controller_owner_ref(&()) else {
            return Some(TurnOutcome::Failed(TurnFailure::Tool(
                crate::tools::ToolFailure {
                    reason: "InvalidSession".into(),
                    message: "the session has no uid to own its sandbox pod".into(),
                },
            )));
        };
        let settings = SandboxSettings {
            image: spec
                .sandbox
                .image
                .clone()
                .unwrap_or_else(|| self.ctx.config.default_sandbox_image.clone()),
            image_pull_policy: spec.sandbox.image_pull_policy.clone(),
            resources: spec
                .sandbox
                .resources
                .clone()
                .unwrap_or_else(default_resources),
            env: spec.sandbox.env.clone(),
        };
        let namespace = self.session.namespace().unwrap_or_default();
        let (sandbox_tx, mut sandbox_rx) = mpsc::channel(8);
        let sandbox = Arc::new(SandboxPod::new(
            self.pods.clone(),
            sandbox_pod(&name, &namespace, owner, &settings),
            self.ctx.config.sandbox_startup_timeout,
            sandbox_tx,
        ));
        let mut tools = ToolRouter::new();
        tools.register(Arc::new(BashTool::new(sandbox.clone())));

        let mut history = vec![
            ChatMessage::system(SYSTEM_PROMPT),
            ChatMessage::user(spec.prompt.clone()),
        ];
        let config = TurnConfig {
            max_iterations: spec.max_iterations,
            llm_retry_delays: self.ctx.config.llm_retry_delays.clone(),
        };
        let (events_tx, mut events_rx) = mpsc::channel(256);
        let outcome = {
            let turn = run_turn(
                model.as_ref(),
                &tools,
                &mut history,
                &config,
                &events_tx,
                cancel,
            );
            tokio::pin!(turn);
            loop {
                tokio::select! {
                    biased;
                    Some(event) = events_rx.recv() => {
                        // Events emitted together (a model response and the tool calls it
                        // asks for) become one status write.
                        self.on_agent_event(event).await;
                        while let Ok(event) = events_rx.try_recv() {
                            self.on_agent_event(event).await;
                        }
                        self.flush_status().await;
                    }
                    Some(event) = sandbox_rx.recv() => self.on_sandbox_event(event).await,
                    outcome = &mut turn => break outcome,
                }
            }
        };
        while let Ok(event) = events_rx.try_recv() {
            self.on_agent_event(event).await;
        }
        while let Ok(event) = sandbox_rx.try_recv() {
            self.on_sandbox_event(event).await;
        }
        if outcome == TurnOutcome::Cancelled {
            return None;
        }
        Some(outcome)
    }

    async fn on_agent_event(&mut self, event: AgentEvent) {
        let metrics = &self.ctx.metrics;
        match event {
            AgentEvent::LlmCall { usage, .. } => {
                metrics.llm_calls.inc();
                metrics.llm_prompt_tokens.inc_by(usage.prompt_tokens);
                metrics
                    .llm_completion_tokens
                    .inc_by(usage.completion_tokens);
                let s = &mut self.status.status;
                s.iterations += 1;
                let total = s.usage.get_or_insert_with(TokenUsage::default);
                total.prompt_tokens += usage.prompt_tokens;
                total.completion_tokens += usage.completion_tokens;
                self.status_dirty = true;
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
                tracing::debug!(session = %self.session.name_any(), %note, "tool called");
                self.ctx
                    .publish(&self.object, EventType::Normal, "ToolCalled", note)
                    .await;
            }
            AgentEvent::ToolLog { tool, log } => {
                let log = self.redact(&log);
                tracing::info!(session = %self.session.name_any(), %tool, %log);
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
                tracing::info!(session = %self.session.name_any(), %note, "model call retried");
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
                tracing::debug!(session = %self.session.name_any(), %tool, success, %output, "tool finished");
            }
            AgentEvent::Processing
            | AgentEvent::AssistantMessage { .. }
            | AgentEvent::TurnComplete { .. } => {}
        }
    }

    async fn flush_status(&mut self) {
        if self.status_dirty {
            self.status_dirty = false;
            self.status.apply_or_log().await;
        }
    }

    async fn on_sandbox_event(&mut self, event: SandboxEvent) {
        match event {
            SandboxEvent::Creating { pod_name } => {
                self.status.status.sandbox = Some(SandboxStatus {
                    pod_name: pod_name.clone(),
                });
                self.status.set_condition(
                    condition::SANDBOX_READY,
                    false,
                    "Creating",
                    &format!("creating sandbox pod {pod_name}"),
                );
                self.status.apply_or_log().await;
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

    async fn finish(&mut self, outcome: TurnOutcome) {
        let name = self.session.name_any();
        // Deleted by name even when no pod was recorded: a failed start may have left one.
        let pod = crate::runtime::sandbox_pod_name(&name);
        match SandboxPod::delete(&self.pods, &pod).await {
            Ok(()) if self.status.status.sandbox.is_some() => self.status.set_condition(
                condition::SANDBOX_READY,
                false,
                "Deleted",
                &format!("sandbox pod {pod} was deleted when the session ended"),
            ),
            Ok(()) => {}
            Err(e) => tracing::warn!(session = %name, error = %e, "could not delete sandbox pod"),
        }
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
                    "the agent made {iterations} model calls without a final answer; raise spec.maxIterations or narrow the prompt"
                ),
            ),
            TurnOutcome::Failed(TurnFailure::Llm(e)) => (
                SessionPhase::Failed,
                e.reason().to_string(),
                self.redact(&format!("{e}; {}", e.hint())),
            ),
            TurnOutcome::Failed(TurnFailure::Tool(f)) => {
                (SessionPhase::Failed, f.reason, self.redact(&f.message))
            }
            TurnOutcome::Cancelled => return,
        };
        self.status.set_phase(phase, &message);
        self.status.set_condition(
            condition::RUNNING,
            false,
            "Finished",
            "the agent loop ended",
        );
        let succeeded = phase == SessionPhase::Succeeded;
        let terminal_condition = if succeeded {
            condition::COMPLETE
        } else {
            condition::FAILED
        };
        self.status
            .set_condition(terminal_condition, true, &reason, &message);
        self.status.apply_or_log().await;
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
}
