//! What the controller knows about models: context windows and prices, from a YAML file
//! (`configs/controller/models.yaml`, built in as the default).

use serde::Deserialize;

/// The shipped catalog, used when the controller is given none.
pub const BUILTIN: &str = include_str!("../../configs/controller/models.yaml");

/// USD per million tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Price {
    pub input_per_million: f64,
    pub output_per_million: f64,
    /// Cached input tokens; the input price when unset.
    #[serde(default)]
    pub cached_input_per_million: Option<f64>,
}

impl Price {
    pub fn cost_usd(&self, usage: &super::Usage) -> f64 {
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let fresh = usage.prompt_tokens - cached;
        let cached_price = self
            .cached_input_per_million
            .unwrap_or(self.input_per_million);
        (fresh as f64 * self.input_per_million
            + cached as f64 * cached_price
            + usage.completion_tokens as f64 * self.output_per_million)
            / 1_000_000.0
    }
}

/// A Secret key anywhere in the cluster, named by the platform's config.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretLocation {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

/// Where the platform reaches a model: protocol, URL and the key that goes with that URL.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// Chat completions when unset.
    #[serde(default)]
    pub api: Option<super::WireApi>,
    /// The protocol's public default when unset.
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub api_key_secret_ref: Option<SecretLocation>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Entry {
    #[serde(rename = "match")]
    pattern: String,
    #[serde(default)]
    context_window: Option<u64>,
    #[serde(default)]
    price: Option<Price>,
    #[serde(default)]
    endpoint: Option<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelCatalog {
    #[serde(default)]
    pub default_model: Option<String>,
    #[serde(default = "default_window")]
    pub fallback_context_window: u64,
    /// The endpoint of models whose entry names none.
    #[serde(default)]
    pub endpoint: Option<Endpoint>,
    #[serde(default)]
    models: Vec<Entry>,
}

fn default_window() -> u64 {
    200_000
}

/// What the catalog says about one model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    pub context_window: u64,
    pub price: Option<Price>,
    /// The entry's endpoint, whole, or the catalog's: fields are never mixed, so a key
    /// only ever goes to the URL it was configured with.
    pub endpoint: Option<Endpoint>,
}

impl ModelCatalog {
    pub fn parse(yaml: &str) -> Result<Self, String> {
        let catalog: ModelCatalog = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        if catalog.fallback_context_window == 0 {
            return Err("fallbackContextWindow must be above 0".into());
        }
        if let Some(e) = catalog.models.iter().find(|e| e.context_window == Some(0)) {
            return Err(format!("contextWindow of {} must be above 0", e.pattern));
        }
        let endpoints = catalog.endpoint.iter().map(|e| ("endpoint", e)).chain(
            catalog
                .models
                .iter()
                .filter_map(|m| m.endpoint.as_ref().map(|e| (m.pattern.as_str(), e))),
        );
        for (owner, e) in endpoints {
            if let Some(url) = e.base_url.as_deref()
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return Err(format!(
                    "baseUrl {url:?} of {owner} must start with http:// or https://"
                ));
            }
            if let Some(r) = &e.api_key_secret_ref
                && [&r.namespace, &r.name, &r.key].iter().any(|v| v.is_empty())
            {
                return Err(format!(
                    "apiKeySecretRef of {owner} needs a namespace, a name and a key"
                ));
            }
        }
        Ok(catalog)
    }

    pub fn builtin() -> Self {
        // The shipped file is checked by a unit test.
        Self::parse(BUILTIN).unwrap_or(ModelCatalog {
            default_model: None,
            fallback_context_window: default_window(),
            endpoint: None,
            models: vec![],
        })
    }

    pub fn lookup(&self, model: &str) -> ModelInfo {
        let id = model.strip_prefix("huggingface/").unwrap_or(model);
        let id = id.split(':').next().unwrap_or(id);
        let entry = self
            .models
            .iter()
            .find(|e| match e.pattern.strip_suffix('*') {
                Some(prefix) => id.starts_with(prefix),
                None => id == e.pattern.split(':').next().unwrap_or(&e.pattern),
            });
        ModelInfo {
            context_window: entry
                .and_then(|e| e.context_window)
                .unwrap_or(self.fallback_context_window),
            price: entry.and_then(|e| e.price),
            endpoint: entry
                .and_then(|e| e.endpoint.clone())
                .or_else(|| self.endpoint.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Usage;

    #[test]
    fn the_shipped_catalog_parses_and_matches_router_ids() {
        let c = ModelCatalog::parse(BUILTIN).unwrap();
        assert_eq!(
            c.default_model.as_deref(),
            Some("moonshotai/Kimi-K2.6:novita")
        );
        assert_eq!(
            c.lookup("moonshotai/Kimi-K2.6:novita").context_window,
            262_144
        );
        assert_eq!(
            c.lookup("anthropic/claude-opus-4.8:fal-ai").context_window,
            200_000
        );
        let mini = c.lookup("openai/gpt-4o-mini");
        assert_eq!(mini.context_window, 128_000);
        assert_eq!(mini.price.unwrap().input_per_million, 0.15);
        assert_eq!(c.lookup("someone/unknown").context_window, 200_000);
        assert_eq!(c.lookup("someone/unknown").price, None);
    }

    #[test]
    fn cost_counts_cached_input_at_its_price() {
        let p = Price {
            input_per_million: 2.0,
            output_per_million: 10.0,
            cached_input_per_million: Some(0.5),
        };
        let u = Usage {
            prompt_tokens: 1_000_000,
            completion_tokens: 100_000,
            cached_tokens: 400_000,
        };
        // 600k fresh * 2 + 400k cached * 0.5 + 100k out * 10, per million.
        assert!((p.cost_usd(&u) - (1.2 + 0.2 + 1.0)).abs() < 1e-9);
    }

    #[test]
    fn an_entry_endpoint_replaces_the_default_whole() {
        let c = ModelCatalog::parse(
            r#"
endpoint:
  baseUrl: https://router.huggingface.co/v1
  apiKeySecretRef: {namespace: ml-intern-system, name: hf-token, key: token}
models:
  - match: "Qwen/*"
    endpoint: {baseUrl: "http://vllm.models:8000/v1"}
  - match: "claude-*"
    endpoint:
      api: anthropic
      apiKeySecretRef: {namespace: ml-intern-system, name: anthropic, key: api-key}
"#,
        )
        .unwrap();
        let router = c.lookup("moonshotai/Kimi-K2.6:novita").endpoint.unwrap();
        assert_eq!(router.api, None);
        assert_eq!(router.api_key_secret_ref.unwrap().name, "hf-token");
        let vllm = c.lookup("Qwen/Qwen3-8B").endpoint.unwrap();
        assert_eq!(vllm.base_url.as_deref(), Some("http://vllm.models:8000/v1"));
        assert_eq!(
            vllm.api_key_secret_ref, None,
            "the router key stays with the router"
        );
        let claude = c.lookup("claude-sonnet-4").endpoint.unwrap();
        assert_eq!(claude.api, Some(crate::llm::WireApi::AnthropicMessages));
        assert_eq!(claude.base_url, None);
        assert_eq!(ModelCatalog::builtin().lookup("x/y").endpoint, None);
    }

    #[test]
    fn mistakes_in_the_file_are_named() {
        let e = ModelCatalog::parse("endpoint: {baseUrl: router.hf.co}\n").unwrap_err();
        assert!(e.contains("must start with http"), "{e}");
        let e = ModelCatalog::parse(
            "models:\n  - match: x\n    endpoint: {apiKeySecretRef: {namespace: a, name: b, key: ''}}\n",
        )
        .unwrap_err();
        assert!(e.contains("apiKeySecretRef of x"), "{e}");
        let e = ModelCatalog::parse("endpoint: {api: grpc}\n").unwrap_err();
        assert!(e.contains("grpc"), "{e}");
        let e = ModelCatalog::parse("models:\n  - match: x\n    contextWindow: 0\n").unwrap_err();
        assert!(e.contains("contextWindow of x"), "{e}");
        let e = ModelCatalog::parse("modelz: []\n").unwrap_err();
        assert!(e.contains("modelz"), "{e}");
    }
}
