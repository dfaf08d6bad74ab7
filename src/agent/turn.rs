//! One agent turn: call the model, run the tools it asks for, feed the results back, until
//! it answers without tool calls.

use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::approval::{self, ApprovalGate, PendingCall, Verdict};
pub use super::budget::Budget;
use super::budget::{JobsSpend, Spend};
use super::context::{self, ContextMeter};
use super::journal::{Journal, JournalError};
use super::{AgentEvent, ChatMessage, ToolCall, guards};
use crate::llm::{ChatModel, ChatResponse, LlmError};
use crate::tools::plan::{PLAN_TOOL, parse_plan};
use crate::tools::{ToolFailure, ToolOutput, ToolRouter};

#[derive(Clone, Debug)]
pub struct TurnConfig {
    /// Most model calls in this turn.
    pub max_iterations: u32,
    /// Waits before each retry of a transient model failure (5xx, network); its length is
    /// the number of retries.
    pub llm_retry_delays: Vec<Duration>,
    /// The same for rate limiting, which usually needs longer.
    pub rate_limit_delays: Vec<Duration>,
    /// The model's context window in tokens; compaction starts at 90% of it.
    pub context_window: u64,
    pub budget: Budget,
    /// What the session spent on model calls before this turn.
    pub spent: Spend,
    /// What its jobs have cost so far, counted against the same limits.
    pub jobs_spend: std::sync::Arc<JobsSpend>,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            max_iterations: 300,
            llm_retry_delays: vec![Duration::from_secs(5), Duration::from_secs(15)],
            rate_limit_delays: vec![Duration::from_secs(30), Duration::from_secs(60)],
            context_window: 200_000,
            budget: Budget::default(),
            spent: Spend::default(),
            jobs_spend: Default::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum TurnOutcome {
    /// The model answered without tool calls.
    Completed { final_response: String },
    /// `max_iterations` model calls were made and the model still wanted tools.
    MaxIterationsReached { iterations: u32 },
    /// The model endpoint or a tool's environment failed for good.
    Failed(TurnFailure),
    /// The turn was interrupted from outside.
    Cancelled,
    /// `spec.budget` is used up.
    BudgetExceeded { message: String },
    /// The conversation does not fit the model's context window, even compacted.
    ContextOverflow { message: String },
    /// Calls wait for a human; the turn goes on from here once they are decided.
    WaitingForApproval { pending: Vec<PendingCall> },
    /// Spending reached the auto-approval cap; the turn goes on once a human raises it.
    BudgetPause { spent_usd: f64, cap_usd: f64 },
}

#[derive(Clone, Debug, PartialEq)]
pub enum TurnFailure {
    Llm(LlmError),
    Tool(ToolFailure),
    /// The journal could not record the conversation, so the turn cannot go on safely.
    Journal(JournalError),
}

impl From<JournalError> for TurnFailure {
    fn from(e: JournalError) -> Self {
        TurnFailure::Journal(e)
    }
}

async fn emit(events: &mpsc::Sender<AgentEvent>, event: AgentEvent) {
    // A closed channel means nobody listens any more; the turn itself can go on.
    let _ = events.send(event).await;
}

/// Everything a turn works with besides the conversation itself.
pub struct Turn<'a> {
    pub model: &'a dyn ChatModel,
    pub tools: &'a ToolRouter,
    pub journal: &'a dyn Journal,
    pub events: &'a mpsc::Sender<AgentEvent>,
    pub config: &'a TurnConfig,
    /// Which calls wait for a human, and the decisions made on earlier waits.
    pub gate: &'a dyn ApprovalGate,
}

impl Turn<'_> {
    /// Runs one turn on `history`, which already ends with the user's message (or is an
    /// interrupted turn being resumed), appending everything the model and the tools say.
    /// `history` is durable in the journal up to its current length.
    pub async fn run(
        &self,
        history: &mut Vec<ChatMessage>,
        cancel: &CancellationToken,
    ) -> TurnOutcome {
        match self.run_inner(history, cancel).await {
            Ok(outcome) | Err(outcome) => outcome,
        }
    }

    async fn run_inner(
        &self,
        history: &mut Vec<ChatMessage>,
        cancel: &CancellationToken,
    ) -> Result<TurnOutcome, TurnOutcome> {
        let failed = |e: JournalError| TurnOutcome::Failed(TurnFailure::Journal(e));
        emit(self.events, AgentEvent::Processing).await;
        match self.settle_decided(history, cancel).await {
            Ok(None) => {}
            Ok(Some(outcome)) | Err(outcome) => return Ok(outcome),
        }
        let specs = self.tools.specs();
        let mut saved = history.len();
        let mut iterations = 0;
        let mut nudges = 0;
        let mut spent = self.config.spent;
        let mut meter = ContextMeter::default();
        while iterations < self.config.max_iterations {
            iterations += 1;
            if guards::repair_dangling_calls(history) > 0 {
                self.journal.replace(history).await.map_err(failed)?;
                saved = history.len();
            }
            for warning in [
                guards::repetition_warning(history),
                guards::malformed_streak_warning(history),
            ]
            .into_iter()
            .flatten()
            {
                self.correct(history, warning).await;
            }
            let all_spent = self.all_spent(&spent);
            if let Some(message) = self.config.budget.exceeded(&all_spent) {
                self.save(history, &mut saved).await.map_err(failed)?;
                return Ok(TurnOutcome::BudgetExceeded { message });
            }
            if let Some(cap) = self.config.budget.pause_at_usd
                && all_spent.usd >= cap
            {
                self.save(history, &mut saved).await.map_err(failed)?;
                return Ok(TurnOutcome::BudgetPause {
                    spent_usd: all_spent.usd,
                    cap_usd: cap,
                });
            }
            if meter.tokens(history) > self.threshold() {
                if let Err(message) = self.compact(history, &mut meter, &mut spent).await {
                    self.save(history, &mut saved).await.map_err(failed)?;
                    return Ok(TurnOutcome::ContextOverflow { message });
                }
                saved = history.len();
            }
            let response = tokio::select! {
                _ = cancel.cancelled() => return Ok(TurnOutcome::Cancelled),
                r = self.call_with_retries(history, &specs, false) => r,
            };
            let response = match response {
                Ok(r) => r,
                Err(e) if e.is_context_overflow() => {
                    // The provider counted more than the estimate: compact now and ask again.
                    if let Err(message) = self.compact(history, &mut meter, &mut spent).await {
                        self.save(history, &mut saved).await.map_err(failed)?;
                        return Ok(TurnOutcome::ContextOverflow {
                            message: format!("{e}; {message}"),
                        });
                    }
                    saved = history.len();
                    iterations -= 1;
                    continue;
                }
                Err(e) => return Ok(TurnOutcome::Failed(TurnFailure::Llm(e))),
            };
            spent.add(&response.usage, self.config.budget.price.as_ref());
            meter.record(&response.usage, history.len());
            if let Some(text) = &response.content {
                emit(
                    self.events,
                    AgentEvent::AssistantMessage {
                        content: text.clone(),
                    },
                )
                .await;
            }
            if response.finish_reason.as_deref() == Some("length")
                && !response.tool_calls.is_empty()
            {
                // Calls cut off mid-generation may carry half-written arguments; none of them
                // run.
                let dropped: Vec<String> =
                    response.tool_calls.iter().map(|c| c.name.clone()).collect();
                if let Some(text) = response.content {
                    history.push(ChatMessage::Assistant {
                        content: Some(text),
                        tool_calls: vec![],
                    });
                }
                self.correct(history, guards::truncation_warning(&dropped))
                    .await;
                continue;
            }
            if response.tool_calls.is_empty()
                && nudges < guards::MAX_CONTINUATION_NUDGES
                && let Some(warning) = guards::continuation_warning(history)
            {
                nudges += 1;
                if let Some(text) = response.content {
                    history.push(ChatMessage::Assistant {
                        content: Some(text),
                        tool_calls: vec![],
                    });
                }
                self.correct(history, warning).await;
                continue;
            }
            if response.tool_calls.is_empty() {
                let final_response = response.content.unwrap_or_default();
                history.push(ChatMessage::Assistant {
                    content: Some(final_response.clone()),
                    tool_calls: vec![],
                });
                self.save(history, &mut saved).await.map_err(failed)?;
                emit(
                    self.events,
                    AgentEvent::TurnComplete {
                        final_response: final_response.clone(),
                    },
                )
                .await;
                return Ok(TurnOutcome::Completed { final_response });
            }

            let calls = parse_calls(response.tool_calls);
            history.push(ChatMessage::Assistant {
                content: response.content,
                tool_calls: calls.iter().map(|c| c.stored.clone()).collect(),
            });
            // The calls are on record before any of them runs.
            self.save(history, &mut saved).await.map_err(failed)?;
            for c in &calls {
                emit(
                    self.events,
                    AgentEvent::ToolCall {
                        tool_call_id: c.stored.id.clone(),
                        tool: c.stored.name.clone(),
                        arguments: c
                            .arguments
                            .clone()
                            .unwrap_or(Value::Object(Default::default())),
                    },
                )
                .await;
            }
            // Calls a human must approve wait; the others run now, as in ml-intern. Costs of
            // calls allowed in this batch count against the ones after them.
            let mut committed = self.all_spent(&spent).usd;
            let mut pending: Vec<PendingCall> = vec![];
            for c in &calls {
                let Some(args) = c.arguments.as_ref() else {
                    continue;
                };
                match self.gate.review(&c.stored.name, args, committed) {
                    Verdict::Run { estimated_cost_usd } => {
                        committed += estimated_cost_usd.unwrap_or(0.0);
                    }
                    Verdict::Ask {
                        summary,
                        estimated_cost_usd,
                    } => pending.push(PendingCall {
                        tool_call_id: c.stored.id.clone(),
                        tool: c.stored.name.clone(),
                        arguments: args.clone(),
                        summary,
                        estimated_cost_usd,
                    }),
                }
            }
            let runs = calls
                .iter()
                .filter(|c| !pending.iter().any(|p| p.tool_call_id == c.stored.id))
                .map(|c| self.run_call(c));
            let results = tokio::select! {
                _ = cancel.cancelled() => return Ok(TurnOutcome::Cancelled),
                r = join_all(runs) => r,
            };
            // Results go back in the order the model asked, whatever order they finished in.
            for result in results {
                match result {
                    Ok(message) => history.push(message),
                    Err(failure) => return Ok(TurnOutcome::Failed(failure)),
                }
            }
            saved = history.len();
            if !pending.is_empty() {
                emit(
                    self.events,
                    AgentEvent::ApprovalRequired {
                        tools: pending.clone(),
                    },
                )
                .await;
                return Ok(TurnOutcome::WaitingForApproval { pending });
            }
        }
        self.save(history, &mut saved).await.map_err(failed)?;
        Ok(TurnOutcome::MaxIterationsReached { iterations })
    }

    /// Model spending plus what the session's jobs have cost so far.
    fn all_spent(&self, spent: &Spend) -> Spend {
        Spend {
            tokens: spent.tokens,
            usd: spent.usd + self.config.jobs_spend.get(),
        }
    }

    fn threshold(&self) -> u64 {
        (self.config.context_window as f64 * context::COMPACT_AT) as u64
    }

    /// Replaces the middle of the conversation by a summary the model writes.
    async fn compact(
        &self,
        history: &mut Vec<ChatMessage>,
        meter: &mut ContextMeter,
        spent: &mut Spend,
    ) -> Result<(), String> {
        let window = self.config.context_window;
        let old_tokens = meter.tokens(history);
        let Some((first_user, tail)) = context::compaction_cut(history) else {
            return Err(format!(
                "the conversation (about {old_tokens} tokens) does not fit 90% of the model's \
                 {window}-token context window and has nothing left to compact; give the model \
                 a larger window in the controller's model config or split the task"
            ));
        };
        let request = context::summary_request(history, tail);
        let response = self
            .call_with_retries(&request, &[], true)
            .await
            .map_err(|e| format!("compaction failed: the summary call failed: {e}"))?;
        spent.add(&response.usage, self.config.budget.price.as_ref());
        let summary = response.content.unwrap_or_default();
        if summary.trim().is_empty() {
            return Err("compaction failed: the model returned an empty summary".into());
        }
        let new_history = context::compacted(history, first_user, tail, &summary);
        meter.reset();
        let new_tokens = meter.tokens(&new_history);
        if new_tokens > self.threshold() {
            return Err(format!(
                "the conversation is still about {new_tokens} tokens after compaction, above \
                 90% of the model's {window}-token context window"
            ));
        }
        self.journal
            .replace(&new_history)
            .await
            .map_err(|e| format!("compaction could not be recorded: {e}"))?;
        *history = new_history;
        emit(
            self.events,
            AgentEvent::Compacted {
                old_tokens,
                new_tokens,
            },
        )
        .await;
        Ok(())
    }

    /// Resuming after a wait: the calls of the latest response without a result are run
    /// (approved, with the approver's arguments if edited) or answered (rejected). Still
    /// undecided ones keep the turn waiting.
    async fn settle_decided(
        &self,
        history: &mut Vec<ChatMessage>,
        cancel: &CancellationToken,
    ) -> Result<Option<TurnOutcome>, TurnOutcome> {
        let waiting = approval::waiting_calls(history);
        if waiting.is_empty() {
            return Ok(None);
        }
        let mut undecided = vec![];
        let mut decided = vec![];
        for (id, tool, raw) in waiting {
            let arguments = serde_json::from_str::<Value>(&raw).unwrap_or(Value::Null);
            match self.gate.decision(&id) {
                Some(d) => decided.push((id, tool, arguments, d)),
                None => {
                    let (summary, estimated_cost_usd) =
                        match self.gate.review(&tool, &arguments, f64::INFINITY) {
                            Verdict::Ask {
                                summary,
                                estimated_cost_usd,
                            } => (summary, estimated_cost_usd),
                            Verdict::Run { estimated_cost_usd } => {
                                (format!("{tool} call"), estimated_cost_usd)
                            }
                        };
                    undecided.push(PendingCall {
                        summary,
                        tool_call_id: id,
                        tool,
                        arguments,
                        estimated_cost_usd,
                    })
                }
            }
        }
        if !undecided.is_empty() {
            return Ok(Some(TurnOutcome::WaitingForApproval { pending: undecided }));
        }
        let runs = decided.iter().map(|(id, tool, arguments, d)| async move {
            if !d.approved {
                let rejected = approval::rejection_result(d);
                let message = ChatMessage::Tool {
                    tool_call_id: id.clone(),
                    name: tool.clone(),
                    content: rejected.clone(),
                };
                self.journal.append(std::slice::from_ref(&message)).await?;
                emit(
                    self.events,
                    AgentEvent::ToolOutput {
                        tool_call_id: id.clone(),
                        tool: tool.clone(),
                        output: rejected,
                        success: false,
                    },
                )
                .await;
                return Ok(message);
            }
            let call = ParsedCall {
                stored: ToolCall {
                    id: id.clone(),
                    name: tool.clone(),
                    arguments: arguments.to_string(),
                },
                arguments: Some(d.edited_arguments.clone().unwrap_or(arguments.clone())),
            };
            emit(
                self.events,
                AgentEvent::ToolCall {
                    tool_call_id: id.clone(),
                    tool: tool.clone(),
                    arguments: call.arguments.clone().unwrap_or_default(),
                },
            )
            .await;
            let note = d
                .edited_arguments
                .is_some()
                .then_some(approval::EDITED_NOTE);
            self.run_call_noted(&call, note).await
        });
        let results = tokio::select! {
            _ = cancel.cancelled() => return Err(TurnOutcome::Cancelled),
            r = join_all(runs) => r,
        };
        for result in results {
            match result {
                Ok(message) => history.push(message),
                Err(failure) => return Err(TurnOutcome::Failed(failure)),
            }
        }
        Ok(None)
    }

    async fn run_call(&self, call: &ParsedCall) -> Result<ChatMessage, TurnFailure> {
        self.run_call_noted(call, None).await
    }

    /// Runs one call and records its result (after `note`, if any) as soon as it exists.
    async fn run_call_noted(
        &self,
        call: &ParsedCall,
        note: Option<&str>,
    ) -> Result<ChatMessage, TurnFailure> {
        let mut output = match &call.arguments {
            Some(args) => self
                .tools
                .call(&call.stored.name, args.clone())
                .await
                .map_err(TurnFailure::Tool)?,
            None => ToolOutput::error(guards::malformed_result(&call.stored.name)),
        };
        if let Some(note) = note {
            output.content = format!("{note}\n{}", output.content);
        }
        let message = ChatMessage::Tool {
            tool_call_id: call.stored.id.clone(),
            name: call.stored.name.clone(),
            content: output.content.clone(),
        };
        self.journal.append(std::slice::from_ref(&message)).await?;
        if output.success
            && call.stored.name == PLAN_TOOL
            && let Some(plan) = call.arguments.as_ref().and_then(|a| parse_plan(a).ok())
        {
            emit(self.events, AgentEvent::PlanUpdate { plan }).await;
        }
        emit(
            self.events,
            AgentEvent::ToolOutput {
                tool_call_id: call.stored.id.clone(),
                tool: call.stored.name.clone(),
                output: output.content,
                success: output.success,
            },
        )
        .await;
        Ok(message)
    }

    /// Records what the history gained since the last save.
    async fn save(&self, history: &[ChatMessage], saved: &mut usize) -> Result<(), JournalError> {
        if *saved < history.len() {
            self.journal.append(&history[*saved..]).await?;
            *saved = history.len();
        }
        Ok(())
    }

    /// Injects a guard's corrective message as a user turn and reports it.
    async fn correct(&self, history: &mut Vec<ChatMessage>, warning: String) {
        emit(
            self.events,
            AgentEvent::ToolLog {
                tool: "system".into(),
                log: warning.clone(),
            },
        )
        .await;
        history.push(ChatMessage::user(warning));
    }

    /// One model call whose answer text is emitted as `AssistantChunk`s while it streams
    /// (not for a compaction summary, which is not the assistant speaking to the user).
    async fn complete_streaming(
        &self,
        history: &[ChatMessage],
        specs: &[crate::llm::ToolSpec],
        compaction: bool,
    ) -> Result<ChatResponse, LlmError> {
        if compaction {
            return self.model.complete(history, specs, None).await;
        }
        let (deltas, mut pieces) = mpsc::channel::<String>(64);
        let call = async move {
            let response = self.model.complete(history, specs, Some(&deltas)).await;
            drop(deltas);
            response
        };
        let forward = async {
            while let Some(content) = pieces.recv().await {
                emit(self.events, AgentEvent::AssistantChunk { content }).await;
            }
        };
        let (response, ()) = tokio::join!(call, forward);
        response
    }

    async fn call_with_retries(
        &self,
        history: &[ChatMessage],
        specs: &[crate::llm::ToolSpec],
        compaction: bool,
    ) -> Result<ChatResponse, LlmError> {
        let mut transient = self.config.llm_retry_delays.iter();
        let mut rate_limited = self.config.rate_limit_delays.iter();
        loop {
            let started = Instant::now();
            match self.complete_streaming(history, specs, compaction).await {
                Ok(r) => {
                    emit(
                        self.events,
                        AgentEvent::LlmCall {
                            compaction,
                            usage: r.usage,
                            finish_reason: r.finish_reason.clone(),
                            latency_ms: started.elapsed().as_millis() as u64,
                        },
                    )
                    .await;
                    return Ok(r);
                }
                Err(e) if e.is_retryable() => match if e.is_rate_limit() {
                    rate_limited.next()
                } else {
                    transient.next()
                } {
                    Some(delay) => {
                        emit(
                            self.events,
                            AgentEvent::LlmRetry {
                                message: e.to_string(),
                                delay_secs: delay.as_secs_f32(),
                                rate_limited: e.is_rate_limit(),
                            },
                        )
                        .await;
                        tokio::time::sleep(*delay).await;
                    }
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
    }
}

struct ParsedCall {
    /// What goes into the history; malformed arguments are stored as `{}` so the history
    /// stays valid for providers that parse it.
    stored: ToolCall,
    /// None when the model's arguments were not a JSON object.
    arguments: Option<Value>,
}

fn parse_calls(calls: Vec<ToolCall>) -> Vec<ParsedCall> {
    calls
        .into_iter()
        .map(|mut call| {
            let raw = if call.arguments.trim().is_empty() {
                "{}"
            } else {
                call.arguments.as_str()
            };
            let arguments = match serde_json::from_str::<Value>(raw) {
                Ok(v @ Value::Object(_)) => Some(v),
                _ => None,
            };
            if arguments.is_none() {
                call.arguments = "{}".to_string();
            }
            ParsedCall {
                stored: call,
                arguments,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::NoJournal;
    use crate::agent::approval::NoGate;
    use crate::llm::{ToolSpec, Usage};
    use crate::tools::Tool;
    use async_trait::async_trait;
    use serde_json::json;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    /// Replays canned responses and keeps every request it saw.
    pub(super) struct Script {
        replies: Mutex<VecDeque<Result<ChatResponse, LlmError>>>,
        pub(super) seen: Mutex<Vec<Vec<ChatMessage>>>,
    }

    impl Script {
        pub(super) fn new(replies: Vec<Result<ChatResponse, LlmError>>) -> Self {
            Script {
                replies: Mutex::new(replies.into()),
                seen: Mutex::new(vec![]),
            }
        }
    }

    #[async_trait]
    impl ChatModel for Script {
        async fn complete(
            &self,
            messages: &[ChatMessage],
            _tools: &[ToolSpec],
            deltas: Option<&crate::llm::TextDeltas>,
        ) -> Result<ChatResponse, LlmError> {
            self.seen.lock().unwrap().push(messages.to_vec());
            if let (
                Some(deltas),
                Some(Ok(ChatResponse {
                    content: Some(text),
                    ..
                })),
            ) = (deltas, self.replies.lock().unwrap().front())
            {
                // Streamed in two pieces, as a provider would.
                let cut = text
                    .char_indices()
                    .nth(text.chars().count() / 2)
                    .map_or(0, |(i, _)| i);
                let (a, b) = text.split_at(cut);
                for piece in [a, b].into_iter().filter(|p| !p.is_empty()) {
                    deltas.try_send(piece.to_string()).unwrap();
                }
            }
            self.replies
                .lock()
                .unwrap()
                .pop_front()
                .expect("the script has a reply for every call")
        }
    }

    pub(super) struct Echo {
        pub(super) delay_ms: u64,
    }

    #[async_trait]
    impl Tool for Echo {
        fn spec(&self) -> ToolSpec {
            ToolSpec {
                name: "echo".into(),
                description: "echo".into(),
                parameters: json!({"type": "object"}),
            }
        }
        async fn call(&self, arguments: Value) -> Result<ToolOutput, ToolFailure> {
            tokio::time::sleep(Duration::from_millis(self.delay_ms)).await;
            Ok(ToolOutput::ok(
                arguments["text"].as_str().unwrap_or("").to_string(),
            ))
        }
    }

    struct Broken;

    #[async_trait]
    impl Tool for Broken {
        fn spec(&self) -> ToolSpec {
            ToolSpec {
                name: "broken".into(),
                description: "".into(),
                parameters: json!({"type": "object"}),
            }
        }
        async fn call(&self, _: Value) -> Result<ToolOutput, ToolFailure> {
            Err(ToolFailure {
                reason: "SandboxFailed".into(),
                message: "pod cannot start".into(),
            })
        }
    }

    fn calls(list: &[(&str, &str, &str)]) -> ChatResponse {
        ChatResponse {
            tool_calls: list
                .iter()
                .map(|(id, name, args)| ToolCall {
                    id: id.to_string(),
                    name: name.to_string(),
                    arguments: args.to_string(),
                })
                .collect(),
            usage: Usage {
                prompt_tokens: 10,
                completion_tokens: 2,
                cached_tokens: 0,
            },
            ..Default::default()
        }
    }

    fn answer(text: &str) -> ChatResponse {
        ChatResponse {
            content: Some(text.into()),
            ..Default::default()
        }
    }

    fn router() -> ToolRouter {
        let mut r = ToolRouter::new();
        r.register(Arc::new(Echo { delay_ms: 0 }));
        r
    }

    async fn run(
        model: &Script,
        tools: &ToolRouter,
        config: TurnConfig,
    ) -> (TurnOutcome, Vec<ChatMessage>, Vec<AgentEvent>) {
        let (tx, mut rx) = mpsc::channel(1000);
        let mut history = vec![ChatMessage::system("s"), ChatMessage::user("task")];
        let turn = Turn {
            model,
            tools,
            journal: &NoJournal,
            events: &tx,
            config: &config,
            gate: &NoGate,
        };
        let outcome = turn.run(&mut history, &CancellationToken::new()).await;
        drop(tx);
        let mut events = vec![];
        while let Some(e) = rx.recv().await {
            events.push(e);
        }
        (outcome, history, events)
    }

    #[tokio::test]
    async fn parallel_tool_results_come_back_in_call_order() {
        let mut tools = ToolRouter::new();
        tools.register(Arc::new(Echo { delay_ms: 50 }));
        let model = Script::new(vec![
            Ok(calls(&[
                ("a", "echo", r#"{"text":"first"}"#),
                ("b", "echo", r#"{"text":"second"}"#),
            ])),
            Ok(answer("done")),
        ]);
        let (outcome, history, events) = run(&model, &tools, TurnConfig::default()).await;
        assert_eq!(
            outcome,
            TurnOutcome::Completed {
                final_response: "done".into()
            }
        );
        let tool_msgs: Vec<_> = history
            .iter()
            .filter_map(|m| match m {
                ChatMessage::Tool {
                    tool_call_id,
                    content,
                    ..
                } => Some((tool_call_id.as_str(), content.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(tool_msgs, vec![("a", "first"), ("b", "second")]);
        // The second request carried both results.
        assert_eq!(model.seen.lock().unwrap()[1].len(), 5);
        let kinds: Vec<String> = events
            .iter()
            .map(|e| {
                serde_json::to_value(e).unwrap()["event_type"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                "processing",
                "llm_call",
                "tool_call",
                "tool_call",
                "tool_output",
                "tool_output",
                "assistant_chunk",
                "assistant_chunk",
                "llm_call",
                "assistant_message",
                "turn_complete"
            ]
        );
        let chunks: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                AgentEvent::AssistantChunk { content } => Some(content.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(chunks, ["do", "ne"]);
    }

    #[tokio::test]
    async fn malformed_arguments_are_answered_and_not_executed() {
        let model = Script::new(vec![
            Ok(calls(&[("a", "echo", r#"{"text": "unterminated"#)])),
            Ok(answer("ok")),
        ]);
        let (_, history, events) = run(&model, &router(), TurnConfig::default()).await;
        match &history[2] {
            ChatMessage::Assistant { tool_calls, .. } => assert_eq!(tool_calls[0].arguments, "{}"),
            other => panic!("expected the assistant call, got {other:?}"),
        }
        match &history[3] {
            ChatMessage::Tool { content, .. } => {
                assert!(content.contains("malformed JSON arguments and was NOT executed"))
            }
            other => panic!("expected a tool result, got {other:?}"),
        }
        assert!(
            events
                .iter()
                .any(|e| matches!(e, AgentEvent::ToolOutput { success: false, .. }))
        );
    }

    #[tokio::test]
    async fn a_doom_loop_gets_a_corrective_message_before_the_next_call() {
        let same = || Ok(calls(&[("x", "echo", r#"{"text":"same"}"#)]));
        let model = Script::new(vec![same(), same(), same(), Ok(answer("changed course"))]);
        let (outcome, _, events) = run(&model, &router(), TurnConfig::default()).await;
        assert_eq!(
            outcome,
            TurnOutcome::Completed {
                final_response: "changed course".into()
            }
        );
        let seen = model.seen.lock().unwrap();
        let last_sent = seen[3].last().unwrap();
        assert!(
            matches!(last_sent, ChatMessage::User { content } if content.starts_with(guards::REPETITION_MARKER)),
            "{last_sent:?}"
        );
        assert!(!seen[2].iter().any(|m| matches!(m, ChatMessage::User { content } if content.starts_with(guards::REPETITION_MARKER))));
        assert!(events.iter().any(|e| matches!(e, AgentEvent::ToolLog { log, .. } if log.starts_with(guards::REPETITION_MARKER))));
    }

    #[tokio::test]
    async fn tool_calls_cut_off_by_the_token_limit_are_dropped_and_explained() {
        let mut truncated = calls(&[("a", "echo", r#"{"text": "half"#)]);
        truncated.finish_reason = Some("length".into());
        truncated.content = Some("Writing the file".into());
        let model = Script::new(vec![Ok(truncated), Ok(answer("smaller now"))]);
        let (_, history, events) = run(&model, &router(), TurnConfig::default()).await;
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, AgentEvent::ToolCall { .. })),
            "nothing ran"
        );
        assert_eq!(
            history[2],
            ChatMessage::Assistant {
                content: Some("Writing the file".into()),
                tool_calls: vec![]
            }
        );
        assert!(
            matches!(&history[3], ChatMessage::User { content } if content.contains("[echo]") && content.contains("output token limit"))
        );
    }

    #[tokio::test]
    async fn two_malformed_calls_in_a_row_bring_a_hint_to_the_model() {
        let bad = || Ok(calls(&[("a", "echo", "{not json")]));
        let model = Script::new(vec![bad(), bad(), Ok(answer("ok"))]);
        run(&model, &router(), TurnConfig::default()).await;
        let seen = model.seen.lock().unwrap();
        assert!(
            matches!(seen[2].last().unwrap(), ChatMessage::User { content } if content.contains("were not valid JSON"))
        );
    }

    #[tokio::test]
    async fn unknown_tools_are_answered_with_the_available_ones() {
        let model = Script::new(vec![Ok(calls(&[("a", "nope", "{}")])), Ok(answer("ok"))]);
        let (_, history, _) = run(&model, &router(), TurnConfig::default()).await;
        match &history[3] {
            ChatMessage::Tool { content, .. } => {
                assert!(content.contains("unknown tool 'nope'") && content.contains("echo"))
            }
            other => panic!("expected a tool result, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn stops_at_max_iterations() {
        let model = Script::new(vec![
            Ok(calls(&[("a", "echo", "{}")])),
            Ok(calls(&[("b", "echo", "{}")])),
        ]);
        let config = TurnConfig {
            max_iterations: 2,
            ..TurnConfig::default()
        };
        let (outcome, _, _) = run(&model, &router(), config).await;
        assert_eq!(outcome, TurnOutcome::MaxIterationsReached { iterations: 2 });
    }

    #[tokio::test]
    async fn retryable_model_errors_are_retried_then_fatal() {
        let unreachable = || LlmError::Unreachable {
            url: "u".into(),
            detail: "refused".into(),
        };
        let config = TurnConfig {
            max_iterations: 5,
            llm_retry_delays: vec![Duration::from_millis(1)],
            ..TurnConfig::default()
        };
        let model = Script::new(vec![Err(unreachable()), Ok(answer("recovered"))]);
        let (outcome, _, events) = run(&model, &router(), config.clone()).await;
        assert_eq!(
            outcome,
            TurnOutcome::Completed {
                final_response: "recovered".into()
            }
        );
        assert!(events.iter().any(|e| matches!(
            e,
            AgentEvent::LlmRetry {
                rate_limited: false,
                ..
            }
        )));

        let model = Script::new(vec![Err(unreachable()), Err(unreachable())]);
        let (outcome, _, _) = run(&model, &router(), config.clone()).await;
        assert_eq!(
            outcome,
            TurnOutcome::Failed(TurnFailure::Llm(unreachable()))
        );

        let auth = LlmError::Http {
            url: "u".into(),
            status: 401,
            message: "bad key".into(),
        };
        let model = Script::new(vec![Err(auth.clone())]);
        let (outcome, _, _) = run(&model, &router(), config).await;
        assert_eq!(
            outcome,
            TurnOutcome::Failed(TurnFailure::Llm(auth)),
            "401 is not retried"
        );
    }

    #[tokio::test]
    async fn a_failed_tool_environment_ends_the_turn() {
        let mut tools = ToolRouter::new();
        tools.register(Arc::new(Broken));
        let model = Script::new(vec![Ok(calls(&[("a", "broken", "{}")]))]);
        let (outcome, _, _) = run(&model, &tools, TurnConfig::default()).await;
        match outcome {
            TurnOutcome::Failed(TurnFailure::Tool(f)) => assert_eq!(f.reason, "SandboxFailed"),
            other => panic!("expected a tool failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn cancellation_interrupts_a_running_tool() {
        let mut tools = ToolRouter::new();
        tools.register(Arc::new(Echo { delay_ms: 60_000 }));
        let model = Script::new(vec![Ok(calls(&[("a", "echo", "{}")]))]);
        let (tx, _rx) = mpsc::channel(100);
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.cancel();
        });
        let mut history = vec![ChatMessage::user("task")];
        let turn = Turn {
            model: &model,
            tools: &tools,
            journal: &NoJournal,
            events: &tx,
            config: &TurnConfig::default(),
            gate: &NoGate,
        };
        let outcome = tokio::time::timeout(Duration::from_secs(5), turn.run(&mut history, &cancel))
            .await
            .expect("cancellation ends the turn promptly");
        assert_eq!(outcome, TurnOutcome::Cancelled);
    }

    /// Records what reached the journal, and lets a tool see what was on record when it ran.
    #[derive(Default)]
    struct RecordingJournal {
        log: Arc<Mutex<Vec<String>>>,
    }

    #[async_trait]
    impl Journal for RecordingJournal {
        async fn append(&self, messages: &[ChatMessage]) -> Result<(), JournalError> {
            let mut log = self.log.lock().unwrap();
            for m in messages {
                log.push(match m {
                    ChatMessage::Assistant { tool_calls, .. } if !tool_calls.is_empty() => {
                        format!("calls {}", tool_calls.len())
                    }
                    ChatMessage::Assistant { content, .. } => {
                        format!("answer {}", content.clone().unwrap_or_default())
                    }
                    ChatMessage::Tool { tool_call_id, .. } => format!("result {tool_call_id}"),
                    other => format!("{other:?}"),
                });
            }
            Ok(())
        }
        async fn replace(&self, _: &[ChatMessage]) -> Result<(), JournalError> {
            self.log.lock().unwrap().push("replace".into());
            Ok(())
        }
    }

    struct Witness {
        log: Arc<Mutex<Vec<String>>>,
    }

    #[async_trait]
    impl Tool for Witness {
        fn spec(&self) -> ToolSpec {
            ToolSpec {
                name: "witness".into(),
                description: "".into(),
                parameters: json!({"type": "object"}),
            }
        }
        async fn call(&self, arguments: Value) -> Result<ToolOutput, ToolFailure> {
            let ms = arguments["ms"].as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            self.log.lock().unwrap().push(format!("ran {ms}"));
            Ok(ToolOutput::ok("ok"))
        }
    }

    #[tokio::test]
    async fn calls_are_journaled_before_they_run_and_results_as_they_finish() {
        let journal = RecordingJournal::default();
        let mut tools = ToolRouter::new();
        tools.register(Arc::new(Witness {
            log: journal.log.clone(),
        }));
        let model = Script::new(vec![
            Ok(calls(&[
                ("slow", "witness", r#"{"ms":80}"#),
                ("fast", "witness", r#"{"ms":1}"#),
            ])),
            Ok(answer("done")),
        ]);
        let (tx, _rx) = mpsc::channel(100);
        let mut history = vec![ChatMessage::user("task")];
        let turn = Turn {
            model: &model,
            tools: &tools,
            journal: &journal,
            events: &tx,
            config: &TurnConfig::default(),
            gate: &NoGate,
        };
        let outcome = turn.run(&mut history, &CancellationToken::new()).await;
        assert!(matches!(outcome, TurnOutcome::Completed { .. }));
        assert_eq!(
            *journal.log.lock().unwrap(),
            vec![
                "calls 2",
                "ran 1",
                "result fast",
                "ran 80",
                "result slow",
                "answer done"
            ]
        );
        // The history still has the results in call order.
        let ids: Vec<_> = history
            .iter()
            .filter_map(|m| match m {
                ChatMessage::Tool { tool_call_id, .. } => Some(tool_call_id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(ids, vec!["slow", "fast"]);
    }

    #[tokio::test]
    async fn an_unfinished_plan_gets_at_most_two_continuation_nudges() {
        let mut tools = ToolRouter::new();
        tools.register(Arc::new(crate::tools::PlanTool));
        let plan = r#"{"todos":[{"id":"1","content":"train","status":"in_progress"}]}"#;
        let model = Script::new(vec![
            Ok(calls(&[("p", "plan_tool", plan)])),
            Ok(answer("I will train now.")),
            Ok(answer("Still planning.")),
            Ok(answer("Giving up.")),
        ]);
        let (outcome, history, events) = run(&model, &tools, TurnConfig::default()).await;
        assert_eq!(
            outcome,
            TurnOutcome::Completed {
                final_response: "Giving up.".into()
            }
        );
        let nudges = history
            .iter()
            .filter(|m| matches!(m, ChatMessage::User { content } if content.starts_with(guards::CONTINUATION_MARKER)))
            .count();
        assert_eq!(nudges, 2);
        assert!(
            events.iter().any(
                |e| matches!(e, AgentEvent::PlanUpdate { plan } if plan[0].content == "train")
            )
        );

        // A finished plan lets the answer through at once.
        let done = r#"{"todos":[{"id":"1","content":"train","status":"completed"}]}"#;
        let model = Script::new(vec![
            Ok(calls(&[("p", "plan_tool", done)])),
            Ok(answer("Trained.")),
        ]);
        let (outcome, _, _) = run(&model, &tools, TurnConfig::default()).await;
        assert_eq!(
            outcome,
            TurnOutcome::Completed {
                final_response: "Trained.".into()
            }
        );
    }

    fn http(status: u16, message: &str) -> LlmError {
        LlmError::Http {
            url: "u".into(),
            status,
            message: message.into(),
        }
    }

    /// A call whose result is about 200 tokens; no usage reported, so the context is
    /// estimated.
    fn big_call(id: &str) -> ChatResponse {
        let text = "x".repeat(800);
        ChatResponse {
            usage: Usage::default(),
            ..calls(&[(id, "echo", &format!(r#"{{"text":"{text}"}}"#))])
        }
    }

    #[tokio::test]
    async fn a_full_context_is_compacted_into_a_summary_and_the_turn_goes_on() {
        let model = Script::new(vec![
            Ok(big_call("a")),
            Ok(big_call("b")),
            Ok(big_call("c")),
            Ok(big_call("d")),
            Ok(answer("SUMMARY: echoed four times")),
            Ok(answer("done")),
        ]);
        // About 413 tokens per call: four fit under 90% of 1600, five do not.
        let config = TurnConfig {
            context_window: 1600,
            ..TurnConfig::default()
        };
        let (outcome, history, events) = run(&model, &router(), config).await;
        assert_eq!(
            outcome,
            TurnOutcome::Completed {
                final_response: "done".into()
            }
        );
        let seen = model.seen.lock().unwrap();
        let summary_request = &seen[4];
        assert!(
            matches!(summary_request.last(), Some(ChatMessage::User { content }) if content == context::SUMMARY_REQUEST)
        );
        // The call after compaction: system, task, summary, then the kept tail.
        let after = &seen[5];
        assert_eq!(after[0], ChatMessage::system("s"));
        assert_eq!(after[1], ChatMessage::user("task"));
        assert!(
            matches!(&after[2], ChatMessage::User { content } if content.starts_with(context::SUMMARY_PREFIX) && content.ends_with("echoed four times"))
        );
        assert!(after.len() < seen[3].len() + 2);
        assert!(events.iter().any(|e| matches!(e, AgentEvent::Compacted { new_tokens, old_tokens } if new_tokens < old_tokens)));
        assert!(events.iter().any(|e| matches!(
            e,
            AgentEvent::LlmCall {
                compaction: true,
                ..
            }
        )));
        assert_eq!(
            history.last(),
            Some(&ChatMessage::Assistant {
                content: Some("done".into()),
                tool_calls: vec![]
            })
        );
    }

    #[tokio::test]
    async fn an_overflow_error_forces_compaction_and_one_that_cannot_shrink_ends_the_turn() {
        let model = Script::new(vec![
            Ok(big_call("a")),
            Ok(big_call("b")),
            Ok(big_call("c")),
            Err(http(
                400,
                "This model's maximum context length is 1000 tokens",
            )),
            Ok(answer("summary")),
            Ok(answer("done")),
        ]);
        let (outcome, _, events) = run(&model, &router(), TurnConfig::default()).await;
        assert_eq!(
            outcome,
            TurnOutcome::Completed {
                final_response: "done".into()
            }
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, AgentEvent::Compacted { .. }))
        );

        // Nothing between the task and the tail: no way under the limit.
        let model = Script::new(vec![Err(http(400, "prompt is too long"))]);
        let (outcome, _, _) = run(&model, &router(), TurnConfig::default()).await;
        match outcome {
            TurnOutcome::ContextOverflow { message } => {
                assert!(message.contains("nothing left to compact"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_budget_stops_the_turn_before_the_call_that_would_pass_it() {
        let model = Script::new(vec![
            Ok(calls(&[("a", "echo", r#"{"text":"1"}"#)])),
            Ok(calls(&[("b", "echo", r#"{"text":"2"}"#)])),
            Ok(answer("never asked")),
        ]);
        let config = TurnConfig {
            budget: Budget {
                max_tokens: Some(30),
                ..Budget::default()
            },
            spent: crate::agent::budget::Spend {
                tokens: 10,
                usd: 0.0,
            },
            ..TurnConfig::default()
        };
        let (outcome, _, _) = run(&model, &router(), config).await;
        match outcome {
            TurnOutcome::BudgetExceeded { message } => {
                assert!(message.contains("34 tokens"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(model.seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn rate_limits_and_transient_errors_follow_their_own_schedules() {
        let config = TurnConfig {
            llm_retry_delays: vec![Duration::from_millis(1)],
            rate_limit_delays: vec![],
            ..TurnConfig::default()
        };
        let model = Script::new(vec![Err(http(503, "overloaded")), Ok(answer("ok"))]);
        let (outcome, _, events) = run(&model, &router(), config.clone()).await;
        assert!(matches!(outcome, TurnOutcome::Completed { .. }));
        assert!(events.iter().any(|e| matches!(
            e,
            AgentEvent::LlmRetry {
                rate_limited: false,
                ..
            }
        )));
        let model = Script::new(vec![Err(http(429, "slow down")), Ok(answer("ok"))]);
        let (outcome, _, _) = run(&model, &router(), config).await;
        assert!(
            matches!(
                outcome,
                TurnOutcome::Failed(TurnFailure::Llm(LlmError::Http { status: 429, .. }))
            ),
            "no rate-limit retries were configured: {outcome:?}"
        );
    }
}

#[cfg(test)]
mod approval_tests {
    use super::tests::{Echo, Script};
    use super::*;
    use crate::agent::NoJournal;
    use crate::agent::approval::Decision;
    use serde_json::json;
    use std::collections::HashMap;
    use std::sync::Arc;

    /// Gates echo calls whose text starts with "costly".
    struct Gate(HashMap<String, Decision>);

    impl ApprovalGate for Gate {
        fn review(&self, tool: &str, arguments: &Value, _: f64) -> Verdict {
            match arguments["text"]
                .as_str()
                .filter(|t| t.starts_with("costly"))
            {
                Some(t) => Verdict::Ask {
                    summary: format!("{tool} {t}"),
                    estimated_cost_usd: None,
                },
                None => Verdict::Run {
                    estimated_cost_usd: None,
                },
            }
        }
        fn decision(&self, id: &str) -> Option<Decision> {
            self.0.get(id).cloned()
        }
    }

    fn call(id: &str, text: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            name: "echo".into(),
            arguments: json!({"text": text}).to_string(),
        }
    }

    async fn run(
        model: &Script,
        gate: &Gate,
        history: &mut Vec<ChatMessage>,
    ) -> (TurnOutcome, Vec<AgentEvent>) {
        let mut tools = ToolRouter::new();
        tools.register(Arc::new(Echo { delay_ms: 0 }));
        let (tx, mut rx) = mpsc::channel(100);
        let config = TurnConfig::default();
        let turn = Turn {
            model,
            tools: &tools,
            journal: &NoJournal,
            events: &tx,
            config: &config,
            gate,
        };
        let outcome = turn.run(history, &CancellationToken::new()).await;
        drop(tx);
        let mut events = vec![];
        while let Some(e) = rx.recv().await {
            events.push(e);
        }
        (outcome, events)
    }

    #[tokio::test]
    async fn a_gated_call_waits_while_the_others_run_and_a_decision_resumes_the_turn() {
        let model = Script::new(vec![
            Ok(ChatResponse {
                tool_calls: vec![call("a", "costly training"), call("b", "cheap")],
                ..Default::default()
            }),
            Ok(ChatResponse {
                content: Some("trained".into()),
                ..Default::default()
            }),
        ]);
        let mut history = vec![ChatMessage::system("s"), ChatMessage::user("train")];
        let (outcome, events) = run(&model, &Gate(HashMap::new()), &mut history).await;
        let TurnOutcome::WaitingForApproval { pending } = outcome else {
            panic!("expected a wait, got {outcome:?}");
        };
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].tool_call_id, "a");
        assert_eq!(pending[0].summary, "echo costly training");
        assert!(
            matches!(history.last(), Some(ChatMessage::Tool { tool_call_id, .. }) if tool_call_id == "b")
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, AgentEvent::ApprovalRequired { .. }))
        );

        // Still undecided: nothing runs, no model call.
        let (again, _) = run(&model, &Gate(HashMap::new()), &mut history).await;
        assert!(matches!(again, TurnOutcome::WaitingForApproval { .. }));
        assert_eq!(model.seen.lock().unwrap().len(), 1);

        let approved = Gate(HashMap::from([(
            "a".to_string(),
            Decision {
                approved: true,
                by: Some("alice".into()),
                feedback: None,
                edited_arguments: Some(json!({"text": "costly training, 1 epoch"})),
            },
        )]));
        let (done, _) = run(&model, &approved, &mut history).await;
        assert_eq!(
            done,
            TurnOutcome::Completed {
                final_response: "trained".into()
            }
        );
        let sent = &model.seen.lock().unwrap()[1];
        let result = sent
            .iter()
            .find_map(|m| match m {
                ChatMessage::Tool {
                    tool_call_id,
                    content,
                    ..
                } if tool_call_id == "a" => Some(content.clone()),
                _ => None,
            })
            .expect("the approved call's result");
        assert_eq!(
            result,
            format!("{}\ncostly training, 1 epoch", approval::EDITED_NOTE)
        );
    }

    #[tokio::test]
    async fn a_rejection_reaches_the_model_with_its_feedback() {
        let model = Script::new(vec![
            Ok(ChatResponse {
                tool_calls: vec![call("a", "costly")],
                ..Default::default()
            }),
            Ok(ChatResponse {
                content: Some("ok, smaller".into()),
                ..Default::default()
            }),
        ]);
        let mut history = vec![ChatMessage::user("go")];
        run(&model, &Gate(HashMap::new()), &mut history).await;
        let rejected = Gate(HashMap::from([(
            "a".to_string(),
            Decision {
                approved: false,
                by: None,
                feedback: Some("too expensive".into()),
                edited_arguments: None,
            },
        )]));
        let (done, _) = run(&model, &rejected, &mut history).await;
        assert!(matches!(done, TurnOutcome::Completed { .. }));
        assert!(
            history
                .iter()
                .any(|m| matches!(m, ChatMessage::Tool { content, .. }
            if content == "Tool call rejected; it did not run. User feedback: too expensive"))
        );
    }
}
