//! Conversations over time on the real cluster: follow-up messages appended to the spec,
//! suspend and resume, and a controller killed mid-turn that resumes from the transcript.

mod support;

use std::sync::Arc;
use std::time::Duration;

use ml_intern::agent::guards::INTERRUPTED;
use ml_intern::store::Record;
use serde_json::{Value, json};
use support::{E2e, ScriptedLlm, Step};
use tokio::sync::Notify;

const MINUTE: Duration = Duration::from_secs(60);

fn condition(
    s: &ml_intern::api::AgentSession,
    type_: &str,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    s.status
        .as_ref()
        .and_then(|st| st.conditions.iter().find(|c| c.type_ == type_))
        .cloned()
        .unwrap_or_else(|| panic!("no {type_} condition in {:#?}", s.status))
}

/// (role, content) of each message the model was sent.
fn roles_and_contents(request: &Value) -> Vec<(String, String)> {
    request["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or("").to_string(),
                m["content"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn tool_results(request: &Value) -> Vec<String> {
    roles_and_contents(request)
        .into_iter()
        .filter(|(role, _)| role == "tool")
        .map(|(_, c)| c)
        .collect()
}

#[tokio::test]
async fn follow_up_messages_continue_the_conversation_and_history_cannot_be_rewritten() {
    let env = E2e::start("multiturn").await;
    let llm = ScriptedLlm::start(vec![
        Step::Answer("first answer".into()),
        Step::Answer("second answer".into()),
    ])
    .await;
    env.create_session(
        "chat",
        json!({"prompt": "first question", "model": "openai/x",
               "llm": {"baseUrl": llm.base_url}, "sandbox": {"imagePullPolicy": "Never"}}),
    )
    .await;
    let first = env.wait_for_phase("chat", "Succeeded", MINUTE).await;
    let status = first.status.unwrap();
    assert_eq!(status.final_response.as_deref(), Some("first answer"));
    assert_eq!(status.processed_messages, 0);

    // A GitOps-style follow-up: append to spec.messages.
    env.patch_spec("chat", json!({"messages": ["second question"]}))
        .await;
    let second = env
        .wait_for_session("chat", MINUTE, "second answer", |s| {
            s.status
                .as_ref()
                .is_some_and(|st| st.final_response.as_deref() == Some("second answer"))
        })
        .await;
    let status = second.status.clone().unwrap();
    assert_eq!(status.processed_messages, 1);
    assert_eq!(status.phase, Some(ml_intern::api::SessionPhase::Succeeded));
    assert_eq!(status.iterations, 2);
    let requests = llm.requests();
    assert_eq!(requests.len(), 2);
    let sent = roles_and_contents(&requests[1].body);
    let tail: Vec<(&str, &str)> = sent[1..]
        .iter()
        .map(|(r, c)| (r.as_str(), c.as_str()))
        .collect();
    assert_eq!(sent[0].0, "system");
    assert_eq!(
        tail,
        vec![
            ("user", "first question"),
            ("assistant", "first answer"),
            ("user", "second question")
        ],
        "the second turn carries the whole conversation"
    );

    // Rewriting a message already sent is refused, and nothing runs.
    env.patch_spec("chat", json!({"messages": ["a different second question"]}))
        .await;
    let refused = env
        .wait_for_condition("chat", "Accepted", "InputRewritten", MINUTE)
        .await;
    let c = condition(&refused, "Accepted");
    assert_eq!(c.status, "False");
    assert!(
        c.message.contains("spec.messages[0] was changed"),
        "{}",
        c.message
    );
    env.wait_for_event("chat", "InputRewritten", MINUTE).await;
    assert_eq!(llm.requests().len(), 2, "a rewritten input is never sent");

    // Restoring it and appending goes on from the same conversation.
    env.patch_spec(
        "chat",
        json!({"messages": ["second question", "third question"]}),
    )
    .await;
    let third = env
        .wait_for_session("chat", MINUTE, "third turn failed", |s| {
            s.status
                .as_ref()
                .is_some_and(|st| st.processed_messages == 2)
                && s.status.as_ref().and_then(|st| st.phase)
                    == Some(ml_intern::api::SessionPhase::Failed)
        })
        .await;
    // The script had two answers; the third call fails and says so, but the input was
    // taken and the history carried.
    assert_eq!(condition(&third, "Accepted").status, "True");
    let requests = llm.wait_for_requests(3, MINUTE).await;
    assert!(
        roles_and_contents(&requests[2].body)
            .contains(&("user".to_string(), "third question".to_string()))
    );

    let records = env.transcript("chat").await;
    let inputs = records
        .iter()
        .filter(|r| matches!(r, Record::Input { .. }))
        .count();
    let turns = records
        .iter()
        .filter(|r| matches!(r, Record::TurnEnded { .. }))
        .count();
    assert_eq!((inputs, turns), (3, 3), "{records:#?}");

    // What a user reads with the CLI.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ml-intern"))
        .args(["transcript", "chat", "-n", &env.namespace, "--messages"])
        .output()
        .expect("run ml-intern transcript");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let roles: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["role"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        roles,
        ["system", "user", "assistant", "user", "assistant", "user"],
        "{text}"
    );
}

#[tokio::test]
async fn suspend_kills_the_running_tool_and_resume_finishes_the_turn() {
    let env = E2e::start("suspend").await;
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "echo started >> /workspace/log; sleep 600; echo finished >> /workspace/log",
                   "timeout": 900}),
        )]),
        Step::Answer("done after resume".into()),
    ])
    .await;
    env.create_session(
        "pausable",
        json!({"prompt": "Work for a long time.", "model": "openai/x",
               "llm": {"baseUrl": llm.base_url}, "sandbox": {"imagePullPolicy": "Never"}}),
    )
    .await;
    let pod = "pausable-sandbox";
    env.wait_for_exec(pod, &["cat", "/workspace/log"], 2 * MINUTE, |o| {
        o.contains("started")
    })
    .await;

    env.patch_spec("pausable", json!({"suspend": true})).await;
    let suspended = env.wait_for_phase("pausable", "Suspended", MINUTE).await;
    assert_eq!(condition(&suspended, "Running").reason, "Suspended");
    let idle_until = suspended.status.as_ref().unwrap().sandbox.as_ref().unwrap();
    assert!(
        idle_until.delete_after.is_some(),
        "a suspended session's pod has an idle deadline"
    );
    env.wait_for_event("pausable", "Suspended", MINUTE).await;
    // The tool's process is gone; the pod and its workspace stay.
    env.wait_for_exec(pod, &["ps"], MINUTE, |o| {
        !o.contains("sleep 600") && !o.is_empty()
    })
    .await;
    assert_eq!(
        env.exec(pod, &["cat", "/workspace/log"]).await.trim(),
        "started"
    );
    assert_eq!(llm.requests().len(), 1, "nothing runs while suspended");

    env.patch_spec("pausable", json!({"suspend": false})).await;
    let done = env.wait_for_phase("pausable", "Succeeded", MINUTE).await;
    assert_eq!(
        done.status.unwrap().final_response.as_deref(),
        Some("done after resume")
    );
    let requests = llm.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        tool_results(&requests[1].body),
        vec![INTERRUPTED.to_string()]
    );
    env.wait_for_event("pausable", "TurnResumed", MINUTE).await;
}

#[tokio::test]
async fn a_controller_killed_mid_turn_resumes_without_running_a_completed_call_twice() {
    let mut env = E2e::start("crash").await;
    let release = Arc::new(Notify::new());
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "echo one >> /workspace/ran; echo first-done"}),
        )]),
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "echo two >> /workspace/ran; sleep 600", "timeout": 900}),
        )]),
        Step::AnswerWhenReleased(release.clone(), "finished after the restart".into()),
    ])
    .await;
    env.create_session(
        "durable",
        json!({"prompt": "Append to a file twice.", "model": "openai/x",
               "llm": {"baseUrl": llm.base_url}, "sandbox": {"imagePullPolicy": "Never"}}),
    )
    .await;
    let pod = "durable-sandbox";
    env.wait_for_exec(pod, &["cat", "/workspace/ran"], 2 * MINUTE, |o| {
        o.contains("two")
    })
    .await;

    // kill -9 while the second call runs.
    env.stop_controller();
    env.start_controller().await;

    // The resumed turn asks the model again; meanwhile the sandbox shows each call ran once
    // and the interrupted one was killed.
    llm.wait_for_requests(3, 2 * MINUTE).await;
    assert_eq!(
        env.exec(pod, &["cat", "/workspace/ran"]).await,
        "one\ntwo\n"
    );
    let ps = env.exec(pod, &["ps"]).await;
    assert!(!ps.contains("sleep 600"), "{ps}");
    release.notify_one();
    let done = env.wait_for_phase("durable", "Succeeded", 2 * MINUTE).await;
    let status = done.status.clone().unwrap();
    assert_eq!(
        status.final_response.as_deref(),
        Some("finished after the restart")
    );
    let requests = llm.requests();
    assert_eq!(requests.len(), 3, "one model call per step, none repeated");
    assert_eq!(
        tool_results(&requests[2].body),
        vec!["first-done\n".to_string(), INTERRUPTED.to_string()],
        "the completed result came from the transcript, the in-flight call is reported interrupted"
    );
    env.wait_for_event("durable", "TurnResumed", MINUTE).await;

    // The records show each call ran once: one result each, in order.
    let records = env.transcript("durable").await;
    let results: Vec<String> = ml_intern::store::replay(&records)
        .history
        .iter()
        .filter_map(|m| match m {
            ml_intern::agent::ChatMessage::Tool { content, .. } => Some(content.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        results,
        vec!["first-done\n".to_string(), INTERRUPTED.to_string()]
    );
    assert!(
        std::fs::read_to_string(&env.log)
            .unwrap()
            .contains("killed the processes of interrupted tool calls"),
        "{}",
        env.log_tail()
    );
}

#[tokio::test]
async fn plan_cost_and_budget_show_in_status_and_the_budget_ends_the_session() {
    let env = E2e::start_with(
        "budget",
        support::E2eOptions {
            model_config: Some(
                "models:\n  - match: \"openai/priced*\"\n    contextWindow: 100000\n    \
                 price: {inputPerMillion: 1.0, outputPerMillion: 2.0}\n"
                    .into(),
            ),
            ..Default::default()
        },
    )
    .await;
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![(
            "plan_tool",
            json!({"todos": [
                {"id": "1", "content": "prepare data", "status": "completed"},
                {"id": "2", "content": "train the model", "status": "in_progress"}
            ]}),
        )]),
        Step::Answer("I think I am done.".into()),
        Step::ToolCalls(vec![("bash", json!({"command": "echo training"}))]),
        Step::Answer("never reached".into()),
    ])
    .await;
    // Each scripted call reports 100 prompt and 10 completion tokens.
    env.create_session(
        "capped",
        json!({"prompt": "Train something.", "model": "openai/priced-model",
               "llm": {"baseUrl": llm.base_url}, "sandbox": {"imagePullPolicy": "Never"},
               "budget": {"maxTokens": 300}}),
    )
    .await;
    let failed = env.wait_for_phase("capped", "Failed", 2 * MINUTE).await;
    let c = condition(&failed, "Failed");
    assert_eq!(c.reason, "BudgetExceeded");
    assert!(c.message.contains("330 tokens"), "{}", c.message);
    let requests = llm.requests();
    assert_eq!(requests.len(), 3, "no call past the budget");
    assert!(
        roles_and_contents(&requests[2].body)
            .iter()
            .any(|(role, c)| role == "user" && c.starts_with("[SYSTEM: CONTINUATION GUARD]")),
        "the text answer with an unfinished plan was sent back to work"
    );
    let status = failed.status.unwrap();
    let plan: Vec<(&str, &str)> = status
        .plan
        .iter()
        .map(|p| (p.content.as_str(), p.status.as_str()))
        .collect();
    assert_eq!(
        plan,
        vec![
            ("prepare data", "completed"),
            ("train the model", "in_progress")
        ]
    );
    let usage = status.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (300, 30));
    assert_eq!(usage.estimated_cost_usd.as_deref(), Some("0.000360"));
    let context = status.context.unwrap();
    assert_eq!((context.window, context.tokens), (100_000, 100));
}

/// A bash command printing `n` copies of `a`, then `marker`.
fn print_chars(n: usize, marker: &str) -> Value {
    json!({"command": format!("head -c {n} /dev/zero | tr '\\0' a; echo; echo {marker}")})
}

#[tokio::test]
async fn a_full_context_is_compacted_through_the_model_and_an_overflow_error_compacts_again() {
    // About 4 characters a token: the system prompt is ~450 tokens, a 6000-character output
    // ~1500, a 2400-character one ~600. Compaction starts above 4500 (90% of 5000).
    let env = E2e::start_with(
        "compaction",
        support::E2eOptions {
            model_config: Some(
                "models:\n  - match: \"openai/small-window\"\n    contextWindow: 5000\n".into(),
            ),
            ..Default::default()
        },
    )
    .await;
    let overflow = json!({"error": {"message": "This model's maximum context length is 5000 tokens. \
        However, your messages resulted in 5210 tokens.", "type": "invalid_request_error"}});
    let llm = ScriptedLlm::start_counting_tokens(vec![
        Step::ToolCalls(vec![("bash", print_chars(6000, "out-1"))]),
        Step::ToolCalls(vec![("bash", print_chars(6000, "out-2"))]),
        Step::ToolCalls(vec![("bash", print_chars(2400, "out-3"))]),
        Step::ToolCalls(vec![("bash", print_chars(2400, "out-4"))]),
        Step::Answer("SUMMARY-ONE: printed four blocks".into()),
        Step::Answer("All four blocks printed.".into()),
        // Second turn: the provider refuses, the loop compacts and asks again.
        Step::Error(400, overflow),
        Step::Answer("SUMMARY-TWO: printed blocks, answered".into()),
        Step::Answer("Bye.".into()),
    ])
    .await;
    env.create_session(
        "long",
        json!({"prompt": "Print four blocks.", "model": "openai/small-window",
               "llm": {"baseUrl": llm.base_url}, "sandbox": {"imagePullPolicy": "Never"}}),
    )
    .await;
    let done = env.wait_for_phase("long", "Succeeded", 2 * MINUTE).await;
    let context = done.status.as_ref().unwrap().context.clone().unwrap();
    assert_eq!((context.window, context.compactions), (5000, 1));
    assert!(context.last_compacted_at.is_some());
    env.wait_for_event("long", "Compacted", MINUTE).await;

    let requests = llm.requests();
    assert_eq!(requests.len(), 6);
    let summary_call = roles_and_contents(&requests[4].body);
    assert!(
        summary_call
            .last()
            .is_some_and(|(role, c)| role == "user" && c.contains("outgrow the context window")),
        "the fifth call asks for a summary: {summary_call:?}"
    );
    let after = roles_and_contents(&requests[5].body);
    let roles: Vec<&str> = after.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        roles,
        [
            "system",
            "user",
            "user",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant",
            "tool"
        ],
        "system prompt, task, summary, then the tail from the second call on"
    );
    assert_eq!(after[1].1, "Print four blocks.");
    assert!(after[2].1.contains("SUMMARY-ONE"), "{}", after[2].1);
    let sent: String = after.iter().map(|(_, c)| c.as_str()).collect();
    assert!(!sent.contains("out-1") && sent.contains("out-2") && sent.contains("out-4"));

    env.patch_spec("long", json!({"messages": ["Now say bye."]}))
        .await;
    let done = env
        .wait_for_session("long", 2 * MINUTE, "second turn done", |s| {
            s.status.as_ref().is_some_and(|st| {
                st.processed_messages == 1 && st.final_response.as_deref() == Some("Bye.")
            })
        })
        .await;
    assert_eq!(done.status.unwrap().context.unwrap().compactions, 2);
    let requests = llm.requests();
    assert_eq!(requests.len(), 9, "overflow, summary, the same call again");
    let retried = roles_and_contents(&requests[8].body);
    assert!(retried.iter().any(|(_, c)| c.contains("SUMMARY-TWO")));
    assert!(!retried.iter().any(|(_, c)| c.contains("out-2")));
    assert_eq!(retried.last().unwrap().1, "Now say bye.");

    // The durable history is the compacted one.
    let history = ml_intern::store::replay(&env.transcript("long").await).history;
    let stored: String = history.iter().map(|m| format!("{m:?}")).collect();
    assert!(stored.contains("SUMMARY-TWO") && !stored.contains("out-1"));
}
