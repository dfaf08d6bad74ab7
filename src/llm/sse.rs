//! A server-sent events reader for model streams: events split across network chunks,
//! multi-line `data:`, comments (keep-alives), and any of `\n`, `\r\n`, `\r` as line ends.

use futures::{Stream, StreamExt};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field; empty when the stream names none.
    pub event: String,
    pub data: String,
}

/// Turns bytes into events as lines complete; bytes of a character split across chunks
/// wait in the buffer until the line is whole.
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
    event: String,
    data: Vec<String>,
    /// A `\r` ended the last line; a `\n` right after it belongs to the same line end.
    after_cr: bool,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) {
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.buf);
                    self.line(&String::from_utf8_lossy(&line), out);
                }
                _ => self.buf.push(b),
            }
        }
    }

    /// Dispatches what is left when the stream ends without a final blank line.
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.line(&String::from_utf8_lossy(&line), out);
        }
        self.line("", out);
    }

    fn line(&mut self, line: &str, out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if !self.data.is_empty() {
                out.push(SseEvent {
                    event: std::mem::take(&mut self.event),
                    data: self.data.join("\n"),
                });
                self.data.clear();
            }
            self.event.clear();
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => self.data.push(value.to_string()),
            "event" => self.event = value.to_string(),
            _ => {}
        }
    }
}

/// The events of a byte stream; a transport error ends the stream with that error.
pub fn events<S, B, E>(bytes: S) -> impl Stream<Item = Result<SseEvent, E>>
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
{
    futures::stream::unfold(
        (
            bytes,
            SseParser::default(),
            std::collections::VecDeque::new(),
            false,
        ),
        |(mut bytes, mut parser, mut ready, mut ended)| async move {
            loop {
                if let Some(e) = ready.pop_front() {
                    return Some((Ok(e), (bytes, parser, ready, ended)));
                }
                if ended {
                    return None;
                }
                let mut out = vec![];
                match bytes.next().await {
                    Some(Ok(chunk)) => parser.push(chunk.as_ref(), &mut out),
                    Some(Err(e)) => return Some((Err(e), (bytes, parser, ready, true))),
                    None => {
                        parser.finish(&mut out);
                        ended = true;
                    }
                }
                ready.extend(out);
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], piece: usize) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = vec![];
        for chunk in input.chunks(piece) {
            p.push(chunk, &mut out);
        }
        p.finish(&mut out);
        out
    }

    #[test]
    fn events_survive_any_chunking_and_line_ending() {
        let input = "event: message_start\r\ndata: {\"a\":\"é\"}\r\n\r\n: keep-alive\n\ndata: x\rdata: y\r\rdata: last";
        let want = vec![
            SseEvent {
                event: "message_start".into(),
                data: "{\"a\":\"é\"}".into(),
            },
            SseEvent {
                event: String::new(),
                data: "x\ny".into(),
            },
            SseEvent {
                event: String::new(),
                data: "last".into(),
            },
        ];
        for piece in [1, 2, 3, 7, 1000] {
            assert_eq!(
                parse_in_pieces(input.as_bytes(), piece),
                want,
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn data_without_a_space_and_unknown_fields_are_handled() {
        let out = parse_in_pieces(b"id: 1\nretry: 5\ndata:{}\n\n", 4);
        assert_eq!(
            out,
            vec![SseEvent {
                event: String::new(),
                data: "{}".into()
            }]
        );
    }

    #[tokio::test]
    async fn a_byte_stream_becomes_events() {
        let chunks: Vec<Result<&[u8], ()>> = vec![Ok(b"data: 1\n"), Ok(b"\ndata: 2\n\n")];
        let got: Vec<_> = events(futures::stream::iter(chunks)).collect().await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].as_ref().unwrap().data, "2");
    }
}
