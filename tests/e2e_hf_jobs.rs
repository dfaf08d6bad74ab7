//! `hf_jobs` through the controller: runs wait for approval with their estimated cost,
//! the controller follows them to the end on its own (state, metrics, cost in
//! `status.jobs`), and running ones are cancelled when the session is deleted.

mod support;

use std::time::Duration;

use serde_json::json;
use support::hf_hub::{FakeHfHub, JobPlan, USER};
use support::{E2e, E2eOptions, HF_TEST_TOKEN, ScriptedLlm, Step};

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn hf_jobs_wait_for_approval_are_followed_to_the_end_and_cancelled_with_the_session() {
    let hub = FakeHfHub::start().await;
    hub.plan_next_job(JobPlan::completes(
        &[
            "{\"metric\": \"loss\", \"value\": 0.9, \"step\": 1}",
            "{\"metric\": \"loss\", \"value\": 0.21, \"step\": 50}",
            "model saved",
        ],
        Duration::from_secs(6),
    ));
    hub.plan_next_job(JobPlan::completes(&["serving"], Duration::from_secs(3600)));
    let env = E2e::start_with(
        "hfjobs",
        E2eOptions {
            controller_args: [
                "--hf-endpoint",
                hub.url.as_str(),
                "--job-follow-interval",
                "1",
                "--hf-log-idle",
                "0.5",
            ]
            .map(str::to_string)
            .to_vec(),
            ..Default::default()
        },
    )
    .await;
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf"},
                        "stringData": {"token": HF_TEST_TOKEN}});
    assert!(env.kubectl_apply(&secret.to_string()).status.success());
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![
            (
                "hf_jobs",
                json!({"operation": "run", "script": "print('train')", "hardware_flavor": "t4-small", "timeout": "1h"}),
            ),
            (
                "hf_jobs",
                json!({"operation": "run", "command": ["python", "-m", "http.server"]}),
            ),
            (
                "hf_jobs",
                json!({"operation": "scheduled run", "command": ["python", "eval.py"], "schedule": "@daily"}),
            ),
        ]),
        Step::Answer("Both jobs are running; I will check on them later.".into()),
    ])
    .await;
    env.create_session(
        "hub-trainer",
        json!({"prompt": "Fine-tune on HF Jobs.", "model": "openai/scripted",
               "llm": {"baseUrl": llm.base_url},
               "tools": ["hf_jobs"],
               "huggingFace": {"tokenSecretRef": {"name": "hf", "key": "token"}},
               "sandbox": {"image": support::cluster::SANDBOX_IMAGE, "imagePullPolicy": "Never"}}),
    )
    .await;

    // The runs wait, each with the most it can cost (price x timeout), and the schedule.
    let waiting = env
        .wait_for_session("hub-trainer", 2 * MINUTE, "the runs to wait", |s| {
            s.status
                .as_ref()
                .is_some_and(|st| st.pending_approvals.len() == 3)
        })
        .await;
    let pending = waiting.status.unwrap().pending_approvals;
    assert_eq!(pending[0].estimated_cost_usd.as_deref(), Some("0.40"));
    assert!(
        pending[0].summary.contains("t4-small") && pending[0].summary.contains("$0.40"),
        "{}",
        pending[0].summary
    );
    assert_eq!(pending[1].estimated_cost_usd.as_deref(), Some("0.01"));
    assert!(
        hub.requests().iter().all(|r| r.method != "POST"),
        "nothing ran yet"
    );
    for (i, p) in pending.iter().enumerate() {
        let approval = json!({
            "apiVersion": "ml-intern.io/v1alpha1", "kind": "AgentApproval",
            "metadata": {"name": format!("go-{i}")},
            "spec": {"sessionName": "hub-trainer", "requestId": p.id,
                     "argumentsDigest": p.arguments_digest, "decision": "Approve"}
        });
        assert!(env.kubectl_apply(&approval.to_string()).status.success());
    }
    env.wait_for_phase("hub-trainer", "Succeeded", 2 * MINUTE)
        .await;

    // The turn is over; the controller follows the training job to its end by itself.
    let done = env
        .wait_for_session("hub-trainer", 2 * MINUTE, "the job to be followed", |s| {
            s.status.as_ref().is_some_and(|st| {
                st.jobs
                    .iter()
                    .any(|j| j.state == "Succeeded" && !j.metrics.is_empty())
            })
        })
        .await;
    let status = done.status.unwrap();
    // The approved runs ran side by side: status lists them in the order they came back.
    let flavored = |f: &str| {
        status
            .jobs
            .iter()
            .find(|j| j.flavor == f)
            .unwrap_or_else(|| panic!("a {f} job in {:#?}", status.jobs))
    };
    let (train, serve) = (flavored("t4-small"), flavored("cpu-basic"));
    assert_eq!(train.backend, "huggingface");
    assert_eq!(
        train.url.as_deref(),
        Some(format!("{}/jobs/{USER}/{}", hub.url, train.id).as_str())
    );
    let loss = &train.metrics[0];
    assert_eq!(
        (loss.name.as_str(), loss.value.as_str(), loss.step),
        ("loss", "0.21", Some(50))
    );
    assert_eq!(train.usd_per_hour.as_deref(), Some("0.4"));
    assert_eq!(serve.state, "Running");
    let schedule = &status.schedules[0];
    assert_eq!(
        (schedule.schedule.as_str(), schedule.namespace.as_deref()),
        ("@daily", Some(USER))
    );
    assert!(status.jobs_cost_usd.is_some());
    let shown = serde_json::to_string(&status).unwrap();
    assert!(
        !shown.contains(HF_TEST_TOKEN),
        "the token stays out of status"
    );

    // Deleting the session cancels the job still running, not the finished one.
    env.sessions()
        .delete("hub-trainer", &Default::default())
        .await
        .unwrap();
    let cancel = format!("/api/jobs/{USER}/{}/cancel", serve.id);
    hub.wait_for_request("POST", &cancel, MINUTE).await;
    assert_eq!(hub.stage(&serve.id).as_deref(), Some("CANCELED"));
    // And deletes its schedule.
    let delete = format!("/api/scheduled-jobs/{USER}/{}", schedule.id);
    hub.wait_for_request("DELETE", &delete, MINUTE).await;
    let finished_cancel = format!("/api/jobs/{USER}/{}/cancel", train.id);
    assert!(hub.requests_to("POST", &finished_cancel).is_empty());
}
