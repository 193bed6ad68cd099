//! The audit trail's hash chain (issue 15): every audit event records the link of the one before
//! it in its workspace, so that changing, removing or reordering a stored event breaks every link
//! after it.
//!
//! A link is HMAC-SHA256 under a key derived from the pepper (never in the database) over the
//! previous link and the event's stored fields, each length-prefixed. Someone who can write the
//! database but does not hold the pepper cannot forge a chain that verifies; someone who holds
//! both can rewrite the whole trail, which only a chain head exported earlier and kept elsewhere
//! reveals (`keygate audit head`, compared by `keygate audit verify --head`).
//!
//! Each workspace's chain starts from [`GENESIS`]. When old events are deleted by the retention
//! setting, the link of the last one deleted is kept as the chain's **anchor**, and verification
//! starts from it. The anchor is authenticated under the same key ([`anchor_mac`]): otherwise
//! someone with only the database could delete the start of the trail and move the anchor past
//! it (the stored link of the last event deleted is in the database), and verification would
//! start after the deletion — a checkpoint inside it reported "pruned" on an intact chain. An
//! anchor without its code (written before it existed, or set in the database) is a break.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The link before a workspace's first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// Domain separation for the links, and their format's version.
const LABEL: &[u8] = b"keygate audit chain v1";
/// Domain separation for the anchors' codes: never equal to a link's input.
const ANCHOR_LABEL: &[u8] = b"keygate audit chain anchor v1";

/// An audit event as stored: the fields a link covers, exactly as written.
#[derive(Debug, Clone, Copy)]
pub struct LinkFields<'a> {
    pub workspace_id: &'a str,
    /// The event's position in its workspace's chain, from 1.
    pub seq: u64,
    pub at_ms: i64,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    /// The stored JSON texts, byte for byte.
    pub before: Option<&'a str>,
    pub after: Option<&'a str>,
    pub source: Option<&'a str>,
    pub feed_seq: Option<i64>,
}

/// The link of an event whose predecessor's link is `prev`.
pub fn link(key: &[u8; 32], prev: &[u8; 32], f: &LinkFields<'_>) -> [u8; 32] {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        // HMAC takes a key of any length; this cannot happen.
        return [0; 32];
    };
    let mut put = |bytes: &[u8]| {
        mac.update(&u64::try_from(bytes.len()).unwrap_or(u64::MAX).to_be_bytes());
        mac.update(bytes);
    };
    let opt = |o: Option<&str>| o.map_or_else(|| vec![0u8], |s| [&[1u8][..], s.as_bytes()].concat());
    put(LABEL);
    put(prev);
    put(f.workspace_id.as_bytes());
    put(&f.seq.to_be_bytes());
    put(&f.at_ms.to_be_bytes());
    put(f.actor.as_bytes());
    put(f.action.as_bytes());
    put(f.target.as_bytes());
    put(&opt(f.before));
    put(&opt(f.after));
    put(&opt(f.source));
    put(&f.feed_seq.map_or_else(|| vec![0u8], |s| [&[1u8][..], &s.to_be_bytes()].concat()));
    mac.finalize().into_bytes().into()
}

/// The code that authenticates a workspace's anchor: events up to `anchor_seq` were deleted by
/// keygate's retention, the last of them with link `anchor_link`. Written only by the retention
/// pass, after it has checked the links of the events it deletes.
pub fn anchor_mac(key: &[u8; 32], workspace_id: &str, anchor_seq: u64, anchor_link: &[u8; 32]) -> [u8; 32] {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        // HMAC takes a key of any length; this cannot happen.
        return [0; 32];
    };
    for part in [ANCHOR_LABEL, workspace_id.as_bytes(), &anchor_seq.to_be_bytes(), anchor_link] {
        mac.update(&u64::try_from(part.len()).unwrap_or(u64::MAX).to_be_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Lowercase hex of a link.
pub fn to_hex(link: &[u8; 32]) -> String {
    link.iter().map(|b| format!("{b:02x}")).collect()
}

/// A link from its hex form.
pub fn from_hex(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = char::from(*pair.first()?).to_digit(16)?;
        let lo = char::from(*pair.get(1)?).to_digit(16)?;
        *out.get_mut(i)? = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// An audit event as stored, as verification reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub id: i64,
    pub workspace_id: String,
    pub chain_seq: Option<i64>,
    pub link: Option<String>,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub before: Option<String>,
    pub after: Option<String>,
    pub source: Option<String>,
    pub feed_seq: Option<i64>,
}

impl StoredEvent {
    /// The fields its link covers, at position `seq`.
    pub fn fields(&self, seq: u64) -> LinkFields<'_> {
        LinkFields {
            workspace_id: &self.workspace_id,
            seq,
            at_ms: self.at_ms,
            actor: &self.actor,
            action: &self.action,
            target: &self.target,
            before: self.before.as_deref(),
            after: self.after.as_deref(),
            source: self.source.as_deref(),
            feed_seq: self.feed_seq,
        }
    }
}

/// A workspace's chain as its head row records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainHead {
    pub workspace_id: String,
    /// The last event's position (0: no event yet).
    pub seq: u64,
    /// The last event's link (hex).
    pub link: String,
    /// Events up to this position were deleted by the retention setting.
    pub anchor_seq: u64,
    /// The link of the last deleted event (hex): where verification starts.
    pub anchor_link: String,
    /// The anchor's [`anchor_mac`] (hex), written by the retention pass with the anchor; absent
    /// while `anchor_seq` is 0, and on anchors written before keygate authenticated them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_mac: Option<String>,
}

impl ChainHead {
    /// The head of a workspace with no event.
    pub fn empty(workspace_id: &str) -> Self {
        Self {
            workspace_id: workspace_id.to_owned(),
            seq: 0,
            link: to_hex(&GENESIS),
            anchor_seq: 0,
            anchor_link: to_hex(&GENESIS),
            anchor_mac: None,
        }
    }
}

/// A chain position and link recorded earlier (`keygate audit head`), to compare with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub link: [u8; 32],
}

/// The first broken link found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Break {
    /// The stored event where it shows, if one does.
    pub event_id: Option<i64>,
    /// The chain position where it shows.
    pub seq: u64,
    /// A stable code: `unlinked`, `missing`, `out_of_order`, `altered`, `truncated`,
    /// `head_mismatch`, `checkpoint_mismatch`, `checkpoint_missing`.
    pub code: &'static str,
    pub message: String,
}

/// What a verification found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChainReport {
    pub workspace_id: String,
    /// Whether every link holds (and the checkpoint, if one was given, is in the chain).
    pub intact: bool,
    /// Events whose links were checked.
    pub checked: u64,
    /// Where verification started (the anchor: events up to it were deleted by retention).
    pub from_seq: u64,
    /// The head it verified to.
    pub head_seq: u64,
    pub head_link: String,
    pub broken: Option<Break>,
    /// The checkpoint's outcome: `matched`, `pruned` (older than the anchor: not comparable), or
    /// absent when none was given or a break came first.
    pub checkpoint: Option<&'static str>,
}

/// Checks a workspace's events, fed in chain (= id) order, against its head. The head and the
/// events must be read from one snapshot of the store.
pub struct Verifier {
    key: [u8; 32],
    head: ChainHead,
    prev: [u8; 32],
    next_seq: u64,
    checked: u64,
    broken: Option<Break>,
    checkpoint: Option<Checkpoint>,
    checkpoint_outcome: Option<&'static str>,
}

impl Verifier {
    /// Starts at `head`'s anchor. An anchor link that is not hex is a break at once.
    pub fn new(key: [u8; 32], head: ChainHead, checkpoint: Option<Checkpoint>) -> Self {
        let anchor = from_hex(&head.anchor_link);
        let mut v = Self {
            key,
            prev: anchor.unwrap_or(GENESIS),
            next_seq: head.anchor_seq + 1,
            head,
            checked: 0,
            broken: None,
            checkpoint,
            checkpoint_outcome: None,
        };
        match anchor {
            None => {
                v.fail(None, v.next_seq, "altered", "the chain's anchor is not a link: the head row was changed".into())
            }
            // Events deleted: only keygate's retention may have done it, and its code says so.
            Some(a) if v.head.anchor_seq > 0 => {
                let n = v.head.anchor_seq;
                let expected = anchor_mac(&key, &v.head.workspace_id, n, &a);
                match v.head.anchor_mac.as_deref().map(from_hex) {
                    Some(Some(m)) if bool::from(subtle::ConstantTimeEq::ct_eq(&m[..], &expected[..])) => {}
                    Some(_) => {
                        let msg = format!(
                            "the chain's anchor (#{n}) does not match its authentication code: the head row was changed in the database, so events #1 to #{n} may have been deleted by someone other than keygate's retention"
                        );
                        v.fail(None, n, "altered", msg);
                    }
                    None => {
                        let msg = format!(
                            "the chain's anchor (#{n}) is not authenticated: it was set in the database, or by a keygate older than the anchor's code, so nothing shows that events #1 to #{n} were deleted by keygate's retention (see \"keygate audit\" in docs/operations.md)"
                        );
                        v.fail(None, n, "altered", msg);
                    }
                }
            }
            Some(_) => {}
        }
        if let Some(c) = checkpoint
            && c.seq <= v.head.anchor_seq
        {
            v.checkpoint_outcome =
                Some(if c.seq == v.head.anchor_seq && c.link == v.prev { "matched" } else { "pruned" });
        }
        v
    }

    fn fail(&mut self, event_id: Option<i64>, seq: u64, code: &'static str, message: String) {
        if self.broken.is_none() {
            self.broken = Some(Break { event_id, seq, code, message });
        }
    }

    /// Whether a break was found (the rest need not be read).
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Checks the next stored event.
    pub fn feed(&mut self, e: &StoredEvent) {
        if self.broken.is_some() {
            return;
        }
        let (Some(seq), Some(stored_link)) = (e.chain_seq.and_then(|s| u64::try_from(s).ok()), e.link.as_deref())
        else {
            let msg = format!(
                "event {} ({} on {}) has no link: it was not written by keygate, or its link was removed",
                e.id, e.action, e.target
            );
            return self.fail(Some(e.id), self.next_seq, "unlinked", msg);
        };
        if seq != self.next_seq {
            let (code, msg) = if seq > self.next_seq {
                let what = if seq == self.next_seq + 1 {
                    format!("event #{} is missing", self.next_seq)
                } else {
                    format!("events #{} to #{} are missing", self.next_seq, seq - 1)
                };
                ("missing", format!("{what} before event {} (#{seq}): deleted from the store", e.id))
            } else {
                (
                    "out_of_order",
                    format!(
                        "event {} claims position #{seq} where #{} was due: events were reordered or copied",
                        e.id, self.next_seq
                    ),
                )
            };
            return self.fail(Some(e.id), self.next_seq, code, msg);
        }
        let expected = link(&self.key, &self.prev, &e.fields(seq));
        let stored = from_hex(stored_link);
        let same = stored.is_some_and(|s| subtle::ConstantTimeEq::ct_eq(&s[..], &expected[..]).into());
        if !same {
            let msg = format!(
                "event {} (#{seq}, {} on {}) does not match its link: it was changed after it was written",
                e.id, e.action, e.target
            );
            return self.fail(Some(e.id), seq, "altered", msg);
        }
        if let Some(c) = self.checkpoint
            && c.seq == seq
        {
            if c.link == expected {
                self.checkpoint_outcome = Some("matched");
            } else {
                let msg = format!(
                    "event {} (#{seq}) is not the one the checkpoint recorded: the trail up to it was rewritten",
                    e.id
                );
                return self.fail(Some(e.id), seq, "checkpoint_mismatch", msg);
            }
        }
        self.prev = expected;
        self.next_seq = seq + 1;
        self.checked += 1;
    }

    /// Ends the verification: the last event must be the head's.
    pub fn finish(mut self) -> ChainReport {
        let last = self.next_seq - 1;
        if self.broken.is_none() {
            if last < self.head.seq {
                let msg = format!(
                    "the chain ends at #{last} but its head records #{}: the last events were deleted",
                    self.head.seq
                );
                self.fail(None, last + 1, "truncated", msg);
            } else if last > self.head.seq || from_hex(&self.head.link) != Some(self.prev) {
                let msg = "the chain's head does not match its last event: the head row was changed".to_owned();
                self.fail(None, last, "head_mismatch", msg);
            } else if let Some(c) = self.checkpoint
                && self.checkpoint_outcome.is_none()
            {
                let msg = format!(
                    "the checkpoint records #{} but the chain ends at #{last}: events after #{last} were removed, head included",
                    c.seq
                );
                self.fail(None, last + 1, "checkpoint_missing", msg);
            }
        }
        let broken = self.broken.take();
        ChainReport {
            workspace_id: self.head.workspace_id.clone(),
            intact: broken.is_none(),
            checked: self.checked,
            from_seq: self.head.anchor_seq,
            head_seq: self.head.seq,
            head_link: self.head.link.clone(),
            checkpoint: if broken.is_none() { self.checkpoint_outcome } else { None },
            broken,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(seq: u64) -> LinkFields<'static> {
        LinkFields {
            workspace_id: "ws_1",
            seq,
            at_ms: 1_800_000_000_000,
            actor: "root:kg_root_abc",
            action: "token.create",
            target: "tok_1",
            before: None,
            after: Some(r#"{"name":"a"}"#),
            source: Some("127.0.0.1"),
            feed_seq: Some(7),
        }
    }

    #[test]
    fn every_field_and_the_key_change_the_link() {
        let key = [7u8; 32];
        let base = link(&key, &GENESIS, &fields(1));
        assert_eq!(base, link(&key, &GENESIS, &fields(1)), "deterministic");
        let changed = [
            LinkFields { workspace_id: "ws_2", ..fields(1) },
            LinkFields { seq: 2, ..fields(1) },
            LinkFields { at_ms: 1, ..fields(1) },
            LinkFields { actor: "x", ..fields(1) },
            LinkFields { action: "token.revoke", ..fields(1) },
            LinkFields { target: "tok_2", ..fields(1) },
            LinkFields { before: Some(""), ..fields(1) },
            LinkFields { after: None, ..fields(1) },
            LinkFields { after: Some(r#"{"name":"b"}"#), ..fields(1) },
            LinkFields { source: None, ..fields(1) },
            LinkFields { feed_seq: None, ..fields(1) },
            LinkFields { feed_seq: Some(8), ..fields(1) },
        ];
        for f in changed {
            assert_ne!(link(&key, &GENESIS, &f), base, "{f:?}");
        }
        assert_ne!(link(&[8u8; 32], &GENESIS, &fields(1)), base, "another key");
        assert_ne!(link(&key, &[1u8; 32], &fields(1)), base, "another predecessor");
    }

    #[test]
    fn fields_cannot_be_shifted_into_each_other() {
        let key = [7u8; 32];
        let a = LinkFields { actor: "ab", action: "c", ..fields(1) };
        let b = LinkFields { actor: "a", action: "bc", ..fields(1) };
        assert_ne!(link(&key, &GENESIS, &a), link(&key, &GENESIS, &b));
        let none = LinkFields { before: None, after: Some(""), ..fields(1) };
        let empty = LinkFields { before: Some(""), after: None, ..fields(1) };
        assert_ne!(link(&key, &GENESIS, &none), link(&key, &GENESIS, &empty));
    }

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_a_link() {
        let l = link(&[1; 32], &GENESIS, &fields(3));
        assert_eq!(from_hex(&to_hex(&l)), Some(l));
        for bad in ["", "00", &"g".repeat(64), &"0".repeat(63), &"0".repeat(65), &"é".repeat(32)] {
            assert_eq!(from_hex(bad), None, "{bad}");
        }
    }

    fn chain(key: &[u8; 32], n: u64) -> (Vec<StoredEvent>, ChainHead) {
        let mut prev = GENESIS;
        let mut out = Vec::new();
        for seq in 1..=n {
            let mut e = StoredEvent {
                id: i64::try_from(seq).unwrap() * 10,
                workspace_id: "ws_1".into(),
                chain_seq: Some(i64::try_from(seq).unwrap()),
                link: None,
                at_ms: 1_000 + i64::try_from(seq).unwrap(),
                actor: "cli".into(),
                action: "token.create".into(),
                target: format!("tok_{seq}"),
                before: None,
                after: Some(format!(r#"{{"n":{seq}}}"#)),
                source: None,
                feed_seq: None,
            };
            prev = link(key, &prev, &e.fields(seq));
            e.link = Some(to_hex(&prev));
            out.push(e);
        }
        let head = ChainHead { seq: n, link: to_hex(&prev), ..ChainHead::empty("ws_1") };
        (out, head)
    }

    fn verify(key: [u8; 32], events: &[StoredEvent], head: &ChainHead, cp: Option<Checkpoint>) -> ChainReport {
        let mut v = Verifier::new(key, head.clone(), cp);
        for e in events {
            v.feed(e);
        }
        v.finish()
    }

    #[test]
    fn an_untouched_chain_verifies_and_each_kind_of_tampering_is_named() {
        let key = [3u8; 32];
        let (events, head) = chain(&key, 5);
        let ok = verify(key, &events, &head, None);
        assert!(ok.intact && ok.checked == 5 && ok.broken.is_none(), "{ok:?}");
        assert!(verify(key, &[], &ChainHead::empty("ws_1"), None).intact, "an empty chain");

        let code = |events: &[StoredEvent], head: &ChainHead| {
            let r = verify(key, events, head, None);
            r.broken.map(|b| (b.code, b.seq, b.event_id))
        };
        let mut altered = events.clone();
        altered[2].after = Some(r#"{"n":99}"#.into());
        assert_eq!(code(&altered, &head), Some(("altered", 3, Some(30))));
        let mut unlinked = events.clone();
        unlinked[1].link = None;
        assert_eq!(code(&unlinked, &head), Some(("unlinked", 2, Some(20))));
        let mut missing = events.clone();
        missing.remove(1);
        assert_eq!(code(&missing, &head), Some(("missing", 2, Some(30))));
        let mut swapped = events.clone();
        swapped.swap(1, 2);
        assert_eq!(code(&swapped, &head), Some(("missing", 2, Some(30))));
        assert_eq!(code(&events[..4], &head), Some(("truncated", 5, None)));
        let forged_head = ChainHead { link: to_hex(&[9; 32]), ..head.clone() };
        assert_eq!(code(&events, &forged_head), Some(("head_mismatch", 5, None)));
        // Recomputed without the key: every link after the change must be forged, and cannot be.
        assert_eq!(verify([4u8; 32], &events, &head, None).broken.map(|b| b.code), Some("altered"));
    }

    #[test]
    fn a_checkpoint_catches_a_rewritten_or_shortened_trail() {
        let key = [3u8; 32];
        let (events, head) = chain(&key, 5);
        let at3 = Checkpoint { seq: 3, link: from_hex(events[2].link.as_deref().unwrap()).unwrap() };
        assert_eq!(verify(key, &events, &head, Some(at3)).checkpoint, Some("matched"));
        // The whole trail rewritten by someone with the key: the links hold, the checkpoint does not.
        let (mut other, _) = chain(&key, 5);
        other[0].actor = "someone else".into();
        let mut prev = GENESIS;
        for (i, e) in other.iter_mut().enumerate() {
            prev = link(&key, &prev, &e.fields(u64::try_from(i).unwrap() + 1));
            e.link = Some(to_hex(&prev));
        }
        let other_head = ChainHead { seq: 5, link: to_hex(&prev), ..ChainHead::empty("ws_1") };
        let r = verify(key, &other, &other_head, Some(at3));
        assert_eq!(r.broken.map(|b| b.code), Some("checkpoint_mismatch"));
        // Cut back to #2, head row included: the checkpoint at #3 is missing.
        let short_head = ChainHead { seq: 2, link: events[1].link.clone().unwrap(), ..ChainHead::empty("ws_1") };
        let r = verify(key, &events[..2], &short_head, Some(at3));
        assert_eq!(r.broken.map(|b| b.code), Some("checkpoint_missing"));
    }

    /// The head after retention deleted events up to `n` of `events`, as keygate writes it.
    fn anchored(key: &[u8; 32], events: &[StoredEvent], head: &ChainHead, n: u64) -> ChainHead {
        let link = events[usize::try_from(n).unwrap() - 1].link.clone().unwrap();
        let mac = anchor_mac(key, &head.workspace_id, n, &from_hex(&link).unwrap());
        ChainHead { anchor_seq: n, anchor_link: link, anchor_mac: Some(to_hex(&mac)), ..head.clone() }
    }

    #[test]
    fn verification_starts_at_the_anchor_after_retention() {
        let key = [3u8; 32];
        let (events, head) = chain(&key, 5);
        let anchored = anchored(&key, &events, &head, 2);
        let r = verify(key, &events[2..], &anchored, None);
        assert!(r.intact && r.checked == 3 && r.from_seq == 2, "{r:?}");
        let at1 = Checkpoint { seq: 1, link: from_hex(events[0].link.as_deref().unwrap()).unwrap() };
        assert_eq!(verify(key, &events[2..], &anchored, Some(at1)).checkpoint, Some("pruned"));
        let wrong_anchor = ChainHead { anchor_link: to_hex(&[1; 32]), ..anchored };
        assert_eq!(verify(key, &events[2..], &wrong_anchor, None).broken.map(|b| b.code), Some("altered"));
    }

    /// Without the key, the start of the trail cannot be deleted and the anchor moved past it:
    /// an anchor without its code, or with another anchor's, is a break that names the anchor,
    /// and a checkpoint inside the deleted part is not reported "pruned".
    #[test]
    fn an_anchor_moved_without_the_key_is_a_break() {
        let key = [3u8; 32];
        let (events, head) = chain(&key, 5);
        let at1 = Checkpoint { seq: 1, link: from_hex(events[0].link.as_deref().unwrap()).unwrap() };
        let legit = anchored(&key, &events, &head, 2);
        let forgeries = [
            // Events 1..3 deleted, the anchor set to event 3's stored link, no code.
            ChainHead { anchor_seq: 3, anchor_link: events[2].link.clone().unwrap(), anchor_mac: None, ..head.clone() },
            // The same, keeping the code of the anchor retention wrote at #2.
            ChainHead { anchor_seq: 3, anchor_link: events[2].link.clone().unwrap(), ..legit.clone() },
            // A code made under another key.
            anchored(&[4u8; 32], &events, &head, 3),
            // A code that is not hex.
            ChainHead { anchor_mac: Some("x".into()), ..anchored(&key, &events, &head, 3) },
        ];
        for forged in forgeries {
            let r = verify(key, &events[3..], &forged, Some(at1));
            let b = r.broken.clone().unwrap_or_else(|| panic!("{forged:?}: {r:?}"));
            assert_eq!((b.code, b.seq, b.event_id), ("altered", 3, None), "{forged:?}");
            assert!(b.message.contains("anchor (#3)"), "{}", b.message);
            assert!(!r.intact && r.checkpoint.is_none(), "{r:?}");
        }
        assert!(verify(key, &events[3..], &anchored(&key, &events, &head, 3), Some(at1)).intact);
        // No anchor (nothing deleted) needs no code.
        assert!(verify(key, &events, &head, None).intact);
    }
}
