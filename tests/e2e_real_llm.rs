//! One session against a model server nobody here wrote: llama.cpp (through the xllamacpp
//! wheel) serving Qwen2.5-Coder-0.5B, started by tests/run.sh. Assertions are about
//! structure, not wording.

mod support;

use std::time::Duration;

use serde_json::json;
use support::E2e;

#[tokio::test]
async fn a_real_model_calls_bash_in_the_sandbox_and_answers() {
    let url = std::env::var("ML_INTERN_E2E_LLM_URL").expect(
        "ML_INTERN_E2E_LLM_URL must name the llama.cpp server: run the tests with tests/run.sh",
    );
    let env = E2e::start("real-llm").await;
    env.create_session(
        "qwen",
        json!({
            "prompt": "Use the bash tool to run the command `echo sandbox-says-hello` and tell me what it printed.",
            "model": "openai/qwen2.5-coder-0.5b",
            "llm": {"baseUrl": url, "maxTokens": 96, "temperature": 0.0},
            "maxIterations": 4,
            // A 0.5B model follows one tool's schema reliably, not seven.
            "tools": ["bash"],
            "sandbox": {"imagePullPolicy": "Never"}
        }),
    )
    .await;
    // CPU inference on 2 cores: generous, but bounded.
    let done = env
        .wait_for_session(
            "qwen",
            Duration::from_secs(300),
            "Succeeded or Failed",
            |s| {
                s.status
                    .as_ref()
                    .and_then(|st| st.phase)
                    .is_some_and(|p| p.is_terminal())
            },
        )
        .await;
    let status = done.status.clone().unwrap();
    assert_eq!(
        status.phase,
        Some(ml_intern::api::SessionPhase::Succeeded),
        "{status:#?}\n{}",
        env.log_tail()
    );
    assert!(
        status.tool_calls >= 1,
        "the model called a tool: {status:#?}"
    );
    assert!(
        status.iterations >= 2,
        "a tool round trip and an answer: {status:#?}"
    );
    let answer = status.final_response.unwrap_or_default();
    assert!(!answer.trim().is_empty(), "the final answer is not empty");
    let usage = status.usage.expect("llama.cpp reports usage");
    assert!(usage.prompt_tokens > 0 && usage.completion_tokens > 0);
    let events = env.events_for("qwen").await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("ToolCalled")
                && e.note.as_deref().is_some_and(|n| n.starts_with("bash: "))),
        "a bash call is recorded: {:?}",
        events
            .iter()
            .map(|e| (&e.reason, &e.note))
            .collect::<Vec<_>>()
    );
}
