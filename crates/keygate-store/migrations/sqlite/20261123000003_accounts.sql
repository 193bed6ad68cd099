-- Dashboard accounts (sqlite). Booleans are BIGINT 0/1 like apps.is_default; timestamps are Unix
-- milliseconds. Session ids, recovery codes and invitation codes are stored only as keyed hashes.
CREATE TABLE users (
    id              TEXT PRIMARY KEY,
    -- Lower-cased by the callers; lookups are exact.
    email           TEXT NOT NULL UNIQUE,
    name            TEXT NOT NULL,
    password_hash   TEXT NOT NULL,
    totp_sealed     BLOB,
    totp_enabled    BIGINT NOT NULL DEFAULT 0,
    totp_last_step  BIGINT NOT NULL DEFAULT 0,
    disabled        BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);

CREATE TABLE memberships (
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    user_id       TEXT NOT NULL REFERENCES users(id),
    role          TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, user_id)
);
CREATE INDEX memberships_by_user ON memberships (user_id);

CREATE TABLE recovery_codes (
    user_id     TEXT NOT NULL REFERENCES users(id),
    code_hash   BLOB NOT NULL,
    created_at  BIGINT NOT NULL,
    used_at     BIGINT,
    PRIMARY KEY (user_id, code_hash)
);

CREATE TABLE sessions (
    id_hash       BLOB PRIMARY KEY,
    user_id       TEXT NOT NULL REFERENCES users(id),
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    pending_mfa   BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL,
    last_seen_at  BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    ip            TEXT
);
CREATE INDEX sessions_by_user ON sessions (user_id);

CREATE TABLE invitations (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    email         TEXT NOT NULL,
    role          TEXT NOT NULL,
    code_hash     BLOB NOT NULL UNIQUE,
    invited_by    TEXT NOT NULL REFERENCES users(id),
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    accepted_at   BIGINT
);
CREATE INDEX invitations_by_workspace ON invitations (workspace_id, created_at, id);

CREATE TABLE workspace_policies (
    workspace_id             TEXT PRIMARY KEY REFERENCES workspaces(id),
    max_token_lifetime_days  BIGINT,
    require_two_factor       BIGINT NOT NULL DEFAULT 0
);

-- The person who owns an app (developers manage only their own apps).
CREATE TABLE app_owners (
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    app_id        TEXT PRIMARY KEY REFERENCES apps(id),
    user_id       TEXT NOT NULL REFERENCES users(id)
);
CREATE INDEX app_owners_by_user ON app_owners (workspace_id, user_id);
