-- The nodes sharing this store: each registers itself at start, beats every few seconds with the
-- change-feed position its token index has applied, and marks itself stopped on a graceful
-- shutdown. A change's answer waits (bounded) until every live node has applied it.
CREATE TABLE nodes (
    id               TEXT PRIMARY KEY,
    instance         TEXT NOT NULL,
    gateway_address  TEXT NOT NULL,
    admin_address    TEXT NOT NULL,
    version          TEXT NOT NULL,
    started_at       BIGINT NOT NULL,
    applied_seq      BIGINT NOT NULL,
    heartbeat_at     BIGINT NOT NULL,
    stopped_at       BIGINT
);

-- How far each acknowledged change had spread when it was answered, by feed position. Audit
-- events written with a token change carry that change's position (feed_seq) and show it.
CREATE TABLE feed_acks (
    seq         BIGINT PRIMARY KEY,
    nodes       BIGINT NOT NULL,
    applied     BIGINT NOT NULL,
    elapsed_ms  BIGINT NOT NULL,
    acked_at    BIGINT NOT NULL
);
ALTER TABLE audit_events ADD COLUMN feed_seq BIGINT;
