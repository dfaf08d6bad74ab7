//! Approvals on the real cluster: gated calls wait in status.pendingApprovals, AgentApproval
//! objects decide them, RBAC decides who may.

mod support;

use std::time::Duration;

use ml_intern::api::AgentApproval;
use ml_intern::api::session::PendingApproval;
use serde_json::{Value, json};
use support::{E2e, ScriptedLlm, Step, tool_results};

const MINUTE: Duration = Duration::from_secs(60);

/// Waits until the session waits for approval and returns its first pending request.
async fn pending(env: &E2e, session: &str) -> PendingApproval {
    let s = env
        .wait_for_session(session, 2 * MINUTE, "a pending approval", |s| {
            s.status.as_ref().is_some_and(|st| {
                !st.pending_approvals.is_empty()
                    && st
                        .phase
                        .is_some_and(|p| format!("{p:?}") == "WaitingForApproval")
            })
        })
        .await;
    s.status.unwrap().pending_approvals.remove(0)
}

fn approval(
    name: &str,
    session: &str,
    request: &str,
    digest: &str,
    decision: &str,
    feedback: &str,
) -> String {
    json!({
        "apiVersion": "ml-intern.io/v1alpha1", "kind": "AgentApproval",
        "metadata": {"name": name},
        "spec": {"sessionName": session, "requestId": request, "argumentsDigest": digest,
                 "decision": decision, "feedback": feedback}
    })
    .to_string()
}

/// Grants `user` the ClusterRole `role` in the test namespace.
fn bind(env: &E2e, user: &str, role: &str) {
    let out = env.kubectl(&[
        "create",
        "rolebinding",
        &format!("{user}-{role}"),
        &format!("--clusterrole={role}"),
        &format!("--user={user}"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Applies a decision as `user` (the test's admin when None); it must be accepted.
fn decide(env: &E2e, user: Option<&str>, manifest: &str) {
    let out = env.kubectl_apply_as(user, manifest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn wait_for_approval_phase(env: &E2e, name: &str, phase: &str) -> AgentApproval {
    let api: kube::Api<AgentApproval> = kube::Api::namespaced(env.client.clone(), &env.namespace);
    let deadline = tokio::time::Instant::now() + MINUTE;
    loop {
        let a = api.get(name).await.expect("the approval");
        let now = a
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .map(|p| format!("{p:?}"));
        if now.as_deref() == Some(phase) {
            return a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "approval {name} did not reach {phase}: {:?}\n{}",
            a.status,
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_gated_call_waits_for_an_approver_while_the_others_run() {
    let env = E2e::start("approve").await;
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![
            ("write", json!({"path": "plan.txt", "content": "gated"})),
            ("bash", json!({"command": "echo auto-ran"})),
        ]),
        Step::ToolCalls(vec![(
            "write",
            json!({"path": "second.txt", "content": "x"}),
        )]),
        Step::Answer("done".into()),
    ])
    .await;
    for (user, role) in [("bob", "ml-intern-editor"), ("alice", "ml-intern-approver")] {
        bind(&env, user, role);
    }
    env.create_session(
        "gated",
        json!({"prompt": "Write a plan.", "model": "openai/scripted",
               "llm": {"baseUrl": llm.base_url}, "sandbox": {"imagePullPolicy": "Never"},
               "approvalPolicy": {"gatedTools": ["write"]}}),
    )
    .await;
    let first = pending(&env, "gated").await;
    assert_eq!(first.tool, "write");
    assert!(first.summary.contains("plan.txt"), "{}", first.summary);
    assert_eq!(first.arguments_digest.len(), 64);
    assert!(first.arguments.contains("gated"));
    env.wait_for_event("gated", "ApprovalRequested", MINUTE)
        .await;
    assert_eq!(llm.requests().len(), 1, "nothing more runs while it waits");

    // An editor may run sessions but not approve them.
    let denied = env.kubectl_apply_as(
        Some("bob"),
        &approval(
            "by-bob",
            "gated",
            &first.id,
            &first.arguments_digest,
            "Approve",
            "",
        ),
    );
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    // A decision about other arguments is refused.
    decide(
        &env,
        Some("alice"),
        &approval(
            "wrong-digest",
            "gated",
            &first.id,
            &"0".repeat(64),
            "Approve",
            "",
        ),
    );
    let refused = wait_for_approval_phase(&env, "wrong-digest", "Refused").await;
    assert_eq!(
        refused.status.unwrap().conditions[0].reason,
        "DigestMismatch"
    );
    assert_eq!(llm.requests().len(), 1);

    decide(
        &env,
        Some("alice"),
        // The approver edits what gets written; the digest is still the original's.
        &json!({
            "apiVersion": "ml-intern.io/v1alpha1", "kind": "AgentApproval",
            "metadata": {"name": "go"},
            "spec": {"sessionName": "gated", "requestId": first.id,
                     "argumentsDigest": first.arguments_digest, "decision": "Approve",
                     "editedArguments": {"path": "plan.txt", "content": "edited"}}
        })
        .to_string(),
    );
    let second = env
        .wait_for_session("gated", 2 * MINUTE, "the second request", |s| {
            s.status.as_ref().is_some_and(|st| {
                st.pending_approvals
                    .first()
                    .is_some_and(|p| p.arguments.contains("second.txt"))
            })
        })
        .await
        .status
        .unwrap()
        .pending_approvals
        .remove(0);
    let applied = wait_for_approval_phase(&env, "go", "Applied").await;
    let owner = &applied.metadata.owner_references.unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("AgentSession", "gated")
    );
    let results = tool_results(&llm.requests()[1].body);
    assert_eq!(
        results,
        [
            "auto-ran\n",
            "[Note: the approver edited the arguments before the call ran; the result is for the edited call.]\nWrote 6 bytes (1 lines) to /workspace/plan.txt."
        ],
        "the auto call ran at once, the approved one after the decision"
    );

    decide(
        &env,
        Some("alice"),
        &approval(
            "no",
            "gated",
            &second.id,
            &second.arguments_digest,
            "Reject",
            "not now, use /tmp",
        ),
    );
    let done = env.wait_for_phase("gated", "Succeeded", 2 * MINUTE).await;
    let results = tool_results(&llm.requests()[2].body);
    assert_eq!(
        results.last().unwrap(),
        "Tool call rejected; it did not run. User feedback: not now, use /tmp"
    );
    let status = done.status.unwrap();
    assert!(status.pending_approvals.is_empty());
    let outcomes: Vec<&str> = status
        .approval_history
        .iter()
        .map(|r| r.outcome.as_str())
        .collect();
    assert_eq!(outcomes, ["Approved", "Rejected"]);
    assert!(status.approval_history[0].edited);
}

#[tokio::test]
async fn timeouts_reject_or_suspend_and_a_restarted_controller_still_applies_decisions() {
    let mut env = E2e::start("approvaltimeout").await;
    let script = || {
        vec![
            Step::ToolCalls(vec![("write", json!({"path": "a.txt", "content": "a"}))]),
            Step::Answer("finished".into()),
        ]
    };
    let (rejecting, suspending, restarted) = (
        ScriptedLlm::start(script()).await,
        ScriptedLlm::start(script()).await,
        ScriptedLlm::start(script()).await,
    );
    let session = |llm: &ScriptedLlm, policy: Value| {
        json!({"prompt": "Write.", "model": "openai/scripted",
               "llm": {"baseUrl": llm.base_url}, "sandbox": {"imagePullPolicy": "Never"},
               "approvalPolicy": policy})
    };
    env.create_session(
        "rejects",
        session(
            &rejecting,
            json!({"gatedTools": ["write"], "timeoutSeconds": 3}),
        ),
    )
    .await;
    env.create_session(
        "suspends",
        session(
            &suspending,
            json!({"gatedTools": ["write"], "timeoutSeconds": 3, "onTimeout": "Suspend"}),
        ),
    )
    .await;
    env.create_session(
        "survives",
        session(&restarted, json!({"gatedTools": ["write"]})),
    )
    .await;

    // onTimeout Reject: the model is told and the turn goes on.
    let done = env.wait_for_phase("rejects", "Succeeded", 2 * MINUTE).await;
    assert_eq!(done.status.unwrap().approval_history[0].outcome, "TimedOut");
    let results = tool_results(&rejecting.requests()[1].body);
    assert!(
        results[0].contains("nobody decided within 3s"),
        "{results:?}"
    );

    // onTimeout Suspend: the session stops; a late decision still resumes it.
    let suspended = env
        .wait_for_phase("suspends", "Suspended", 2 * MINUTE)
        .await;
    let request = suspended.status.unwrap().pending_approvals.remove(0);
    env.wait_for_event("suspends", "ApprovalTimedOut", MINUTE)
        .await;
    decide(
        &env,
        None,
        &approval(
            "late",
            "suspends",
            &request.id,
            &request.arguments_digest,
            "Approve",
            "",
        ),
    );
    env.wait_for_phase("suspends", "Succeeded", 2 * MINUTE)
        .await;
    assert_eq!(suspending.requests().len(), 2);

    // The controller goes away while a session waits; the decision lands meanwhile.
    let request = pending(&env, "survives").await;
    env.stop_controller();
    decide(
        &env,
        None,
        &approval(
            "while-away",
            "survives",
            &request.id,
            &request.arguments_digest,
            "Approve",
            "",
        ),
    );
    env.start_controller().await;
    env.wait_for_phase("survives", "Succeeded", 2 * MINUTE)
        .await;
    let results = tool_results(&restarted.requests()[1].body);
    assert_eq!(results, ["Wrote 1 bytes (1 lines) to /workspace/a.txt."]);
}

#[tokio::test]
async fn a_session_deleted_while_waiting_leaves_nothing_behind() {
    let env = E2e::start("approvaldelete").await;
    let llm = ScriptedLlm::start(vec![Step::ToolCalls(vec![(
        "write",
        json!({"path": "a.txt", "content": "a"}),
    )])])
    .await;
    env.create_session(
        "abandoned",
        json!({"prompt": "Write.", "model": "openai/scripted",
               "llm": {"baseUrl": llm.base_url}, "sandbox": {"imagePullPolicy": "Never"},
               "approvalPolicy": {"gatedTools": ["write"]}}),
    )
    .await;
    let request = pending(&env, "abandoned").await;
    // A decision for another request: refused, but still the session's.
    decide(
        &env,
        None,
        &approval(
            "stray",
            "abandoned",
            "req-000000000000",
            &request.arguments_digest,
            "Approve",
            "",
        ),
    );
    env.sessions()
        .delete("abandoned", &Default::default())
        .await
        .unwrap();
    env.wait_for_deletion(env.sessions(), "abandoned", MINUTE)
        .await;
    let approvals: kube::Api<AgentApproval> =
        kube::Api::namespaced(env.client.clone(), &env.namespace);
    env.wait_for_deletion(approvals, "stray", MINUTE).await;
    env.wait_for_deletion_requested(env.pods(), "abandoned-sandbox", MINUTE)
        .await;
}

#[tokio::test]
async fn the_webhook_records_who_decides_forbids_self_approval_and_freezes_decisions() {
    let env = E2e::start_with(
        "webhook",
        support::E2eOptions {
            webhook: true,
            ..Default::default()
        },
    )
    .await;
    for (user, role) in [
        ("alice", "ml-intern-editor"),
        ("alice", "ml-intern-approver"),
        ("bob", "ml-intern-approver"),
    ] {
        bind(&env, user, role);
    }
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![("write", json!({"path": "a.txt", "content": "a"}))]),
        Step::Answer("done".into()),
    ])
    .await;
    // Alice starts the session, claiming in vain to be someone else.
    let session = json!({
        "apiVersion": "ml-intern.io/v1alpha1", "kind": "AgentSession",
        "metadata": {"name": "alices", "annotations": {"ml-intern.io/requested-by": "mallory"}},
        "spec": {"prompt": "Write.", "model": "openai/scripted", "llm": {"baseUrl": llm.base_url},
                 "sandbox": {"imagePullPolicy": "Never"},
                 "approvalPolicy": {"gatedTools": ["write"], "forbidSelfApproval": true}}
    });
    decide(&env, Some("alice"), &session.to_string());
    let created = env.sessions().get("alices").await.unwrap();
    assert_eq!(
        created.metadata.annotations.unwrap()["ml-intern.io/requested-by"],
        "alice"
    );
    let request = pending(&env, "alices").await;

    let own = env.kubectl_apply_as(
        Some("alice"),
        &approval(
            "self",
            "alices",
            &request.id,
            &request.arguments_digest,
            "Approve",
            "",
        ),
    );
    assert!(!own.status.success());
    assert!(
        String::from_utf8_lossy(&own.stderr).contains("forbidSelfApproval"),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );

    decide(
        &env,
        Some("bob"),
        &approval(
            "by-bob",
            "alices",
            &request.id,
            &request.arguments_digest,
            "Approve",
            "",
        ),
    );
    let done = env.wait_for_phase("alices", "Succeeded", 2 * MINUTE).await;
    let record = &done.status.unwrap().approval_history[0];
    assert_eq!(record.decided_by.as_deref(), Some("bob"));

    // A decision is final, and nobody rewrites who made it (not even an admin).
    let flip = env.kubectl(&[
        "patch",
        "agentapproval",
        "by-bob",
        "--type=merge",
        "-p",
        r#"{"spec":{"decision":"Reject"}}"#,
    ]);
    assert!(!flip.status.success());
    assert!(String::from_utf8_lossy(&flip.stderr).contains("cannot change once made"));
    let forge = env.kubectl(&[
        "annotate",
        "--overwrite",
        "agentsession",
        "alices",
        "ml-intern.io/requested-by=carol",
    ]);
    assert!(!forge.status.success());
    assert!(String::from_utf8_lossy(&forge.stderr).contains("cannot change"));
}

#[tokio::test]
async fn a_budgeted_session_pauses_at_its_cap_and_goes_on_only_when_allowed_more() {
    // Each scripted call is 100 prompt tokens: $1 a call at $10,000 per million.
    let env = E2e::start_with(
        "budgeted",
        support::E2eOptions {
            model_config: Some(
                "models:\n  - match: \"openai/dear\"\n    \
                 price: {inputPerMillion: 10000, outputPerMillion: 0}\n"
                    .into(),
            ),
            ..Default::default()
        },
    )
    .await;
    let echo = |n: u32| Step::ToolCalls(vec![("bash", json!({"command": format!("echo {n}")}))]);
    let llm = ScriptedLlm::start(vec![echo(1), echo(2), echo(3), echo(4)]).await;
    env.create_session(
        "capped",
        json!({"prompt": "Spend.", "model": "openai/dear", "llm": {"baseUrl": llm.base_url},
               "sandbox": {"imagePullPolicy": "Never"},
               "approvalPolicy": {"mode": "Budgeted", "autoApproveUpToUsd": "1.5",
                                  "budgetStepUsd": "1"}}),
    )
    .await;
    let pause = pending(&env, "capped").await;
    assert_eq!(pause.tool, "budget");
    assert!(
        pause.summary.contains("$2.0000") && pause.summary.contains("$1.50"),
        "{}",
        pause.summary
    );
    assert_eq!(llm.requests().len(), 2, "no call past the cap");
    decide(
        &env,
        None,
        &approval(
            "more",
            "capped",
            &pause.id,
            &pause.arguments_digest,
            "Approve",
            "",
        ),
    );
    let again = env
        .wait_for_session("capped", 2 * MINUTE, "the second pause", |s| {
            s.status.as_ref().is_some_and(|st| {
                st.pending_approvals
                    .first()
                    .is_some_and(|p| p.summary.contains("$3.0000"))
            })
        })
        .await;
    assert_eq!(
        again
            .status
            .as_ref()
            .unwrap()
            .auto_approval_cap_usd
            .as_deref(),
        Some("2.50")
    );
    assert_eq!(llm.requests().len(), 3, "one more call was allowed");
    let second = again.status.unwrap().pending_approvals.remove(0);
    decide(
        &env,
        None,
        &approval(
            "enough",
            "capped",
            &second.id,
            &second.arguments_digest,
            "Reject",
            "stop here",
        ),
    );
    let failed = env.wait_for_phase("capped", "Failed", MINUTE).await;
    let c = failed
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Failed")
        .unwrap();
    assert_eq!(c.reason, "BudgetPauseRejected");
    assert!(c.message.contains("stop here"), "{}", c.message);
    assert_eq!(llm.requests().len(), 3);
}
