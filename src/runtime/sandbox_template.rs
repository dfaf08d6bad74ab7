//! The sandbox pod's spec: a long-sleeping container that commands are exec'd into,
//! hardened by default.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, Pod, PodSecurityContext, PodSpec,
    ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::{MANAGED_BY_LABEL, SESSION_LABEL};
use crate::tools::bash::DEFAULT_WORK_DIR;

/// The fixed non-root user commands run as (the uid ml-intern's sandbox image uses).
pub const SANDBOX_UID: i64 = 1000;
pub const SANDBOX_CONTAINER: &str = "sandbox";

/// Keeps the container alive until it is told to stop. A plain `sleep` as PID 1 ignores
/// SIGTERM, which would make every sandbox deletion wait out the grace period.
const KEEP_ALIVE: &str = "trap 'exit 0' TERM INT; while true; do sleep 3600 & wait $!; done";

/// What a sandbox pod is made of, after session spec and controller defaults are merged.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxSettings {
    pub image: String,
    pub image_pull_policy: Option<String>,
    pub resources: ResourceRequirements,
    pub env: Vec<EnvVar>,
}

/// Pod name of a session's sandbox.
pub fn sandbox_pod_name(session: &str) -> String {
    format!("{session}-sandbox")
}

/// A label value (at most 63 characters, alphanumeric at both ends) standing for `name`.
pub fn label_value(name: &str) -> String {
    let cut: String = name.chars().take(63).collect();
    cut.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

pub fn default_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), q("100m")),
            ("memory".to_string(), q("256Mi")),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_string(), q("2")),
            ("memory".to_string(), q("4Gi")),
        ])),
        ..Default::default()
    }
}

pub fn sandbox_pod(
    session: &str,
    namespace: &str,
    owner: OwnerReference,
    settings: &SandboxSettings,
) -> Pod {
    let mut env = settings.env.clone();
    // A uid without a passwd entry gets HOME=/, which it cannot write to; tools that keep
    // caches in ~ (pip, huggingface_hub) need somewhere writable.
    if !env.iter().any(|e| e.name == "HOME") {
        env.push(EnvVar {
            name: "HOME".into(),
            value: Some(DEFAULT_WORK_DIR.into()),
            ..Default::default()
        });
    }
    let labels = BTreeMap::from([
        (
            MANAGED_BY_LABEL.0.to_string(),
            MANAGED_BY_LABEL.1.to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            "sandbox".to_string(),
        ),
        (SESSION_LABEL.to_string(), label_value(session)),
    ]);
    Pod {
        metadata: ObjectMeta {
            name: Some(sandbox_pod_name(session)),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            restart_policy: Some("Always".into()),
            termination_grace_period_seconds: Some(5),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(SANDBOX_UID),
                run_as_group: Some(SANDBOX_UID),
                fs_group: Some(SANDBOX_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            containers: vec![Container {
                name: SANDBOX_CONTAINER.into(),
                image: Some(settings.image.clone()),
                image_pull_policy: settings.image_pull_policy.clone(),
                command: Some(vec!["/bin/sh".into(), "-c".into(), KEEP_ALIVE.into()]),
                working_dir: Some(DEFAULT_WORK_DIR.into()),
                env: Some(env),
                resources: Some(settings.resources.clone()),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    privileged: Some(false),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                volume_mounts: Some(vec![
                    VolumeMount {
                        name: "workspace".into(),
                        mount_path: DEFAULT_WORK_DIR.into(),
                        ..Default::default()
                    },
                    // Writable in any image; holds spilled outputs and process-group files.
                    VolumeMount {
                        name: "scratch".into(),
                        mount_path: super::sandbox_pod::SCRATCH_DIR.into(),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }],
            volumes: Some(vec![
                Volume {
                    name: "workspace".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                },
                Volume {
                    name: "scratch".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "ml-intern.io/v1alpha1".into(),
            kind: "AgentSession".into(),
            name: "s".into(),
            uid: "u".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    #[test]
    fn the_pod_is_hardened_and_owned() {
        let settings = SandboxSettings {
            image: "busybox".into(),
            image_pull_policy: Some("Never".into()),
            resources: default_resources(),
            env: vec![],
        };
        let pod = sandbox_pod("demo", "ns", owner(), &settings);
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("demo-sandbox"));
        assert_eq!(
            pod.metadata.owner_references.as_ref().unwrap()[0].controller,
            Some(true)
        );
        assert_eq!(spec.automount_service_account_token, Some(false));
        let psc = spec.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(SANDBOX_UID));
        let c = &spec.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
            &vec!["ALL".to_string()]
        );
        assert!(c.resources.as_ref().unwrap().limits.is_some());
        assert!(c.env.as_ref().unwrap().iter().any(|e| e.name == "HOME"));
    }

    #[test]
    fn label_values_are_bounded_and_end_alphanumeric() {
        assert_eq!(label_value("demo"), "demo");
        let long = format!("{}-x", "a".repeat(62));
        assert_eq!(label_value(&long), "a".repeat(62));
    }
}
