//! Reading the model API key from the Secret a session names.

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use crate::api::SecretKeyRef;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "Secret {namespace}/{name} named by spec.llm.apiKeySecretRef does not exist; create it, e.g. `kubectl -n {namespace} create secret generic {name} --from-literal={key}=<your key>`"
    )]
    SecretNotFound {
        namespace: String,
        name: String,
        key: String,
    },
    #[error(
        "Secret {namespace}/{name} has no key {key:?} (it has: {available}); set spec.llm.apiKeySecretRef.key or add the key"
    )]
    KeyNotFound {
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

/// The API key, or None when the session names no Secret.
pub async fn resolve_api_key(
    secrets: &Api<Secret>,
    namespace: &str,
    reference: Option<&SecretKeyRef>,
) -> Result<Option<String>, CredentialError> {
    let Some(r) = reference else {
        return Ok(None);
    };
    let secret = match secrets.get_opt(&r.name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(CredentialError::SecretNotFound {
                namespace: namespace.into(),
                name: r.name.clone(),
                key: r.key.clone(),
            });
        }
        Err(source) => {
            return Err(CredentialError::Api {
                namespace: namespace.into(),
                name: r.name.clone(),
                source,
            });
        }
    };
    let data = secret.data.unwrap_or_default();
    let Some(value) = data.get(&r.key) else {
        return Err(CredentialError::KeyNotFound {
            namespace: namespace.into(),
            name: r.name.clone(),
            key: r.key.clone(),
            available: if data.is_empty() {
                "no keys".into()
            } else {
                data.keys().cloned().collect::<Vec<_>>().join(", ")
            },
        });
    };
    match std::str::from_utf8(&value.0) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
        _ => Err(CredentialError::Unusable {
            namespace: namespace.into(),
            name: r.name.clone(),
            key: r.key.clone(),
        }),
    }
}
