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

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Entry {
    #[serde(rename = "match")]
    pattern: String,
    #[serde(default)]
    context_window: Option<u64>,
    #[serde(default)]
    price: Option<Price>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelCatalog {
    #[serde(default)]
    pub default_model: Option<String>,
    #[serde(default = "default_window")]
    pub fallback_context_window: u64,
    #[serde(default)]
    models: Vec<Entry>,
}

fn default_window() -> u64 {
    200_000
}

/// What the catalog says about one model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelInfo {
    pub context_window: u64,
    pub price: Option<Price>,
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
        Ok(catalog)
    }

    pub fn builtin() -> Self {
        // The shipped file is checked by a unit test.
        Self::parse(BUILTIN).unwrap_or(ModelCatalog {
            default_model: None,
            fallback_context_window: default_window(),
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
    fn mistakes_in_the_file_are_named() {
        let e = ModelCatalog::parse("models:\n  - match: x\n    contextWindow: 0\n").unwrap_err();
        assert!(e.contains("contextWindow of x"), "{e}");
        let e = ModelCatalog::parse("modelz: []\n").unwrap_err();
        assert!(e.contains("modelz"), "{e}");
    }
}
