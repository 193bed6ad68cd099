-- keygate's schema for SQLite. Timestamps are Unix milliseconds (UTC); JSON is stored as TEXT.
CREATE TABLE workspaces (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE plans (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    name          TEXT NOT NULL,
    description   TEXT,
    scopes        TEXT NOT NULL,
    rate_limit    TEXT,
    quota         TEXT,
    created_at    BIGINT NOT NULL,
    UNIQUE (workspace_id, name)
);

CREATE TABLE apps (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    name          TEXT NOT NULL,
    description   TEXT,
    plan_id       TEXT REFERENCES plans(id),
    is_default    BIGINT NOT NULL DEFAULT 0,
    metadata      TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX apps_by_workspace ON apps (workspace_id, created_at, id);

CREATE TABLE tokens (
    id             TEXT PRIMARY KEY,
    workspace_id   TEXT NOT NULL REFERENCES workspaces(id),
    app_id         TEXT NOT NULL REFERENCES apps(id),
    name           TEXT NOT NULL,
    hash           BLOB NOT NULL UNIQUE,
    prefix         TEXT NOT NULL,
    last4          TEXT NOT NULL,
    scopes         TEXT NOT NULL,
    state          TEXT NOT NULL,
    expires_at     BIGINT,
    ip_allowlist   TEXT NOT NULL,
    rate_limit     TEXT,
    quota          TEXT,
    metadata       TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    last_used_at   BIGINT,
    last_used_ip   TEXT,
    revoked_at     BIGINT,
    revoke_reason  TEXT,
    rotated_from   TEXT,
    replaced_by    TEXT,
    exposed_at     BIGINT,
    version        BIGINT NOT NULL
);
CREATE INDEX tokens_by_workspace ON tokens (workspace_id, created_at, id);
CREATE INDEX tokens_by_app ON tokens (app_id);

CREATE TABLE scope_catalog (
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    scope         TEXT NOT NULL,
    description   TEXT,
    api           TEXT,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, scope)
);

CREATE TABLE root_keys (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    name          TEXT NOT NULL,
    hash          BLOB NOT NULL UNIQUE,
    last4         TEXT NOT NULL,
    permissions   TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);

CREATE TABLE audit_events (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace_id  TEXT NOT NULL,
    at            BIGINT NOT NULL,
    actor         TEXT NOT NULL,
    action        TEXT NOT NULL,
    target        TEXT NOT NULL,
    before_json   TEXT,
    after_json    TEXT,
    source        TEXT
);
CREATE INDEX audit_by_workspace ON audit_events (workspace_id, id);

-- The change feed: one row per token change, numbered by feed_state.seq, which every writer
-- bumps first in its transaction, so sequence numbers become visible in commit order.
CREATE TABLE token_changes (
    seq       BIGINT PRIMARY KEY,
    token_id  TEXT NOT NULL,
    -- The token's keyed hash, so a follower can drop a token whose row is gone.
    token_hash BLOB NOT NULL,
    at        BIGINT NOT NULL
);

CREATE TABLE feed_state (
    id   BIGINT PRIMARY KEY,
    seq  BIGINT NOT NULL
);
INSERT INTO feed_state (id, seq) VALUES (1, 0);
