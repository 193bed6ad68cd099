//! Server-sent events as they stream (the WHATWG HTML standard's `text/event-stream`): lines split
//! as bytes arrive, whatever the pieces, into events (`event:` and `data:` fields up to a blank
//! line). Bounded: a line longer than [`MAX_LINE`] is dropped whole (and its event with it).

/// The longest line kept, in bytes. Providers' events are a few hundred bytes; a longer line is
/// not one to read usage from.
pub const MAX_LINE: usize = 1 << 20;

/// One event: its `event:` name, if any, and its `data:` lines joined by `\n`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: Option<String>,
    pub data: String,
}

/// Splits a stream into events.
#[derive(Debug, Default)]
pub struct Events {
    line: Vec<u8>,
    /// The current line went over [`MAX_LINE`]: skipped to its end.
    skipping: bool,
    /// The current event lost a line: dropped at its end.
    damaged: bool,
    current: Event,
    has_data: bool,
}

impl Events {
    /// Feeds `bytes`; `f` gets each event that ends in them.
    pub fn feed(&mut self, bytes: &[u8], mut f: impl FnMut(Event)) {
        let mut rest = bytes;
        while !rest.is_empty() {
            match rest.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    let (piece, after) = rest.split_at(i);
                    rest = after.get(1..).unwrap_or_default();
                    self.take(piece);
                    let skipped = std::mem::take(&mut self.skipping);
                    let mut line = std::mem::take(&mut self.line);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if skipped {
                        self.damaged = true;
                    } else {
                        self.line_done(&line, &mut f);
                    }
                    line.clear();
                    self.line = line;
                }
                None => {
                    self.take(rest);
                    rest = &[];
                }
            }
        }
    }

    fn take(&mut self, piece: &[u8]) {
        if self.skipping {
            return;
        }
        if self.line.len() + piece.len() > MAX_LINE {
            self.skipping = true;
            self.line = Vec::new();
            return;
        }
        self.line.extend_from_slice(piece);
    }

    fn line_done(&mut self, line: &[u8], f: &mut impl FnMut(Event)) {
        if line.is_empty() {
            let event = std::mem::take(&mut self.current);
            let (had, damaged) = (std::mem::take(&mut self.has_data), std::mem::take(&mut self.damaged));
            if (had || event.name.is_some()) && !damaged {
                f(event);
            }
            return;
        }
        if line.first() == Some(&b':') {
            return; // a comment
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => {
                let v = line.get(i + 1..).unwrap_or_default();
                (line.get(..i).unwrap_or_default(), v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(&value);
                self.has_data = true;
            }
            b"event" => self.current.name = Some(value.into_owned()),
            _ => {}
        }
    }
}

/// Writes an event as SSE bytes.
pub fn write_event(out: &mut Vec<u8>, name: Option<&str>, data: &str) {
    if let Some(n) = name {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(n.as_bytes());
        out.push(b'\n');
    }
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(pieces: &[&[u8]]) -> Vec<Event> {
        let mut e = Events::default();
        let mut out = Vec::new();
        for p in pieces {
            e.feed(p, |ev| out.push(ev));
        }
        out
    }

    #[test]
    fn events_are_found_whatever_the_pieces() {
        let stream: &[u8] =
            b": keep-alive\n\nevent: message_start\r\ndata: {\"a\":1}\r\n\r\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        let whole = all(&[stream]);
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[0], Event { name: Some("message_start".into()), data: "{\"a\":1}".into() });
        assert_eq!(whole[1].data, "x\ny");
        assert_eq!(whole[2].data, "[DONE]");
        // Byte by byte: the same events.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(all(&bytes), whole);
        // An event not yet ended is not given.
        assert!(all(&[b"data: partial"]).is_empty());
    }

    #[test]
    fn a_line_over_the_bound_drops_its_event_only() {
        let long = vec![b'a'; MAX_LINE + 10];
        let mut e = Events::default();
        let mut out = Vec::new();
        e.feed(b"data: ", |ev| out.push(ev));
        for c in long.chunks(4096) {
            e.feed(c, |ev| out.push(ev));
        }
        e.feed(b"\n\ndata: next\n\n", |ev| out.push(ev));
        assert_eq!(out, vec![Event { name: None, data: "next".into() }]);
        assert!(e.line.capacity() <= MAX_LINE + 4096);
    }

    #[test]
    fn events_are_written_back() {
        let mut out = Vec::new();
        write_event(&mut out, Some("ping"), "a\nb");
        assert_eq!(out, b"event: ping\ndata: a\ndata: b\n\n");
        assert_eq!(all(&[&out]), vec![Event { name: Some("ping".into()), data: "a\nb".into() }]);
    }
}
