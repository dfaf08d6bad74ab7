//! The runtime tools (bash, read, write, edit) in a real sandbox pod on the local cluster.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{E2e, ScriptedLlm, Step};

const MINUTE: Duration = Duration::from_secs(60);

/// The tool results of the last request, in order.
fn tool_results(request: &Value) -> Vec<String> {
    request["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn read_write_edit_and_bash_keep_their_contracts_in_a_real_pod() {
    let env = E2e::start("filetools").await;
    let long_line = "λ".repeat(5000);
    let content = format!("first: ünïcödé ✓\n{long_line}\ntarget line\ndup\ndup\nlast\n");
    let llm = ScriptedLlm::start(vec![
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "printf 'original\\n' > made.txt; printf 'a\\0b' > blob.bin"}),
        )]),
        Step::ToolCalls(vec![("write", json!({"path": "made.txt", "content": "x"}))]),
        Step::ToolCalls(vec![(
            "write",
            json!({"path": "notes/ünï.txt", "content": content}),
        )]),
        Step::ToolCalls(vec![(
            "edit",
            json!({"path": "/workspace/notes/ünï.txt", "old_str": "target line", "new_str": "edited → ✓"}),
        )]),
        Step::ToolCalls(vec![(
            "edit",
            json!({"path": "notes/ünï.txt", "old_str": "dup", "new_str": "x"}),
        )]),
        Step::ToolCalls(vec![("read", json!({"path": "notes/ünï.txt"}))]),
        Step::ToolCalls(vec![
            ("read", json!({"path": "notes/ünï.txt", "offset": 3, "limit": 2})),
            ("read", json!({"path": "blob.bin"})),
            ("read", json!({"path": "/workspace"})),
            ("read", json!({"path": "missing.txt"})),
        ]),
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "head -c 1000000 /dev/zero | tr '\\0' y; echo; echo END-OF-OUTPUT"}),
        )]),
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "sleep 300 & sleep 301; echo never", "timeout": 2}),
        )]),
        Step::ToolCalls(vec![(
            "bash",
            json!({"command": "ps -o args | grep -x 'sleep 30[01]' || echo no-sleep-left; cat made.txt; wc -c < $(ls /tmp/bash_output_*.txt)"}),
        )]),
        Step::Answer("done".into()),
    ])
    .await;
    env.create_session(
        "files",
        json!({"prompt": "Work with files.", "model": "openai/scripted",
               "llm": {"baseUrl": llm.base_url}, "sandbox": {"imagePullPolicy": "Never"}}),
    )
    .await;
    env.wait_for_phase("files", "Succeeded", 3 * MINUTE).await;
    let requests = llm.requests();
    let results = tool_results(&requests.last().unwrap().body);
    assert_eq!(results.len(), 13, "{results:#?}");

    assert!(
        results[1].contains("exists and was not read in this session"),
        "a file the model never read is not overwritten: {}",
        results[1]
    );
    assert_eq!(
        results[2],
        format!(
            "Wrote {} bytes (6 lines) to /workspace/notes/ünï.txt.",
            content.len()
        )
    );
    assert!(
        results[3].starts_with("Edited /workspace/notes/ünï.txt: replaced 1 occurrence (line 3)"),
        "{}",
        results[3]
    );
    assert!(
        results[4].contains("occurs 2 times") && results[4].contains("lines 4, 5"),
        "{}",
        results[4]
    );
    let cut_line: String = long_line.chars().take(4000).collect();
    assert_eq!(
        results[5],
        format!(
            "     1\tfirst: ünïcödé ✓\n     2\t{cut_line}...\n     3\tedited → ✓\n     4\tdup\n     5\tdup\n     6\tlast\n"
        )
    );
    assert_eq!(
        results[6],
        "     3\tedited → ✓\n     4\tdup\n\n(showing lines 3-4; more follow: read again with offset=5)\n"
    );
    assert!(results[7].contains("binary file"), "{}", results[7]);
    assert!(results[8].contains("is a directory"), "{}", results[8]);
    assert_eq!(results[9], "ERROR: /workspace/missing.txt does not exist.");

    let big = &results[10];
    assert!(
        big.contains("characters omitted") && big.contains("END-OF-OUTPUT"),
        "a 1 MB output is cut to its head and tail"
    );
    assert!(big.len() < 30_000, "{} bytes reached the model", big.len());
    let saved = big
        .split_whitespace()
        .find(|w| w.starts_with("/tmp/bash_output_"))
        .expect("the path of the full output")
        .trim_end_matches('.');
    assert!(
        results[11].contains("timed out after 2s"),
        "{}",
        results[11]
    );
    let last: Vec<&str> = results[12].lines().map(str::trim).collect();
    assert_eq!(
        last[..2],
        ["no-sleep-left", "original"],
        "the timed-out command's whole process group was stopped"
    );
    assert_eq!(last[2], "1000015", "all of {saved} was saved in the pod");
}
