-- The audit trail's hash chain (issue 15; keygate-core's audit_chain module). Each event records
-- its position in its workspace's chain (chain_seq, from 1) and its link (hex of an HMAC under a
-- key derived from the pepper, over the previous link and the event's fields). audit_chains holds
-- each workspace's head (the last position and link; its row is the lock writers take) and its
-- anchor (the last event deleted by retention, where verification starts).
ALTER TABLE audit_events ADD COLUMN chain_seq BIGINT;
ALTER TABLE audit_events ADD COLUMN link TEXT;
CREATE TABLE audit_chains (
    workspace_id TEXT PRIMARY KEY,
    seq          BIGINT NOT NULL,
    link         TEXT NOT NULL,
    anchor_seq   BIGINT NOT NULL DEFAULT 0,
    anchor_link  TEXT NOT NULL
);
-- Events written before this migration are linked by keygate at its next start, in id order;
-- only those (id <= legacy_through): an unlinked event written later is a break.
CREATE TABLE audit_chain_state (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    legacy_through BIGINT NOT NULL
);
INSERT INTO audit_chain_state (id, legacy_through) SELECT 1, COALESCE(MAX(id), 0) FROM audit_events;
CREATE INDEX audit_by_time ON audit_events (at);
