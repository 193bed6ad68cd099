-- Streaming the audit trail to a SIEM (issue 15): one row per audit event and configured sink
-- (syslog, http), written in the event's transaction, taken in batches by one node at a time
-- (lease) and deleted once the sink has it.
CREATE TABLE siem_outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    sink         TEXT NOT NULL,
    event        TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    attempts     BIGINT NOT NULL DEFAULT 0,
    next_at      BIGINT NOT NULL,
    lease_owner  TEXT,
    lease_until  BIGINT,
    last_error   TEXT
);
CREATE INDEX siem_outbox_due ON siem_outbox (sink, next_at, id);
