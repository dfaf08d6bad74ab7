//! `sandbox_create`: the agent asks for a sandbox on given hardware (ml-intern's tool, with
//! the presets the platform configured instead of Hugging Face Space tiers).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Tool, ToolFailure, ToolOutput};
use crate::agent::ChatMessage;
use crate::llm::ToolSpec;

pub const SANDBOX_CREATE_TOOL: &str = "sandbox_create";

/// What the tool reports after a switch; the first words are what `chosen_hardware` reads.
const CREATED: &str = "Sandbox created:";
const ACTIVE: &str = "Sandbox already active:";

/// The session's sandbox as a thing whose hardware can change.
#[async_trait]
pub trait SandboxHardware: Send + Sync {
    /// Presets: (name, description).
    fn choices(&self) -> Vec<(String, String)>;
    /// The preset the sandbox has now, if any.
    fn current(&self) -> Option<String>;
    /// Starts the sandbox on `preset`, replacing a pod on other hardware.
    async fn switch(&self, preset: &str) -> Result<(), ToolFailure>;
    fn pod_name(&self) -> String;
    /// What a replaced pod leaves of the workspace, in words.
    fn workspace_note(&self) -> &'static str;
}

pub struct SandboxCreateTool(pub Arc<dyn SandboxHardware>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    #[serde(default)]
    hardware: Option<String>,
}

#[async_trait]
impl Tool for SandboxCreateTool {
    fn spec(&self) -> ToolSpec {
        let choices = self.0.choices();
        let listed: Vec<String> = choices.iter().map(|(n, d)| format!("{n} ({d})")).collect();
        ToolSpec {
            name: SANDBOX_CREATE_TOOL.into(),
            description: format!(
                "Run the sandbox on other hardware, e.g. a GPU for training. The sandbox \
                 exists already (bash, read, write and edit start it); call this only to \
                 change its hardware. Changing it replaces the sandbox pod: running processes \
                 stop, and files outside a persistent /workspace are lost. Choices: {}.",
                listed.join(", ")
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "hardware": {
                        "type": "string",
                        "enum": choices.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
                        "description": "The hardware preset."
                    }
                },
                "additionalProperties": false
            }),
        }
    }

    async fn call(&self, arguments: Value) -> Result<ToolOutput, ToolFailure> {
        let args: Args = match Args::deserialize(&arguments) {
            Ok(a) => a,
            Err(e) => {
                return Ok(ToolOutput::error(format!(
                    "ERROR: invalid arguments for sandbox_create: {e}."
                )));
            }
        };
        let choices = self.0.choices();
        let Some(wanted) = args
            .hardware
            .or_else(|| self.0.current())
            .or_else(|| choices.first().map(|(n, _)| n.clone()))
        else {
            return Ok(ToolOutput::error(
                "ERROR: this cluster offers no hardware presets; the sandbox you have is the one there is.",
            ));
        };
        let Some((_, description)) = choices.iter().find(|(n, _)| *n == wanted) else {
            return Ok(ToolOutput::error(format!(
                "ERROR: unknown hardware {wanted:?}; choose one of: {}.",
                choices
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let pod = self.0.pod_name();
        if self.0.current().as_deref() == Some(wanted.as_str()) {
            return Ok(ToolOutput::ok(format!(
                "{ACTIVE} {pod}\nHardware: {wanted} ({description})"
            )));
        }
        self.0.switch(&wanted).await?;
        Ok(ToolOutput::ok(format!(
            "{CREATED} {pod}\nHardware: {wanted} ({description})\nThe previous pod was replaced; {}.",
            self.0.workspace_note()
        )))
    }
}

/// The preset the agent last switched to successfully, read back from the conversation so
/// it holds across turns and restarts.
pub fn chosen_hardware(history: &[ChatMessage]) -> Option<String> {
    let mut chosen = None;
    for (i, m) in history.iter().enumerate() {
        let ChatMessage::Assistant { tool_calls, .. } = m else {
            continue;
        };
        for call in tool_calls.iter().filter(|c| c.name == SANDBOX_CREATE_TOOL) {
            let succeeded = history[i + 1..].iter().any(|r| {
                matches!(r, ChatMessage::Tool { tool_call_id, content, .. }
                    if *tool_call_id == call.id
                        && (content.starts_with(CREATED) || content.starts_with(ACTIVE)))
            });
            let hardware = serde_json::from_str::<Value>(&call.arguments)
                .ok()
                .and_then(|a| a["hardware"].as_str().map(str::to_string));
            if succeeded && hardware.is_some() {
                chosen = hardware;
            }
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::ToolCall;
    use std::sync::Mutex;

    struct Fake {
        current: Mutex<Option<String>>,
        switches: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl SandboxHardware for Fake {
        fn choices(&self) -> Vec<(String, String)> {
            vec![
                ("cpu-basic".into(), "2 vCPU".into()),
                ("gpu-small".into(), "1 GPU".into()),
            ]
        }
        fn current(&self) -> Option<String> {
            self.current.lock().unwrap().clone()
        }
        async fn switch(&self, preset: &str) -> Result<(), ToolFailure> {
            self.switches.lock().unwrap().push(preset.into());
            *self.current.lock().unwrap() = Some(preset.into());
            Ok(())
        }
        fn pod_name(&self) -> String {
            "s-sandbox".into()
        }
        fn workspace_note(&self) -> &'static str {
            "/workspace was lost"
        }
    }

    #[tokio::test]
    async fn switching_replaces_the_pod_once_and_unknown_hardware_is_named() {
        let fake = Arc::new(Fake {
            current: Mutex::new(Some("cpu-basic".into())),
            switches: Mutex::new(vec![]),
        });
        let tool = SandboxCreateTool(fake.clone());
        let same = tool.call(json!({})).await.unwrap();
        assert!(
            same.content
                .starts_with("Sandbox already active: s-sandbox")
        );
        let gpu = tool.call(json!({"hardware": "gpu-small"})).await.unwrap();
        assert!(
            gpu.content
                .starts_with("Sandbox created: s-sandbox\nHardware: gpu-small (1 GPU)")
        );
        let again = tool.call(json!({"hardware": "gpu-small"})).await.unwrap();
        assert!(again.content.starts_with(ACTIVE));
        assert_eq!(*fake.switches.lock().unwrap(), ["gpu-small"]);
        let bad = tool.call(json!({"hardware": "a100x8"})).await.unwrap();
        assert!(!bad.success && bad.content.contains("cpu-basic, gpu-small"));
        assert_eq!(
            tool.spec().parameters["properties"]["hardware"]["enum"][1],
            "gpu-small"
        );
    }

    #[test]
    fn the_chosen_hardware_is_the_last_successful_switch() {
        let call = |id: &str, hw: &str| ChatMessage::Assistant {
            content: None,
            tool_calls: vec![ToolCall {
                id: id.into(),
                name: SANDBOX_CREATE_TOOL.into(),
                arguments: json!({"hardware": hw}).to_string(),
            }],
        };
        let result = |id: &str, text: &str| ChatMessage::Tool {
            tool_call_id: id.into(),
            name: SANDBOX_CREATE_TOOL.into(),
            content: text.into(),
        };
        let history = vec![
            ChatMessage::user("train"),
            call("a", "gpu-small"),
            result("a", "Sandbox created: p\nHardware: gpu-small"),
            call("b", "gpu-large"),
            result("b", "ERROR: unknown hardware"),
        ];
        assert_eq!(chosen_hardware(&history).as_deref(), Some("gpu-small"));
        assert_eq!(chosen_hardware(&history[..1]), None);
    }
}
