//! Scrubbing secrets from text before it is stored or shown: status, Events, logs and
//! transcripts. Known values (the session's own keys) go first, then token shapes that
//! are secrets wherever they appear.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;

static PATTERNS: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    [
        (r"hf_[A-Za-z0-9]{30,}", "[REDACTED_HF_TOKEN]"),
        (r"sk-ant-[A-Za-z0-9_-]{20,}", "[REDACTED_PROVIDER_API_KEY]"),
        (r"sk-[A-Za-z0-9_-]{40,}", "[REDACTED_PROVIDER_API_KEY]"),
        (r"gh[pousr]_[A-Za-z0-9]{36,}", "[REDACTED_GITHUB_TOKEN]"),
        (r"github_pat_[A-Za-z0-9_]{36,}", "[REDACTED_GITHUB_TOKEN]"),
        (r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b", "[REDACTED_AWS_KEY_ID]"),
        (r"(?i)\bbearer\s+[A-Za-z0-9_\-.=]{20,}", "Bearer [REDACTED]"),
        (
            r"(?i)\b([A-Z0-9_]*(?:TOKEN|API_KEY|SECRET|PASSWORD|ACCESS_KEY_ID))(\s*[=:]\s*)[^\s\[]\S*",
            "${1}${2}[REDACTED]",
        ),
    ]
    .into_iter()
    // The patterns are constants; a typo is caught by the unit tests below.
    .map(|(p, r)| (Regex::new(p).expect("redaction pattern compiles"), r))
    .collect()
});

/// Values shorter than this are not scrubbed by value: they would match ordinary text.
const MIN_KNOWN_LEN: usize = 6;

#[derive(Clone, Debug, Default)]
pub struct Redactor {
    known: Vec<String>,
}

impl Redactor {
    /// A redactor that also removes these exact values (the session's own secrets).
    pub fn new(known: impl IntoIterator<Item = String>) -> Self {
        let mut known: Vec<String> = known
            .into_iter()
            .filter(|k| k.len() >= MIN_KNOWN_LEN)
            .collect();
        // Longer first, so a value containing another is removed whole.
        known.sort_by_key(|k| std::cmp::Reverse(k.len()));
        Redactor { known }
    }

    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for k in &self.known {
            if out.contains(k.as_str()) {
                out = Cow::Owned(out.replace(k.as_str(), "[REDACTED]"));
            }
        }
        for (re, replacement) in PATTERNS.iter() {
            if re.is_match(&out) {
                out = Cow::Owned(re.replace_all(&out, *replacement).into_owned());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shapes_are_redacted() {
        let r = Redactor::default();
        let cases = [
            (
                "token hf_abcdefghijklmnopqrstuvwxyz0123456789",
                "token [REDACTED_HF_TOKEN]",
            ),
            (
                "k=sk-ant-api03-abcdefghijklmnopqrstuv",
                "k=[REDACTED_PROVIDER_API_KEY]",
            ),
            (
                "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGH done",
                "[REDACTED_PROVIDER_API_KEY] done",
            ),
            (
                "ghp_abcdefghijklmnopqrstuvwxyz0123456789AB",
                "[REDACTED_GITHUB_TOKEN]",
            ),
            (
                "id AKIAABCDEFGHIJKLMNOP end",
                "id [REDACTED_AWS_KEY_ID] end",
            ),
            (
                "Authorization: Bearer abcdefghijklmnopqrstuvwxyz",
                "Authorization: Bearer [REDACTED]",
            ),
            ("export HF_TOKEN=whatever123", "export HF_TOKEN=[REDACTED]"),
            ("db_password: hunter22", "db_password: [REDACTED]"),
        ];
        for (input, want) in cases {
            assert_eq!(r.redact(input), want, "for {input:?}");
        }
    }

    #[test]
    fn ordinary_text_is_untouched_and_borrowed() {
        let r = Redactor::new(["sk-local".to_string()]);
        let text = "The token limit was reached; see the password policy.";
        assert!(matches!(r.redact(text), Cow::Borrowed(_)));
        assert_eq!(r.redact("sk-short"), "sk-short");
    }

    #[test]
    fn known_values_are_redacted_whatever_their_shape() {
        let r = Redactor::new(["plain-value-42".to_string(), "abc".to_string()]);
        assert_eq!(r.redact("key plain-value-42!"), "key [REDACTED]!");
        assert_eq!(r.redact("abc"), "abc", "too short to scrub by value");
    }
}
