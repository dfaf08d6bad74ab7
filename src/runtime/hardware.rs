//! Hardware presets a sandbox can be given (`spec.sandbox.hardware`, the `sandbox_create`
//! tool), from a YAML file (`configs/controller/sandbox-hardware.yaml`, built in).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use serde::Deserialize;

pub const BUILTIN: &str = include_str!("../../configs/controller/sandbox-hardware.yaml");

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Preset {
    #[serde(default)]
    pub description: String,
    pub resources: ResourceRequirements,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// What an hour on this hardware costs (the platform's chargeback), so jobs get a cost
    /// estimate for approvals and budgets; unpriced presets have none.
    #[serde(default)]
    pub usd_per_hour: Option<f64>,
}

impl Preset {
    /// Asks for an accelerator: the kind of sandbox a human should approve.
    pub fn has_gpu(&self) -> bool {
        [&self.resources.limits, &self.resources.requests]
            .into_iter()
            .flatten()
            .any(|m| m.keys().any(|k| k.ends_with("/gpu")))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HardwarePresets {
    #[serde(default)]
    pub default: Option<String>,
    #[serde(default)]
    pub presets: BTreeMap<String, Preset>,
}

impl HardwarePresets {
    pub fn parse(yaml: &str) -> Result<Self, String> {
        let parsed: HardwarePresets = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        if let Some(d) = &parsed.default
            && !parsed.presets.contains_key(d)
        {
            return Err(format!("default preset {d:?} is not among the presets"));
        }
        Ok(parsed)
    }

    pub fn builtin() -> Self {
        // The shipped file is checked by a unit test.
        Self::parse(BUILTIN).unwrap_or_default()
    }

    pub fn get(&self, name: &str) -> Option<&Preset> {
        self.presets.get(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.presets.keys().cloned().collect()
    }
}

/// The session's sandbox pod as `sandbox_create` sees it: switching a preset rebuilds the
/// pod from the session's settings with the preset applied.
pub struct PodHardware {
    pub pod: std::sync::Arc<super::SandboxPod>,
    pub presets: std::sync::Arc<HardwarePresets>,
    /// The session's settings without a preset.
    pub base: super::SandboxSettings,
    pub template:
        Box<dyn Fn(&super::SandboxSettings) -> k8s_openapi::api::core::v1::Pod + Send + Sync>,
    pub current: std::sync::Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl crate::tools::sandbox_create::SandboxHardware for PodHardware {
    fn choices(&self) -> Vec<(String, String)> {
        self.presets
            .presets
            .iter()
            .map(|(n, p)| (n.clone(), p.description.clone()))
            .collect()
    }

    fn current(&self) -> Option<String> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    async fn switch(&self, preset: &str) -> Result<(), crate::tools::ToolFailure> {
        let Some(p) = self.presets.get(preset) else {
            return Err(crate::tools::ToolFailure {
                reason: "UnknownHardware".into(),
                message: format!("hardware preset {preset:?} is not configured"),
            });
        };
        let settings = self.base.clone().with_preset(p);
        self.pod.replace((self.template)(&settings)).await?;
        if let Ok(mut c) = self.current.lock() {
            *c = Some(preset.to_string());
        }
        Ok(())
    }

    fn pod_name(&self) -> String {
        self.pod.name().to_string()
    }

    fn workspace_note(&self) -> &'static str {
        if self.pod.has_persistent_workspace() {
            "/workspace is a PersistentVolumeClaim and was kept"
        } else {
            "/workspace was not persistent and is empty again"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_presets_parse_and_gpus_are_recognised() {
        let p = HardwarePresets::parse(BUILTIN).unwrap();
        assert!(p.names().contains(&"cpu-basic".to_string()));
        assert!(!p.get("cpu-basic").unwrap().has_gpu());
        let gpu = p.get("gpu-small").unwrap();
        assert!(gpu.has_gpu());
        assert_eq!(gpu.tolerations[0].key.as_deref(), Some("nvidia.com/gpu"));
    }

    #[test]
    fn a_default_that_is_not_a_preset_is_refused() {
        let e = HardwarePresets::parse("default: huge\npresets: {}\n").unwrap_err();
        assert!(e.contains("huge"), "{e}");
    }
}
