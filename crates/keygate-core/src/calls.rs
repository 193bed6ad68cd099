//! The call log's storage format (issue 15): calls are stored in **chunks**, one row per
//! workspace, token and app per write (at most [`CHUNK_CALLS`] calls each), rather than one
//! row per call. At tens of thousands of calls a second a row per call cost more CPU than the
//! gateway itself (docs/benchmarks.md, "What anomaly detection and the call log cost"); a chunk
//! costs one row and a few bytes per call.
//!
//! A chunk's bytes (version 1), every integer an unsigned LEB128 varint:
//!
//! ```text
//! chunk   = 0x01 zigzag(base_ms) n_strings string* n_calls call*
//! string  = len utf8-bytes                      ; each distinct text once
//! call    = zigzag(at_ms - base_ms) method route+1|0 path status latency_us client_ip refusal+1|0
//! ```
//!
//! where method, route, path, client_ip and refusal are indexes into the strings. The workspace,
//! token and app are the row's columns, not repeated inside. A call's id is its chunk's id ×
//! [`CHUNK_CALLS`] + its index in the chunk, so ids still grow with the writes and a list's
//! cursor is still one number.
//!
//! Decoding never panics and never allocates more than the input can describe: any chunk that is
//! not exactly what [`encode_chunk`] writes is refused with an error.

use std::collections::HashMap;

use crate::Timestamp;
use crate::error::{Error, Result};
use crate::ids::{AppId, TokenId, WorkspaceId};
use crate::model::CallRecord;

/// Calls in one chunk at most.
pub const CHUNK_CALLS: usize = 4096;
const VERSION: u8 = 1;
/// Strings a call can add to a chunk's table (method, route, path, client address, refusal).
const STRINGS_PER_CALL: usize = 5;

/// The id of the `index`th call of chunk `chunk`.
pub fn call_id(chunk: i64, index: usize) -> i64 {
    chunk.saturating_mul(CHUNK_CALLS as i64).saturating_add(i64::try_from(index).unwrap_or(0))
}

/// The chunk and the index of a call's id (the inverse of [`call_id`]).
pub fn split_call_id(id: i64) -> (i64, usize) {
    let n = CHUNK_CALLS as i64;
    (id.div_euclid(n), usize::try_from(id.rem_euclid(n)).unwrap_or(0))
}

/// Encodes up to [`CHUNK_CALLS`] calls of one workspace, token and app (the caller groups them;
/// their ids, workspace, token and app are not written). Extra calls are not written.
pub fn encode_chunk(calls: &[&CallRecord]) -> Vec<u8> {
    let mut b = ChunkBuilder::default();
    for c in calls {
        if !b.push(&CallFields::of(c)) {
            break;
        }
    }
    b.finish()
}

/// One call's fields, borrowed, as [`ChunkBuilder::push`] takes them.
#[derive(Debug, Clone, Copy)]
pub struct CallFields<'a> {
    pub at_ms: i64,
    pub method: &'a str,
    pub route: Option<&'a str>,
    pub path: &'a str,
    pub status: u16,
    pub latency_us: u64,
    pub client_ip: &'a str,
    pub refusal: Option<&'a str>,
}

impl<'a> CallFields<'a> {
    pub fn of(c: &'a CallRecord) -> Self {
        Self {
            at_ms: c.at.as_millis(),
            method: &c.method,
            route: c.route.as_deref(),
            path: &c.path,
            status: c.status,
            latency_us: c.latency_us,
            client_ip: &c.client_ip,
            refusal: c.refusal.as_deref(),
        }
    }
}

/// A chunk being written, one call at a time: what the call writer holds for a token between
/// writes (a few bytes per call, each distinct text once).
///
/// A token's calls mostly repeat their texts (one method, route and address; often one path),
/// so each of a call's five texts is first compared with the same field's text in the call
/// before, and only a different one is looked up in the table (a hash of it and a probe): that
/// lookup per text was most of the writer's work per call (docs/benchmarks.md).
#[derive(Debug, Default)]
pub struct ChunkBuilder {
    base: Option<i64>,
    first_at: i64,
    last_at: i64,
    calls: usize,
    /// Each distinct text once, in the order of their indexes.
    strings: Vec<Box<str>>,
    /// Their indexes, by the text's hash.
    index: hashbrown::HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    /// For each field (method, route, path, client address, refusal), the index of the previous
    /// call's text.
    last: [Option<u32>; STRINGS_PER_CALL],
    /// Their bytes.
    text_bytes: usize,
    body: Vec<u8>,
}

impl ChunkBuilder {
    /// Adds a call; `false` (and nothing added) when the chunk holds [`CHUNK_CALLS`] already.
    pub fn push(&mut self, c: &CallFields<'_>) -> bool {
        if self.calls >= CHUNK_CALLS {
            return false;
        }
        let base = *self.base.get_or_insert(c.at_ms);
        if self.calls == 0 {
            // Room for a few dozen calls and texts at once, rather than growing from nothing.
            self.body.reserve(256);
            self.strings.reserve(8);
            (self.first_at, self.last_at) = (c.at_ms, c.at_ms);
        }
        self.first_at = self.first_at.min(c.at_ms);
        self.last_at = self.last_at.max(c.at_ms);
        put(&mut self.body, zigzag(c.at_ms.wrapping_sub(base)));
        let method = self.intern(0, c.method);
        let route = c.route.map_or(0, |r| self.intern(1, r) + 1);
        let path = self.intern(2, c.path);
        let ip = self.intern(3, c.client_ip);
        let refusal = c.refusal.map_or(0, |r| self.intern(4, r) + 1);
        for v in [method, route, path, u64::from(c.status), c.latency_us, ip, refusal] {
            put(&mut self.body, v);
        }
        self.calls += 1;
        true
    }

    /// The index of text `s`, the call's `field`th, added to the table when new.
    fn intern(&mut self, field: usize, s: &str) -> u64 {
        use std::hash::BuildHasher as _;
        if let Some(i) = self.last[field]
            && self.strings.get(i as usize).is_some_and(|t| **t == *s)
        {
            return u64::from(i);
        }
        let strings = &mut self.strings;
        let hasher = &self.hasher;
        let i = *self
            .index
            .entry(hasher.hash_one(s), |&i| *strings[i as usize] == *s, |&i| hasher.hash_one(&*strings[i as usize]))
            .or_insert_with(|| {
                strings.push(s.into());
                self.text_bytes += s.len();
                (strings.len() - 1) as u32
            })
            .get();
        self.last[field] = Some(i);
        u64::from(i)
    }

    /// Calls in the chunk.
    pub fn len(&self) -> usize {
        self.calls
    }

    pub fn is_empty(&self) -> bool {
        self.calls == 0
    }

    /// The earliest and the latest time of its calls (0 when empty).
    pub fn span(&self) -> (i64, i64) {
        (self.first_at, self.last_at)
    }

    /// Bytes held, about (the encoded calls and the texts), for the writer's memory bound.
    pub fn held_bytes(&self) -> usize {
        self.body.capacity() + self.text_bytes + self.strings.len() * 32
    }

    /// The chunk's bytes, as [`decode_chunk`] reads them.
    pub fn finish(self) -> Vec<u8> {
        let strings = &self.strings;
        let mut out = Vec::with_capacity(self.body.len() + self.text_bytes + 2 * strings.len() + 16);
        out.push(VERSION);
        put(&mut out, zigzag(self.base.unwrap_or(0)));
        put(&mut out, strings.len() as u64);
        for s in strings {
            put(&mut out, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        }
        put(&mut out, self.calls as u64);
        out.extend_from_slice(&self.body);
        out
    }
}

/// Groups calls by workspace, token and app into chunks of at most [`CHUNK_CALLS`], ordered by
/// their newest call (so that ids, which lists show newest first, follow time as closely as
/// chunks allow).
pub fn chunk_calls(calls: &[CallRecord]) -> Vec<CallChunk> {
    type Key<'a> = (&'a WorkspaceId, Option<&'a TokenId>, Option<&'a AppId>);
    let mut open: HashMap<Key<'_>, ChunkBuilder, foldhash::fast::RandomState> = HashMap::default();
    let mut out = Vec::new();
    let finish =
        |(ws, token, app): Key<'_>, b: ChunkBuilder| CallChunk::new(ws.clone(), token.cloned(), app.cloned(), b);
    for c in calls {
        let key = (&c.workspace_id, c.token_id.as_ref(), c.app_id.as_ref());
        let b = open.entry(key).or_default();
        if !b.push(&CallFields::of(c)) {
            out.push(finish(key, std::mem::take(b)));
            b.push(&CallFields::of(c));
        }
    }
    out.extend(open.into_iter().map(|(k, b)| finish(k, b)));
    out.sort_by_key(|c| c.last_at);
    out
}

/// A finished chunk with the columns of its row, as the store writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallChunk {
    pub workspace_id: WorkspaceId,
    pub token_id: Option<TokenId>,
    pub app_id: Option<AppId>,
    pub first_at: i64,
    pub last_at: i64,
    pub calls: usize,
    pub data: Vec<u8>,
}

impl CallChunk {
    /// Finishes `builder` into the chunk of a workspace, token and app.
    pub fn new(workspace_id: WorkspaceId, token_id: Option<TokenId>, app_id: Option<AppId>, b: ChunkBuilder) -> Self {
        let (first_at, last_at) = b.span();
        let calls = b.len();
        Self { workspace_id, token_id, app_id, first_at, last_at, calls, data: b.finish() }
    }
}

/// Where a chunk came from: its row's id and columns.
#[derive(Debug, Clone, Copy)]
pub struct ChunkRow<'a> {
    pub id: i64,
    pub workspace_id: &'a WorkspaceId,
    pub token_id: Option<&'a TokenId>,
    pub app_id: Option<&'a AppId>,
}

/// The calls of a chunk, in the order they were written, with their ids and the row's
/// workspace, token and app.
pub fn decode_chunk(data: &[u8], row: ChunkRow<'_>) -> Result<Vec<CallRecord>> {
    let mut r = Reader { data, at: 0 };
    if r.byte()? != VERSION {
        return Err(corrupt());
    }
    let base = unzigzag(r.varint()?);
    let n_strings = r.count(CHUNK_CALLS * STRINGS_PER_CALL)?;
    let mut strings: Vec<&str> = Vec::with_capacity(n_strings.min(data.len()));
    for _ in 0..n_strings {
        let len = r.count(data.len())?;
        strings.push(std::str::from_utf8(r.take(len)?).map_err(|_| corrupt())?);
    }
    let n_calls = r.count(CHUNK_CALLS)?;
    // Each call takes at least eight bytes: a chunk cannot claim more calls than it holds.
    let mut calls = Vec::with_capacity(n_calls.min(r.remaining() / 8));
    let text = |i: u64| strings.get(usize::try_from(i).map_err(|_| corrupt())?).copied().ok_or_else(corrupt);
    let optional = |i: u64| if i == 0 { Ok(None) } else { text(i - 1).map(|s| Some(s.to_owned())) };
    for i in 0..n_calls {
        let at = base.wrapping_add(unzigzag(r.varint()?));
        let method = text(r.varint()?)?.to_owned();
        let route = optional(r.varint()?)?;
        let path = text(r.varint()?)?.to_owned();
        let status = u16::try_from(r.varint()?).map_err(|_| corrupt())?;
        let latency_us = r.varint()?;
        let client_ip = text(r.varint()?)?.to_owned();
        let refusal = optional(r.varint()?)?;
        calls.push(CallRecord {
            id: call_id(row.id, i),
            workspace_id: row.workspace_id.clone(),
            at: Timestamp::from_millis(at),
            token_id: row.token_id.cloned(),
            app_id: row.app_id.cloned(),
            route,
            method,
            path,
            status,
            latency_us,
            client_ip,
            refusal,
        });
    }
    if r.remaining() != 0 {
        return Err(corrupt());
    }
    Ok(calls)
}

fn corrupt() -> Error {
    Error::internal("a chunk of the call log is damaged and cannot be read")
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.at
    }

    fn byte(&mut self) -> Result<u8> {
        let b = *self.data.get(self.at).ok_or_else(corrupt)?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.data.len()).ok_or_else(corrupt)?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let part = u64::from(b & 0x7f);
            // The tenth byte may carry one bit only; and no byte may be a needless zero.
            if shift == 63 && part > 1 || (b == 0 && shift > 0) {
                return Err(corrupt());
            }
            v |= part << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt())
    }

    /// A count or a length of at most `max`.
    fn count(&mut self, max: usize) -> Result<usize> {
        usize::try_from(self.varint()?).ok().filter(|n| *n <= max).ok_or_else(corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws() -> WorkspaceId {
        WorkspaceId::from_trusted("ws_calls".into())
    }

    fn call(i: i64) -> CallRecord {
        CallRecord {
            id: 0,
            workspace_id: ws(),
            at: Timestamp::from_millis(1_780_000_000_000 + i * 7),
            token_id: None,
            app_id: None,
            route: (i % 3 != 0).then(|| "orders".to_owned()),
            method: if i % 2 == 0 { "GET" } else { "POST" }.to_owned(),
            path: format!("/orders/{}", i % 5),
            status: if i % 4 == 0 { 403 } else { 200 },
            latency_us: u64::try_from(i).unwrap() * 1_000_003,
            client_ip: if i % 2 == 0 { "203.0.113.7" } else { "2001:db8::1" }.to_owned(),
            refusal: (i % 4 == 0).then(|| "insufficient_scope".to_owned()),
        }
    }

    fn encode(calls: &[CallRecord]) -> Vec<u8> {
        encode_chunk(&calls.iter().collect::<Vec<_>>())
    }

    fn row(id: i64, ws: &WorkspaceId) -> ChunkRow<'_> {
        ChunkRow { id, workspace_id: ws, token_id: None, app_id: None }
    }

    #[test]
    fn a_chunk_decodes_to_what_was_encoded() {
        let calls: Vec<CallRecord> = (0..500).map(call).collect();
        let data = encode(&calls);
        // Repeated texts are written once: a call costs a handful of bytes.
        assert!(data.len() < calls.len() * 16, "{} bytes", data.len());
        let ws = ws();
        let back = decode_chunk(&data, row(7, &ws)).unwrap();
        assert_eq!(back.len(), calls.len());
        for (i, (b, c)) in back.iter().zip(&calls).enumerate() {
            assert_eq!(b.id, call_id(7, i));
            assert_eq!(CallRecord { id: 0, ..b.clone() }, *c);
        }
    }

    #[test]
    fn the_row_supplies_token_app_and_ids() {
        let ws = ws();
        let tok = TokenId::from_public_id("abcdefghijkl");
        let app = AppId::from_trusted("app_1".into());
        let data = encode(&[call(1), call(2)]);
        let back = decode_chunk(&data, ChunkRow { id: 3, workspace_id: &ws, token_id: Some(&tok), app_id: Some(&app) })
            .unwrap();
        assert_eq!(back[1].id, 3 * CHUNK_CALLS as i64 + 1);
        assert_eq!((back[1].token_id.as_ref(), back[1].app_id.as_ref()), (Some(&tok), Some(&app)));
        assert_eq!(split_call_id(back[1].id), (3, 1));
    }

    #[test]
    fn a_text_is_written_once_whichever_field_and_call_names_it() {
        // Runs of one text, texts alternating, and one text in two fields (route and path).
        let calls: Vec<CallRecord> = (0..40)
            .map(|i| CallRecord {
                route: Some(if i % 10 < 7 { "/a" } else { "/b" }.to_owned()),
                path: if i % 2 == 0 { "/a" } else { "/c" }.to_owned(),
                ..call(i)
            })
            .collect();
        let mut b = ChunkBuilder::default();
        calls.iter().for_each(|c| assert!(b.push(&CallFields::of(c))));
        // GET POST /a /b /c 203.0.113.7 2001:db8::1 insufficient_scope
        assert_eq!(b.strings.len(), 8, "{:?}", b.strings);
        let ws = ws();
        let back = decode_chunk(&b.finish(), row(1, &ws)).unwrap();
        for (b, c) in back.iter().zip(&calls) {
            assert_eq!(CallRecord { id: 0, ..b.clone() }, *c);
        }
    }

    #[test]
    fn odd_values_survive() {
        let mut c = call(1);
        c.at = Timestamp::from_millis(i64::MIN + 1);
        c.latency_us = u64::MAX;
        c.path = "/o'r\"d\\ers/ü%20x".into();
        c.route = Some(String::new());
        let mut d = call(2);
        d.at = Timestamp::from_millis(i64::MAX);
        let ws = ws();
        let back = decode_chunk(&encode(&[c.clone(), d.clone()]), row(1, &ws)).unwrap();
        assert_eq!(CallRecord { id: 0, ..back[0].clone() }, c);
        assert_eq!(CallRecord { id: 0, ..back[1].clone() }, d);
    }

    #[test]
    fn at_most_a_chunk_of_calls_is_written() {
        let calls: Vec<CallRecord> = (0..(CHUNK_CALLS as i64 + 3)).map(call).collect();
        let ws = ws();
        assert_eq!(decode_chunk(&encode(&calls), row(1, &ws)).unwrap().len(), CHUNK_CALLS);
        assert!(decode_chunk(&encode(&[]), row(1, &ws)).unwrap().is_empty());
    }

    #[test]
    fn damaged_chunks_are_refused_not_trusted() {
        let ws = ws();
        let data = encode(&(0..20).map(call).collect::<Vec<_>>());
        // Every truncation, every single-byte change and trailing bytes: an error or a
        // faithful decode, never a panic.
        for n in 0..data.len() {
            assert!(decode_chunk(&data[..n], row(1, &ws)).is_err(), "truncated at {n}");
        }
        for i in 0..data.len() {
            for b in [0x00, 0x7f, 0x80, 0xff] {
                let mut d = data.clone();
                d[i] = b;
                let _ = decode_chunk(&d, row(1, &ws));
            }
        }
        let mut longer = data.clone();
        longer.push(0);
        assert!(decode_chunk(&longer, row(1, &ws)).is_err());
        // A count far beyond the bytes that follow allocates nothing for it.
        let mut huge = vec![VERSION, 0];
        put(&mut huge, 0);
        put(&mut huge, CHUNK_CALLS as u64);
        assert!(decode_chunk(&huge, row(1, &ws)).is_err());
        assert!(decode_chunk(&[VERSION + 1, 0, 0, 0], row(1, &ws)).is_err());
    }

    #[test]
    fn ids_split_back() {
        for (chunk, i) in [(0, 0), (1, 4095), (1 << 40, 17)] {
            assert_eq!(split_call_id(call_id(chunk, i)), (chunk, i));
        }
    }
}
