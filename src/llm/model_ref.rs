//! Which endpoint and model id a session's `model` and `llm.baseUrl` stand for.

pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
pub const HF_ROUTER_BASE_URL: &str = "https://router.huggingface.co/v1";
pub const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";

/// The wire protocol a model is reached with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
pub enum WireApi {
    #[serde(rename = "openai")]
    OpenAiChat,
    #[serde(rename = "anthropic")]
    AnthropicMessages,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedModel {
    /// Base URL without a trailing slash; `/chat/completions` goes after it.
    pub base_url: String,
    /// The id sent in the request's `model` field.
    pub model_id: String,
}

/// Over chat completions, `openai/<id>` names an OpenAI-compatible endpoint and sends
/// `<id>`, and every other id is a Hugging Face router id (`org/model[:provider]`) sent as
/// written, as ml-intern does. Over Messages, an `anthropic/` prefix is dropped.
pub fn resolve_model(model: &str, base_url: Option<&str>, api: WireApi) -> ResolvedModel {
    let (default_base, model_id) = match api {
        WireApi::AnthropicMessages => (
            ANTHROPIC_BASE_URL,
            model.strip_prefix("anthropic/").unwrap_or(model),
        ),
        WireApi::OpenAiChat => match model.strip_prefix("openai/") {
            Some(id) => (OPENAI_BASE_URL, id),
            None => (HF_ROUTER_BASE_URL, model),
        },
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
        let r = resolve_model("openai/gpt-4o-mini", None, WireApi::OpenAiChat);
        assert_eq!(r.base_url, OPENAI_BASE_URL);
        assert_eq!(r.model_id, "gpt-4o-mini");
    }

    #[test]
    fn router_ids_are_sent_verbatim() {
        let r = resolve_model("moonshotai/Kimi-K2.6:novita", None, WireApi::OpenAiChat);
        assert_eq!(r.base_url, HF_ROUTER_BASE_URL);
        assert_eq!(r.model_id, "moonshotai/Kimi-K2.6:novita");
    }

    #[test]
    fn anthropic_ids_lose_their_prefix_over_messages() {
        let r = resolve_model(
            "anthropic/claude-sonnet-4-5",
            None,
            WireApi::AnthropicMessages,
        );
        assert_eq!(r.base_url, ANTHROPIC_BASE_URL);
        assert_eq!(r.model_id, "claude-sonnet-4-5");
        let routed = resolve_model(
            "anthropic/claude-opus-4.8:fal-ai",
            None,
            WireApi::OpenAiChat,
        );
        assert_eq!(
            routed.base_url, HF_ROUTER_BASE_URL,
            "over chat completions it is a router id"
        );
    }

    #[test]
    fn explicit_base_url_wins_and_loses_its_trailing_slash() {
        let r = resolve_model(
            "openai/test-model",
            Some("http://127.0.0.1:8089/v1/"),
            WireApi::OpenAiChat,
        );
        assert_eq!(r.base_url, "http://127.0.0.1:8089/v1");
        assert_eq!(r.model_id, "test-model");
    }
}
