//! Finding the text an `edit` call means: exactly, or, as ml-intern does, after forgiving
//! the whitespace and typography differences models introduce when they quote a file.

/// Byte ranges of `content` that `needle` stands for, and how they were found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matches {
    pub ranges: Vec<(usize, usize)>,
    /// None for an exact match, else what was forgiven (for the note to the model).
    pub forgiven: Option<&'static str>,
}

/// Makes a line comparable while forgiving one kind of difference.
type Normalize = fn(&str) -> String;

/// Line-wise comparisons tried in order when the exact text is not there.
const FALLBACKS: &[(&str, Normalize)] = &[
    ("trailing whitespace", |l| l.trim_end().to_string()),
    ("leading and trailing whitespace", |l| l.trim().to_string()),
    ("unicode punctuation and whitespace", |l| {
        normalize_unicode(l).trim().to_string()
    }),
];

pub fn find(content: &str, needle: &str) -> Matches {
    let exact: Vec<(usize, usize)> = content
        .match_indices(needle)
        .map(|(i, m)| (i, i + m.len()))
        .collect();
    if !exact.is_empty() || needle.is_empty() {
        return Matches {
            ranges: exact,
            forgiven: None,
        };
    }
    for (what, normalize) in FALLBACKS {
        let ranges = find_lines(content, needle, *normalize);
        if !ranges.is_empty() {
            return Matches {
                ranges,
                forgiven: Some(what),
            };
        }
    }
    Matches {
        ranges: vec![],
        forgiven: None,
    }
}

/// Runs of whole lines of `content` equal to the lines of `needle` once both are
/// normalized; the ranges cover the original lines without their final line break.
fn find_lines(content: &str, needle: &str, normalize: Normalize) -> Vec<(usize, usize)> {
    let wanted: Vec<String> = needle
        .trim_end_matches('\n')
        .split('\n')
        .map(normalize)
        .collect();
    if wanted.iter().all(|l| l.is_empty()) {
        return vec![];
    }
    // (start, end without the newline) of every line.
    let mut lines = vec![];
    let mut start = 0;
    for (i, c) in content.char_indices() {
        if c == '\n' {
            lines.push((start, i));
            start = i + 1;
        }
    }
    if start < content.len() {
        lines.push((start, content.len()));
    }
    let normalized: Vec<String> = lines
        .iter()
        .map(|(s, e)| normalize(&content[*s..*e]))
        .collect();
    let mut found = vec![];
    let mut i = 0;
    while i + wanted.len() <= lines.len() {
        if normalized[i..i + wanted.len()] == wanted[..] {
            found.push((lines[i].0, lines[i + wanted.len() - 1].1));
            i += wanted.len();
        } else {
            i += 1;
        }
    }
    found
}

/// Dashes, quotes and odd spaces as a model tends to retype them.
fn normalize_unicode(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '\u{200b}' | '\u{200c}' | '\u{200d}' | '\u{feff}'))
        .map(|c| match c {
            '\u{2010}'..='\u{2015}' | '\u{2212}' => '-',
            '\u{2018}' | '\u{2019}' | '\u{201a}' | '\u{201b}' => '\'',
            '\u{201c}' | '\u{201d}' | '\u{201e}' | '\u{201f}' => '"',
            '\u{00a0}' | '\u{2000}'..='\u{200a}' | '\u{202f}' | '\u{205f}' | '\u{3000}' => ' ',
            other => other,
        })
        .collect()
}

/// 1-based line number of byte offset `at`.
pub fn line_of(content: &str, at: usize) -> usize {
    content[..at.min(content.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_matches_come_first_and_all_are_found() {
        let m = find("a = 1\nb = 1\na = 1\n", "a = 1");
        assert_eq!(m.ranges, vec![(0, 5), (12, 17)]);
        assert_eq!(m.forgiven, None);
    }

    #[test]
    fn retyped_whitespace_and_quotes_still_match_the_original_lines() {
        let content = "def f():\n    return “x” \t\n\nprint(f())\n";
        let m = find(content, "def f():\n  return \"x\"\n");
        assert_eq!(m.forgiven, Some("unicode punctuation and whitespace"));
        assert_eq!(m.ranges.len(), 1);
        let (s, e) = m.ranges[0];
        assert_eq!(&content[s..e], "def f():\n    return “x” \t");

        let m = find("x = 1   \ny = 2\n", "x = 1\ny = 2");
        assert_eq!(m.forgiven, Some("trailing whitespace"));
        assert_eq!(m.ranges, vec![(0, 14)]);
    }

    #[test]
    fn nothing_matches_nothing() {
        assert!(find("abc\n", "xyz").ranges.is_empty());
        assert!(find("abc\n", "\n\n").ranges.is_empty());
        assert_eq!(line_of("a\nb\nc", 4), 3);
    }
}
