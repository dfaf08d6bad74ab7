//! The sandbox pod's spec: a long-sleeping container that commands are exec'd into,
//! hardened by default.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, ResourceRequirements,
    SeccompProfile, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{MANAGED_BY_LABEL, SESSION_LABEL};
use crate::api::SandboxSpec;
use crate::tools::bash::DEFAULT_WORK_DIR;

/// The fixed non-root user commands run as (the uid ml-intern's sandbox image uses).
pub const SANDBOX_UID: i64 = 1000;
pub const SANDBOX_CONTAINER: &str = "sandbox";

/// Keeps the container alive until it is told to stop. A plain `sleep` as PID 1 ignores
/// SIGTERM, which would make every sandbox deletion wait out the grace period.
const KEEP_ALIVE: &str = "trap 'exit 0' TERM INT; while true; do sleep 3600 & wait $!; done";

/// What a sandbox pod is made of, after session spec and controller defaults are merged.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SandboxSettings {
    pub image: String,
    pub image_pull_policy: Option<String>,
    pub resources: ResourceRequirements,
    pub env: Vec<EnvVar>,
    pub env_from: Vec<EnvFromSource>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub runtime_class_name: Option<String>,
    pub service_account_name: Option<String>,
    /// A PersistentVolumeClaim for /workspace; an emptyDir when None.
    pub workspace_claim: Option<String>,
    pub workspace_size_limit: Option<Quantity>,
}

impl SandboxSettings {
    /// The preset's resources instead of the session's, and its placement added.
    pub fn with_preset(mut self, preset: &super::hardware::Preset) -> Self {
        self.resources = merged_resources(Some(&preset.resources));
        self.node_selector.extend(preset.node_selector.clone());
        self.tolerations.extend(preset.tolerations.iter().cloned());
        self
    }

    /// The session's sandbox spec with the controller's defaults filled in.
    pub fn from_spec(spec: &SandboxSpec, default_image: &str) -> Self {
        let workspace = spec.workspace.clone().unwrap_or_default();
        SandboxSettings {
            image: spec
                .image
                .clone()
                .unwrap_or_else(|| default_image.to_string()),
            image_pull_policy: spec.image_pull_policy.clone(),
            resources: merged_resources(spec.resources.as_ref()),
            env: spec.env.clone(),
            env_from: spec.env_from.clone(),
            node_selector: spec.node_selector.clone(),
            tolerations: spec.tolerations.clone(),
            runtime_class_name: spec.runtime_class_name.clone(),
            service_account_name: spec.service_account_name.clone(),
            workspace_claim: workspace.claim_name,
            workspace_size_limit: workspace.size_limit,
        }
    }
}

/// Where sandboxes may connect, from the controller's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressPolicy {
    /// CIDRs sandboxes may reach (DNS on port 53 is always allowed); none: DNS only.
    pub allow: Vec<String>,
    /// Ranges carved out of every allowed CIDR, e.g. the cloud metadata endpoint that
    /// hands out node credentials.
    pub except: Vec<String>,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        EgressPolicy {
            allow: vec!["0.0.0.0/0".into(), "::/0".into()],
            except: vec!["169.254.169.254/32".into()],
        }
    }
}

/// The session's NetworkPolicy: nothing may connect to the sandbox, and it may connect
/// only where `egress` allows. (A cluster without a NetworkPolicy implementation ignores
/// it; the object still says what is intended.)
pub fn sandbox_network_policy(
    session: &str,
    namespace: &str,
    owner: OwnerReference,
    egress: &EgressPolicy,
) -> NetworkPolicy {
    let dns_ports = ["UDP", "TCP"]
        .iter()
        .map(|protocol| NetworkPolicyPort {
            protocol: Some(protocol.to_string()),
            port: Some(IntOrString::Int(53)),
            ..Default::default()
        })
        .collect();
    let mut rules = vec![NetworkPolicyEgressRule {
        ports: Some(dns_ports),
        to: None,
    }];
    if !egress.allow.is_empty() {
        let is_v6 = |c: &str| c.contains(':');
        rules.push(NetworkPolicyEgressRule {
            ports: None,
            to: Some(
                egress
                    .allow
                    .iter()
                    .map(|cidr| NetworkPolicyPeer {
                        ip_block: Some(IPBlock {
                            cidr: cidr.clone(),
                            // An except range must lie inside its CIDR's family.
                            except: Some(
                                egress
                                    .except
                                    .iter()
                                    .filter(|e| is_v6(e) == is_v6(cidr))
                                    .cloned()
                                    .collect::<Vec<_>>(),
                            )
                            .filter(|e| !e.is_empty()),
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
        });
    }
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(sandbox_pod_name(session)),
            namespace: Some(namespace.to_string()),
            labels: Some(sandbox_labels(session)),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    SESSION_LABEL.to_string(),
                    label_value(session),
                )])),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![]),
            egress: Some(rules),
        }),
    }
}

pub fn sandbox_labels(session: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            MANAGED_BY_LABEL.0.to_string(),
            MANAGED_BY_LABEL.1.to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            "sandbox".to_string(),
        ),
        (SESSION_LABEL.to_string(), label_value(session)),
    ])
}

/// The fixed non-root user, seccomp on: for every pod this operator runs agent code in.
pub fn hardened_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(SANDBOX_UID),
        run_as_group: Some(SANDBOX_UID),
        fs_group: Some(SANDBOX_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// No privilege escalation, no capabilities.
pub fn hardened_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
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

/// The session's resources with the controller's defaults filling the gaps, so requests
/// and limits are always set: a missing CPU or memory limit is the request when one was
/// given (a limit below it would be invalid), else the default limit.
pub fn merged_resources(requested: Option<&ResourceRequirements>) -> ResourceRequirements {
    let defaults = default_resources();
    let Some(r) = requested else {
        return defaults;
    };
    let mut requests = r.requests.clone().unwrap_or_default();
    let mut limits = r.limits.clone().unwrap_or_default();
    for key in ["cpu", "memory"] {
        let default_request = &defaults.requests.as_ref().map(|d| d[key].clone());
        let default_limit = &defaults.limits.as_ref().map(|d| d[key].clone());
        if !limits.contains_key(key) {
            let limit = requests.get(key).cloned().or_else(|| default_limit.clone());
            if let Some(l) = limit {
                limits.insert(key.to_string(), l);
            }
        }
        if !requests.contains_key(key) {
            // Kubernetes would copy the limit; a smaller default request packs better
            // unless the user set only a limit, which then is the request too.
            let request = if r.limits.as_ref().is_some_and(|l| l.contains_key(key)) {
                limits.get(key).cloned()
            } else {
                default_request.clone()
            };
            if let Some(q) = request {
                requests.insert(key.to_string(), q);
            }
        }
    }
    ResourceRequirements {
        requests: Some(requests),
        limits: Some(limits),
        ..r.clone()
    }
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
    let labels = sandbox_labels(session);
    Pod {
        metadata: ObjectMeta {
            name: Some(sandbox_pod_name(session)),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            // A token only when the user named an account for the sandbox to act as.
            automount_service_account_token: Some(settings.service_account_name.is_some()),
            service_account_name: settings.service_account_name.clone(),
            node_selector: Some(settings.node_selector.clone()).filter(|n| !n.is_empty()),
            tolerations: Some(settings.tolerations.clone()).filter(|t| !t.is_empty()),
            runtime_class_name: settings.runtime_class_name.clone(),
            enable_service_links: Some(false),
            restart_policy: Some("Always".into()),
            termination_grace_period_seconds: Some(5),
            security_context: Some(hardened_pod_security()),
            containers: vec![Container {
                name: SANDBOX_CONTAINER.into(),
                image: Some(settings.image.clone()),
                image_pull_policy: settings.image_pull_policy.clone(),
                command: Some(vec!["/bin/sh".into(), "-c".into(), KEEP_ALIVE.into()]),
                working_dir: Some(DEFAULT_WORK_DIR.into()),
                env: Some(env),
                env_from: Some(settings.env_from.clone()).filter(|e| !e.is_empty()),
                resources: Some(settings.resources.clone()),
                security_context: Some(hardened_container_security()),
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
                match &settings.workspace_claim {
                    Some(claim) => Volume {
                        name: "workspace".into(),
                        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                            claim_name: claim.clone(),
                            read_only: Some(false),
                        }),
                        ..Default::default()
                    },
                    None => Volume {
                        name: "workspace".into(),
                        empty_dir: Some(EmptyDirVolumeSource {
                            size_limit: settings.workspace_size_limit.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
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
            ..Default::default()
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
    fn the_session_spec_reaches_the_pod_and_limits_are_always_set() {
        let spec: SandboxSpec = serde_json::from_value(serde_json::json!({
            "image": "ghcr.io/me/train:1",
            "resources": {"requests": {"cpu": "4"}, "limits": {"nvidia.com/gpu": "1"}},
            "envFrom": [{"secretRef": {"name": "hf"}}],
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "runtimeClassName": "gvisor",
            "serviceAccountName": "trainer",
            "workspace": {"claimName": "work"}
        }))
        .unwrap();
        let settings = SandboxSettings::from_spec(&spec, "default:1");
        let pod = sandbox_pod("s", "ns", owner(), &settings);
        let p = pod.spec.unwrap();
        assert_eq!(p.node_selector.unwrap()["pool"], "gpu");
        assert_eq!(
            p.tolerations.unwrap()[0].key.as_deref(),
            Some("nvidia.com/gpu")
        );
        assert_eq!(p.runtime_class_name.as_deref(), Some("gvisor"));
        assert_eq!(p.service_account_name.as_deref(), Some("trainer"));
        assert_eq!(p.automount_service_account_token, Some(true));
        let workspace = &p.volumes.as_ref().unwrap()[0];
        assert_eq!(
            workspace
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "work"
        );
        let c = &p.containers[0];
        assert_eq!(c.image.as_deref(), Some("ghcr.io/me/train:1"));
        assert_eq!(c.env_from.as_ref().unwrap().len(), 1);
        let r = c.resources.as_ref().unwrap();
        let (req, lim) = (r.requests.as_ref().unwrap(), r.limits.as_ref().unwrap());
        assert_eq!(req["cpu"].0, "4");
        assert_eq!(lim["cpu"].0, "4", "the limit is at least the request");
        assert_eq!(req["memory"].0, "256Mi");
        assert_eq!(lim["memory"].0, "4Gi");
        assert_eq!(lim["nvidia.com/gpu"].0, "1");
        // Defaults: no token, an emptyDir, the controller's image.
        let plain = SandboxSettings::from_spec(&SandboxSpec::default(), "default:1");
        let p = sandbox_pod("s", "ns", owner(), &plain).spec.unwrap();
        assert_eq!(p.automount_service_account_token, Some(false));
        assert!(p.volumes.unwrap()[0].empty_dir.is_some());
        assert_eq!(p.containers[0].image.as_deref(), Some("default:1"));
    }

    #[test]
    fn the_network_policy_denies_ingress_and_limits_egress() {
        let np = sandbox_network_policy("s", "ns", owner(), &EgressPolicy::default());
        let spec = np.spec.unwrap();
        assert_eq!(
            spec.pod_selector.unwrap().match_labels.unwrap()[SESSION_LABEL],
            "s"
        );
        assert_eq!(spec.policy_types.unwrap(), ["Ingress", "Egress"]);
        assert_eq!(spec.ingress.unwrap().len(), 0, "no ingress at all");
        let egress = spec.egress.unwrap();
        assert_eq!(egress[0].ports.as_ref().unwrap().len(), 2, "DNS");
        let peers = egress[1].to.as_ref().unwrap();
        let v4 = peers[0].ip_block.as_ref().unwrap();
        assert_eq!(v4.cidr, "0.0.0.0/0");
        assert_eq!(v4.except.as_ref().unwrap(), &["169.254.169.254/32"]);
        assert_eq!(peers[1].ip_block.as_ref().unwrap().except, None);
        let closed = EgressPolicy {
            allow: vec![],
            except: vec![],
        };
        let np = sandbox_network_policy("s", "ns", owner(), &closed);
        assert_eq!(np.spec.unwrap().egress.unwrap().len(), 1, "DNS only");
    }

    #[test]
    fn label_values_are_bounded_and_end_alphanumeric() {
        assert_eq!(label_value("demo"), "demo");
        let long = format!("{}-x", "a".repeat(62));
        assert_eq!(label_value(&long), "a".repeat(62));
    }
}
