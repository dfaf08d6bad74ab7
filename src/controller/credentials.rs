//! How a session reaches its model: the endpoint from its spec or from the controller's
//! model config, and the API key from the Secret that goes with that endpoint.

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use crate::api::{AgentSessionSpec, LlmApi};
use crate::llm::WireApi;
use crate::llm::catalog::{Endpoint, ModelCatalog};

/// Who named the Secret, for messages that say what to fix.
const SESSION_REF: &str = "spec.llm.apiKeySecretRef";
const CONFIG_REF: &str = "the controller's model config (endpoint.apiKeySecretRef)";

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "Secret {namespace}/{name} named by {named_by} does not exist; create it, e.g. `kubectl -n {namespace} create secret generic {name} --from-literal={key}=<your key>`"
    )]
    SecretNotFound {
        named_by: &'static str,
        namespace: String,
        name: String,
        key: String,
    },
    #[error(
        "Secret {namespace}/{name} has no key {key:?} (it has: {available}); fix the key in {named_by} or add it to the Secret"
    )]
    KeyNotFound {
        named_by: &'static str,
        namespace: String,
        name: String,
        key: String,
        available: String,
    },
    #[error("key {key:?} of Secret {namespace}/{name} is empty or not UTF-8 text")]
    Unusable {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("cannot read Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl CredentialError {
    pub fn reason(&self) -> &'static str {
        match self {
            CredentialError::SecretNotFound { .. } => "SecretNotFound",
            CredentialError::KeyNotFound { .. } => "SecretKeyNotFound",
            CredentialError::Unusable { .. } => "SecretKeyUnusable",
            CredentialError::Api { .. } => "SecretUnreadable",
        }
    }
}

/// Where a session's model calls go and with which key.
#[derive(Clone, Debug, Default)]
pub struct ModelAccess {
    pub api: Option<WireApi>,
    /// The protocol's public default when None.
    pub base_url: Option<String>,
    pub api_key: Option<String>,
    /// The endpoint came from the controller's model config, not the session.
    pub from_config: bool,
}

impl ModelAccess {
    pub fn api(&self) -> WireApi {
        self.api.unwrap_or(WireApi::OpenAiChat)
    }
}

/// The Secret behind a session's model access: (who named it, namespace, name, key).
type SecretPlace<'a> = (&'static str, &'a str, &'a str, &'a str);

/// A session that sets any of `llm.api`, `llm.baseUrl` or `llm.apiKeySecretRef` brings its
/// own endpoint and key. Otherwise the controller's endpoint for the model is used whole:
/// the platform's key is only ever sent to the URL configured with it, never to a URL a
/// session chose.
fn choose<'a>(
    spec: &'a AgentSessionSpec,
    namespace: &'a str,
    config: Option<&'a Endpoint>,
) -> (ModelAccess, Option<SecretPlace<'a>>) {
    let llm = &spec.llm;
    let session_owned =
        llm.api.is_some() || llm.base_url.is_some() || llm.api_key_secret_ref.is_some();
    match config.filter(|_| !session_owned) {
        Some(e) => (
            ModelAccess {
                api: e.api,
                base_url: e.base_url.clone(),
                api_key: None,
                from_config: true,
            },
            e.api_key_secret_ref.as_ref().map(|r| {
                (
                    CONFIG_REF,
                    r.namespace.as_str(),
                    r.name.as_str(),
                    r.key.as_str(),
                )
            }),
        ),
        None => (
            ModelAccess {
                api: llm.api.map(|a| match a {
                    LlmApi::Openai => WireApi::OpenAiChat,
                    LlmApi::Anthropic => WireApi::AnthropicMessages,
                }),
                base_url: llm.base_url.clone(),
                api_key: None,
                from_config: false,
            },
            llm.api_key_secret_ref
                .as_ref()
                .map(|r| (SESSION_REF, namespace, r.name.as_str(), r.key.as_str())),
        ),
    }
}

/// The endpoint and key for a session's model (its own, or the controller's default).
pub async fn resolve_model_access(
    client: &kube::Client,
    spec: &AgentSessionSpec,
    namespace: &str,
    catalog: &ModelCatalog,
) -> Result<ModelAccess, CredentialError> {
    let model = spec.model.as_deref().or(catalog.default_model.as_deref());
    let configured = model.and_then(|m| catalog.lookup(m).endpoint);
    let (mut access, secret) = choose(spec, namespace, configured.as_ref());
    if let Some(place) = secret {
        access.api_key = Some(read_key(client, place).await?);
    }
    Ok(access)
}

/// The session's Hugging Face token (`spec.huggingFace.tokenSecretRef`), if it has one.
pub async fn resolve_hf_token(
    client: &kube::Client,
    spec: &AgentSessionSpec,
    namespace: &str,
) -> Result<Option<String>, CredentialError> {
    let Some(hf) = &spec.hugging_face else {
        return Ok(None);
    };
    let r = &hf.token_secret_ref;
    let place = (
        "spec.huggingFace.tokenSecretRef",
        namespace,
        r.name.as_str(),
        r.key.as_str(),
    );
    read_key(client, place).await.map(Some)
}

async fn read_key(
    client: &kube::Client,
    (named_by, namespace, name, key): SecretPlace<'_>,
) -> Result<String, CredentialError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = match secrets.get_opt(name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(CredentialError::SecretNotFound {
                named_by,
                namespace: namespace.into(),
                name: name.into(),
                key: key.into(),
            });
        }
        Err(source) => {
            return Err(CredentialError::Api {
                namespace: namespace.into(),
                name: name.into(),
                source,
            });
        }
    };
    let data = secret.data.unwrap_or_default();
    let Some(value) = data.get(key) else {
        return Err(CredentialError::KeyNotFound {
            named_by,
            namespace: namespace.into(),
            name: name.into(),
            key: key.into(),
            available: if data.is_empty() {
                "no keys".into()
            } else {
                data.keys().cloned().collect::<Vec<_>>().join(", ")
            },
        });
    };
    match std::str::from_utf8(&value.0) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => Err(CredentialError::Unusable {
            namespace: namespace.into(),
            name: name.into(),
            key: key.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SecretKeyRef;
    use crate::llm::catalog::SecretLocation;

    fn platform() -> Endpoint {
        Endpoint {
            api: None,
            base_url: Some("https://router.example/v1".into()),
            api_key_secret_ref: Some(SecretLocation {
                namespace: "ml-intern-system".into(),
                name: "hf-token".into(),
                key: "token".into(),
            }),
        }
    }

    fn spec(yaml: &str) -> AgentSessionSpec {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn a_session_without_llm_settings_uses_the_platform_endpoint_and_key() {
        let s = spec("prompt: hi\n");
        let config = platform();
        let (access, secret) = choose(&s, "team-a", Some(&config));
        assert!(access.from_config);
        assert_eq!(
            access.base_url.as_deref(),
            Some("https://router.example/v1")
        );
        assert_eq!(
            secret,
            Some((CONFIG_REF, "ml-intern-system", "hf-token", "token"))
        );
    }

    #[test]
    fn a_session_url_never_gets_the_platform_key() {
        for yaml in [
            "prompt: hi\nllm: {baseUrl: 'https://attacker.example/v1'}\n",
            "prompt: hi\nllm: {api: anthropic}\n",
        ] {
            let s = spec(yaml);
            let config = platform();
            let (access, secret) = choose(&s, "team-a", Some(&config));
            assert!(!access.from_config, "{yaml}");
            assert_eq!(secret, None, "{yaml}");
        }
        let mut s = spec("prompt: hi\n");
        s.llm.api_key_secret_ref = Some(SecretKeyRef {
            name: "mine".into(),
            key: "k".into(),
        });
        let config = platform();
        let (access, secret) = choose(&s, "team-a", Some(&config));
        assert_eq!(access.base_url, None);
        assert_eq!(secret, Some((SESSION_REF, "team-a", "mine", "k")));
    }
}
