//! Which endpoint and model id a session's `model` and `llm.baseUrl` stand for.

pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
pub const HF_ROUTER_BASE_URL: &str = "https://router.huggingface.co/v1";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedModel {
    /// Base URL without a trailing slash; `/chat/completions` goes after it.
    pub base_url: String,
    /// The id sent in the request's `model` field.
    pub model_id: String,
}

/// `openai/<id>` names an OpenAI-compatible endpoint and sends `<id>`; every other id is a
/// Hugging Face router id (`org/model[:provider]`) and is sent as written.
pub fn resolve_model(model: &str, base_url: Option<&str>) -> ResolvedModel {
    let (default_base, model_id) = match model.strip_prefix("openai/") {
        Some(id) => (OPENAI_BASE_URL, id),
        None => (HF_ROUTER_BASE_URL, model),
    };
    ResolvedModel {
        base_url: base_url
            .unwrap_or(default_base)
            .trim_end_matches('/')
            .to_string(),
        model_id: model_id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_prefix_is_stripped_and_defaults_to_openai() {
        let r = resolve_model("openai/gpt-4o-mini", None);
        assert_eq!(r.base_url, OPENAI_BASE_URL);
        assert_eq!(r.model_id, "gpt-4o-mini");
    }

    #[test]
    fn router_ids_are_sent_verbatim() {
        let r = resolve_model("moonshotai/Kimi-K2.6:novita", None);
        assert_eq!(r.base_url, HF_ROUTER_BASE_URL);
        assert_eq!(r.model_id, "moonshotai/Kimi-K2.6:novita");
    }

    #[test]
    fn explicit_base_url_wins_and_loses_its_trailing_slash() {
        let r = resolve_model("openai/test-model", Some("http://127.0.0.1:8089/v1/"));
        assert_eq!(r.base_url, "http://127.0.0.1:8089/v1");
        assert_eq!(r.model_id, "test-model");
    }
}
