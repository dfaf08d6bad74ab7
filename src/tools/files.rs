//! `read`, `write` and `edit`: files in the session's sandbox, with ml-intern's parameters
//! and its read-before-overwrite rule.
//!
//! Paths: a relative path is taken from the workspace (`/workspace`); an absolute path may
//! point anywhere in the sandbox container. The container is the boundary: it runs as a
//! non-root user, so what it may change is what that user may change.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::bash::DEFAULT_WORK_DIR;
use super::edit_match;
use super::{Tool, ToolFailure, ToolOutput};
use crate::agent::ChatMessage;
use crate::llm::ToolSpec;

pub const READ_TOOL: &str = "read";
pub const WRITE_TOOL: &str = "write";
pub const EDIT_TOOL: &str = "edit";

/// Lines `read` shows when the model asks for no limit.
pub const DEFAULT_READ_LINES: usize = 2000;
/// Longer lines are cut (minified files, data dumps).
pub const MAX_LINE_CHARS: usize = 4000;
/// Most bytes one `read` brings back.
pub const READ_MAX_BYTES: u64 = 2 * 1024 * 1024;
/// Largest file `edit` rewrites, and largest `write`.
pub const EDIT_MAX_BYTES: u64 = 16 * 1024 * 1024;
pub const WRITE_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Why a file operation did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileError {
    NotFound,
    IsDirectory,
    /// Not text: NUL bytes near its start.
    Binary,
    /// The file exists and the write was asked not to replace it.
    Exists,
    /// Bigger than the limit the caller gave.
    TooLarge,
    /// The sandbox said no (permissions, disk full); its words.
    Refused(String),
    /// The sandbox itself cannot be used; ends the session like any tool failure.
    Unavailable(ToolFailure),
}

/// Where the session's files live (the sandbox pod).
#[async_trait]
pub trait FileSystem: Send + Sync {
    /// Lines `first..=last` (1-based), or the whole file when `lines` is None; at most
    /// `max_bytes` bytes (TooLarge for a whole file above it).
    async fn read(
        &self,
        path: &str,
        lines: Option<(usize, usize)>,
        max_bytes: u64,
    ) -> Result<Vec<u8>, FileError>;

    /// Replaces the file atomically, creating parent directories; with `overwrite` false, an
    /// existing file is left alone (`Exists`).
    async fn write(&self, path: &str, content: &[u8], overwrite: bool) -> Result<(), FileError>;
}

/// The absolute, lexically normalized form of `path` (relative to the workspace).
pub fn resolve(path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{DEFAULT_WORK_DIR}/{path}")
    };
    let mut parts: Vec<&str> = vec![];
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The files of one session and which of them the model has seen, so it does not
/// overwrite work it never read.
pub struct Files {
    fs: Arc<dyn FileSystem>,
    seen: Mutex<HashSet<String>>,
}

impl Files {
    pub fn new(fs: Arc<dyn FileSystem>) -> Arc<Self> {
        Arc::new(Files {
            fs,
            seen: Mutex::new(HashSet::new()),
        })
    }

    /// After a restart: the paths the conversation already read or wrote count as seen.
    pub fn remember_from(&self, history: &[ChatMessage]) {
        for m in history {
            if let ChatMessage::Assistant { tool_calls, .. } = m {
                for call in tool_calls {
                    if [READ_TOOL, WRITE_TOOL, EDIT_TOOL].contains(&call.name.as_str())
                        && let Ok(args) = serde_json::from_str::<Value>(&call.arguments)
                        && let Some(path) = args["path"].as_str()
                    {
                        self.mark_seen(&resolve(path));
                    }
                }
            }
        }
    }

    fn mark_seen(&self, path: &str) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(path.to_string());
        }
    }

    fn has_seen(&self, path: &str) -> bool {
        self.seen.lock().is_ok_and(|s| s.contains(path))
    }

    /// The three tools, sharing what was seen.
    pub fn tools(self: &Arc<Self>) -> Vec<Arc<dyn Tool>> {
        vec![
            Arc::new(ReadTool(self.clone())),
            Arc::new(WriteTool(self.clone())),
            Arc::new(EditTool(self.clone())),
        ]
    }
}

fn parse<'a, T: Deserialize<'a>>(tool: &str, arguments: &'a Value) -> Result<T, ToolOutput> {
    T::deserialize(arguments)
        .map_err(|e| ToolOutput::error(format!("ERROR: invalid arguments for {tool}: {e}.")))
}

/// The model's message for an error, or the failure that ends the session.
fn explain(path: &str, e: FileError) -> Result<ToolOutput, ToolFailure> {
    let text = match e {
        FileError::NotFound => format!("ERROR: {path} does not exist."),
        FileError::IsDirectory => {
            format!("ERROR: {path} is a directory; list it with bash (ls {path}).")
        }
        FileError::Exists => format!("ERROR: {path} exists already."),
        FileError::Binary => format!(
            "ERROR: {path} is a binary file; inspect it with bash (e.g. `file {path}`, \
             `head -c 256 {path} | od -c`) or load it with a library."
        ),
        FileError::TooLarge => format!(
            "ERROR: {path} is larger than {} MiB; work on it with bash (head, sed, split).",
            EDIT_MAX_BYTES / (1024 * 1024)
        ),
        FileError::Refused(why) => format!("ERROR: {path}: {}", why.trim()),
        FileError::Unavailable(f) => return Err(f),
    };
    Ok(ToolOutput::error(text))
}

fn lenient_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_u64()
            .map(|v| Some(v as usize))
            .ok_or_else(|| D::Error::custom("expected a positive whole number")),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => s
            .trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|_| D::Error::custom(format!("{s:?} is not a whole number"))),
        other => Err(D::Error::custom(format!(
            "expected a whole number, not {other}"
        ))),
    }
}

struct ReadTool(Arc<Files>);

#[derive(Deserialize)]
struct ReadArgs {
    path: String,
    #[serde(default, deserialize_with = "lenient_count")]
    offset: Option<usize>,
    #[serde(default, deserialize_with = "lenient_count")]
    limit: Option<usize>,
}

#[async_trait]
impl Tool for ReadTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: READ_TOOL.into(),
            description: format!(
                "Read a text file in the sandbox. Lines are numbered (`N<TAB>line`), \
                 {DEFAULT_READ_LINES} lines by default; use offset and limit for long files. \
                 Lines over {MAX_LINE_CHARS} characters are cut. Relative paths start at \
                 {DEFAULT_WORK_DIR}. Read a file before you overwrite or edit it."
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File to read."},
                    "offset": {"type": "integer", "description": "First line to show, from 1."},
                    "limit": {"type": "integer", "description": format!("Most lines to show (default {DEFAULT_READ_LINES}).")}
                },
                "required": ["path"]
            }),
        }
    }

    async fn call(&self, arguments: Value) -> Result<ToolOutput, ToolFailure> {
        let args: ReadArgs = match parse(READ_TOOL, &arguments) {
            Ok(a) => a,
            Err(e) => return Ok(e),
        };
        let path = resolve(&args.path);
        let first = args.offset.unwrap_or(1).max(1);
        let limit = args.limit.unwrap_or(DEFAULT_READ_LINES).max(1);
        // One line more than shown says whether more follow.
        let bytes = match self
            .0
            .fs
            .read(&path, Some((first, first + limit)), READ_MAX_BYTES)
            .await
        {
            Ok(b) => b,
            Err(e) => return explain(&path, e),
        };
        if bytes.contains(&0) {
            return explain(&path, FileError::Binary);
        }
        self.0.mark_seen(&path);
        let text = String::from_utf8_lossy(&bytes);
        if text.is_empty() {
            return Ok(ToolOutput::ok(if first == 1 {
                format!("({path} is empty)")
            } else {
                format!("({path} has fewer than {first} lines)")
            }));
        }
        Ok(ToolOutput::ok(number_lines(
            &text,
            first,
            limit,
            bytes.len() as u64 >= READ_MAX_BYTES,
        )))
    }
}

/// `%6d\t<line>` for up to `limit` lines, and a note on what was left out.
fn number_lines(text: &str, first: usize, limit: usize, cut_by_size: bool) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let shown = lines.len().min(limit);
    for (i, line) in lines.iter().take(shown).enumerate() {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = match line.char_indices().nth(MAX_LINE_CHARS) {
            Some((cut, _)) => format!("{}...", &line[..cut]),
            None => line.to_string(),
        };
        out.push_str(&format!("{:>6}\t{line}\n", first + i));
    }
    let last = first + shown - 1;
    if lines.len() > limit || cut_by_size {
        out.push_str(&format!(
            "\n(showing lines {first}-{last}; more follow: read again with offset={})\n",
            last + 1
        ));
    }
    out
}

struct WriteTool(Arc<Files>);

#[derive(Deserialize)]
struct WriteArgs {
    path: String,
    content: String,
}

#[async_trait]
impl Tool for WriteTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: WRITE_TOOL.into(),
            description: format!(
                "Write a file in the sandbox, creating parent directories; the file is \
                 replaced atomically. An existing file must be read first. Relative paths \
                 start at {DEFAULT_WORK_DIR}."
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File to write."},
                    "content": {"type": "string", "description": "The whole new content."}
                },
                "required": ["path", "content"]
            }),
        }
    }

    async fn call(&self, arguments: Value) -> Result<ToolOutput, ToolFailure> {
        let args: WriteArgs = match parse(WRITE_TOOL, &arguments) {
            Ok(a) => a,
            Err(e) => return Ok(e),
        };
        let path = resolve(&args.path);
        if args.content.len() > WRITE_MAX_BYTES {
            return Ok(ToolOutput::error(format!(
                "ERROR: content is {} bytes, above the {} MiB a write takes; generate large \
                 files with a script instead.",
                args.content.len(),
                WRITE_MAX_BYTES / (1024 * 1024)
            )));
        }
        let overwrite = self.0.has_seen(&path);
        match self
            .0
            .fs
            .write(&path, args.content.as_bytes(), overwrite)
            .await
        {
            Ok(()) => {}
            Err(FileError::Exists) => {
                return Ok(ToolOutput::error(format!(
                    "ERROR: {path} exists and was not read in this session; read it first so \
                     nothing is overwritten unseen, then write again (or use edit)."
                )));
            }
            Err(e) => return explain(&path, e),
        }
        self.0.mark_seen(&path);
        let lines = args.content.lines().count();
        Ok(ToolOutput::ok(format!(
            "Wrote {} bytes ({lines} lines) to {path}.",
            args.content.len()
        )))
    }
}

struct EditTool(Arc<Files>);

#[derive(Deserialize)]
struct EditArgs {
    path: String,
    old_str: String,
    new_str: String,
    #[serde(default)]
    replace_all: bool,
    #[serde(default)]
    mode: Option<String>,
}

#[async_trait]
impl Tool for EditTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: EDIT_TOOL.into(),
            description: "Edit a file in the sandbox that you have read: replace old_str with \
                 new_str (or insert new_str after or before it, with mode). old_str must occur \
                 exactly once unless replace_all is true; give enough surrounding lines to make \
                 it unique. Whitespace and quote differences are forgiven when nothing matches \
                 exactly."
                .into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File to edit."},
                    "old_str": {"type": "string", "description": "Text to find."},
                    "new_str": {"type": "string", "description": "Replacement (or text to insert)."},
                    "replace_all": {"type": "boolean", "description": "Change every occurrence (default false)."},
                    "mode": {"type": "string", "enum": ["replace", "append_after", "prepend_before"], "description": "replace (default), or insert new_str after or before old_str."}
                },
                "required": ["path", "old_str", "new_str"]
            }),
        }
    }

    async fn call(&self, arguments: Value) -> Result<ToolOutput, ToolFailure> {
        let args: EditArgs = match parse(EDIT_TOOL, &arguments) {
            Ok(a) => a,
            Err(e) => return Ok(e),
        };
        let path = resolve(&args.path);
        let (mode, replace_all) = match args.mode.as_deref().unwrap_or("replace") {
            "replace" => (Mode::Replace, args.replace_all),
            "replace_all" => (Mode::Replace, true),
            "append_after" => (Mode::After, args.replace_all),
            "prepend_before" => (Mode::Before, args.replace_all),
            other => {
                return Ok(ToolOutput::error(format!(
                    "ERROR: mode {other:?} is not one of replace, append_after, prepend_before."
                )));
            }
        };
        if args.old_str.is_empty() {
            return Ok(ToolOutput::error(
                "ERROR: old_str is empty; to create or replace a whole file use write.",
            ));
        }
        if mode == Mode::Replace && args.old_str == args.new_str {
            return Ok(ToolOutput::error(
                "ERROR: old_str and new_str are the same; nothing would change.",
            ));
        }
        if !self.0.has_seen(&path) {
            return Ok(ToolOutput::error(format!(
                "ERROR: {path} was not read in this session; read it first, then edit."
            )));
        }
        let bytes = match self.0.fs.read(&path, None, EDIT_MAX_BYTES).await {
            Ok(b) => b,
            Err(e) => return explain(&path, e),
        };
        let Ok(content) = String::from_utf8(bytes) else {
            return Ok(ToolOutput::error(format!(
                "ERROR: {path} is not UTF-8 text; change it with bash or a script."
            )));
        };
        let found = edit_match::find(&content, &args.old_str);
        let lines: Vec<String> = found
            .ranges
            .iter()
            .map(|(s, _)| edit_match::line_of(&content, *s).to_string())
            .collect();
        match found.ranges.len() {
            0 => {
                return Ok(ToolOutput::error(format!(
                    "ERROR: old_str was not found in {path}. The file may have changed: read \
                     it again and copy the text exactly."
                )));
            }
            n if n > 1 && !replace_all => {
                return Ok(ToolOutput::error(format!(
                    "ERROR: old_str occurs {n} times in {path} (lines {}); add surrounding \
                     lines to make it unique, or set replace_all to change all of them.",
                    lines.join(", ")
                )));
            }
            _ => {}
        }
        let updated = apply(&content, &found.ranges, &args.new_str, mode);
        match self.0.fs.write(&path, updated.as_bytes(), true).await {
            Ok(()) => {}
            Err(e) => return explain(&path, e),
        }
        let count = found.ranges.len();
        let mut text = format!(
            "Edited {path}: {} {count} occurrence{} (line{} {}).",
            match mode {
                Mode::Replace => "replaced",
                Mode::After => "inserted after",
                Mode::Before => "inserted before",
            },
            if count == 1 { "" } else { "s" },
            if count == 1 { "" } else { "s" },
            lines.join(", ")
        );
        if let Some(what) = found.forgiven {
            text.push_str(&format!(" (matched after ignoring differences in {what})"));
        }
        Ok(ToolOutput::ok(text))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Replace,
    After,
    Before,
}

fn apply(content: &str, ranges: &[(usize, usize)], new: &str, mode: Mode) -> String {
    let mut out = String::with_capacity(content.len() + new.len() * ranges.len());
    let mut at = 0;
    for &(s, e) in ranges {
        out.push_str(&content[at..s]);
        match mode {
            Mode::Replace => out.push_str(new),
            Mode::After => {
                out.push_str(&content[s..e]);
                out.push_str(new);
            }
            Mode::Before => {
                out.push_str(new);
                out.push_str(&content[s..e]);
            }
        }
        at = e;
    }
    out.push_str(&content[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Files in memory, with the sandbox's behaviour for the cases the tools handle.
    #[derive(Default)]
    struct MemFs(Mutex<HashMap<String, Vec<u8>>>);

    #[async_trait]
    impl FileSystem for MemFs {
        async fn read(
            &self,
            path: &str,
            lines: Option<(usize, usize)>,
            max_bytes: u64,
        ) -> Result<Vec<u8>, FileError> {
            let files = self.0.lock().unwrap();
            let bytes = files.get(path).ok_or(FileError::NotFound)?;
            match lines {
                None if bytes.len() as u64 > max_bytes => Err(FileError::TooLarge),
                None => Ok(bytes.clone()),
                Some((a, b)) => {
                    let text = String::from_utf8_lossy(bytes);
                    let picked: String = text
                        .split_inclusive('\n')
                        .skip(a - 1)
                        .take(b - a + 1)
                        .collect();
                    Ok(picked.into_bytes())
                }
            }
        }

        async fn write(
            &self,
            path: &str,
            content: &[u8],
            overwrite: bool,
        ) -> Result<(), FileError> {
            let mut files = self.0.lock().unwrap();
            if !overwrite && files.contains_key(path) {
                return Err(FileError::Exists);
            }
            files.insert(path.to_string(), content.to_vec());
            Ok(())
        }
    }

    fn tools(fs: Arc<MemFs>) -> (Arc<dyn Tool>, Arc<dyn Tool>, Arc<dyn Tool>) {
        let files = Files::new(fs);
        let t = files.tools();
        (t[0].clone(), t[1].clone(), t[2].clone())
    }

    #[test]
    fn paths_resolve_from_the_workspace() {
        assert_eq!(resolve("train.py"), "/workspace/train.py");
        assert_eq!(resolve("./a/../b/c.txt"), "/workspace/b/c.txt");
        assert_eq!(resolve("/tmp//x"), "/tmp/x");
        assert_eq!(resolve("../../etc/passwd"), "/etc/passwd");
    }

    #[tokio::test]
    async fn an_existing_file_is_only_overwritten_or_edited_after_a_read() {
        let fs = Arc::new(MemFs::default());
        fs.0.lock()
            .unwrap()
            .insert("/workspace/a.py".into(), b"x = 1\ny = 2\n".to_vec());
        let (read, write, edit) = tools(fs.clone());
        let w = write
            .call(json!({"path": "a.py", "content": "gone"}))
            .await
            .unwrap();
        assert!(
            !w.success && w.content.contains("read it first"),
            "{}",
            w.content
        );
        let e = edit
            .call(json!({"path": "a.py", "old_str": "x = 1", "new_str": "x = 3"}))
            .await
            .unwrap();
        assert!(
            !e.success && e.content.contains("not read"),
            "{}",
            e.content
        );
        let r = read.call(json!({"path": "/workspace/a.py"})).await.unwrap();
        assert_eq!(r.content, "     1\tx = 1\n     2\ty = 2\n");
        let e = edit
            .call(json!({"path": "a.py", "old_str": "x = 1", "new_str": "x = 3"}))
            .await
            .unwrap();
        assert!(e.success, "{}", e.content);
        assert_eq!(fs.0.lock().unwrap()["/workspace/a.py"], b"x = 3\ny = 2\n");
        // A new file needs no read.
        let w = write
            .call(json!({"path": "new/b.txt", "content": "hi\n"}))
            .await
            .unwrap();
        assert_eq!(
            w.content,
            "Wrote 3 bytes (1 lines) to /workspace/new/b.txt."
        );
    }

    #[tokio::test]
    async fn edit_errors_are_precise() {
        let fs = Arc::new(MemFs::default());
        fs.0.lock()
            .unwrap()
            .insert("/workspace/c.txt".into(), b"a\nb\na\n".to_vec());
        let (read, _, edit) = tools(fs.clone());
        read.call(json!({"path": "c.txt"})).await.unwrap();
        let twice = edit
            .call(json!({"path": "c.txt", "old_str": "a", "new_str": "z"}))
            .await
            .unwrap();
        assert!(twice.content.contains("occurs 2 times") && twice.content.contains("lines 1, 3"));
        let missing = edit
            .call(json!({"path": "c.txt", "old_str": "q", "new_str": "z"}))
            .await
            .unwrap();
        assert!(missing.content.contains("not found"));
        let same = edit
            .call(json!({"path": "c.txt", "old_str": "a", "new_str": "a"}))
            .await
            .unwrap();
        assert!(same.content.contains("the same"));
        let all = edit
            .call(json!({"path": "c.txt", "old_str": "a", "new_str": "z", "replace_all": true}))
            .await
            .unwrap();
        assert!(all.success && all.content.contains("2 occurrences"));
        let after = edit
            .call(json!({"path": "c.txt", "old_str": "b\n", "new_str": "b2\n", "mode": "append_after"}))
            .await
            .unwrap();
        assert!(after.success, "{}", after.content);
        assert_eq!(fs.0.lock().unwrap()["/workspace/c.txt"], b"z\nb\nb2\nz\n");
    }

    #[tokio::test]
    async fn reading_pages_cuts_long_lines_and_refuses_binaries() {
        let fs = Arc::new(MemFs::default());
        let long = "é".repeat(MAX_LINE_CHARS + 10);
        let text: String = (1..=5).map(|i| format!("line {i}\n")).collect::<String>() + &long;
        fs.0.lock()
            .unwrap()
            .insert("/workspace/t".into(), text.into_bytes());
        fs.0.lock()
            .unwrap()
            .insert("/workspace/bin".into(), vec![0x7f, b'E', 0, 1]);
        let (read, _, _) = tools(fs);
        let page = read
            .call(json!({"path": "t", "offset": 2, "limit": "2"}))
            .await
            .unwrap();
        assert_eq!(
            page.content,
            "     2\tline 2\n     3\tline 3\n\n(showing lines 2-3; more follow: read again with offset=4)\n"
        );
        let last = read.call(json!({"path": "t", "offset": 6})).await.unwrap();
        assert!(last.content.ends_with("...\n") && last.content.starts_with("     6\té"));
        assert_eq!(last.content.chars().count(), 7 + MAX_LINE_CHARS + 4);
        let bin = read.call(json!({"path": "bin"})).await.unwrap();
        assert!(!bin.success && bin.content.contains("binary"));
        let none = read.call(json!({"path": "nope"})).await.unwrap();
        assert_eq!(none.content, "ERROR: /workspace/nope does not exist.");
    }
}
