//! Bounding text that goes into status fields, Events and the model's context.

/// The first `max` characters of `s`, with "…" when something was cut.
pub fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}…", &s[..cut]),
    }
}

/// At most `max_bytes` bytes of `s`, cut on a character boundary, with a note of how much
/// was left out.
/// `s` as one word for `sh`: as is when it holds only characters the shell leaves alone,
/// else in single quotes.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

pub fn truncate_bytes(s: &str, max_bytes: usize) -> String {
    if s.len() <= max_bytes {
        return s.to_string();
    }
    let note = format!("\n[… {} more bytes not shown]", s.len() - max_bytes);
    let mut cut = max_bytes.saturating_sub(note.len());
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{}", &s[..cut], note)
}

/// Keeps the head and the tail of a long output, where the command and its result usually
/// are: a quarter of the budget for the head, the rest for the tail.
pub fn head_tail(s: &str, max_chars: usize) -> String {
    let total = s.chars().count();
    if total <= max_chars {
        return s.to_string();
    }
    let head_n = max_chars / 4;
    let tail_n = max_chars - head_n;
    let head: String = s.chars().take(head_n).collect();
    let tail: String = s.chars().skip(total - tail_n).collect();
    format!(
        "{head}\n\n[… {} characters omitted …]\n\n{tail}",
        total - head_n - tail_n
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_chars_respects_multibyte_characters() {
        assert_eq!(truncate_chars("héllo", 10), "héllo");
        assert_eq!(truncate_chars("héllo", 2), "hé…");
    }

    #[test]
    fn truncate_bytes_stays_within_budget_and_says_so() {
        let s = "é".repeat(1000);
        let t = truncate_bytes(&s, 100);
        assert!(t.len() <= 100, "{} bytes", t.len());
        assert!(t.contains("more bytes not shown"));
        assert_eq!(truncate_bytes("short", 100), "short");
    }

    #[test]
    fn head_tail_keeps_both_ends() {
        let s: String = (0..1000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let t = head_tail(&s, 100);
        assert!(t.starts_with(&s[..25]));
        assert!(t.ends_with(&s[s.len() - 75..]));
        assert!(t.contains("900 characters omitted"));
        assert_eq!(head_tail("abc", 100), "abc");
    }
}
