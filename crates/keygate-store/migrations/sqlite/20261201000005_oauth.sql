-- The OAuth2 authorization server (issue 5), sqlite. Timestamps are Unix milliseconds; JSON is
-- stored as TEXT. Client secrets and refresh tokens are stored only as keyed hashes, and signing
-- keys' private halves only sealed by the service.

-- An app's registration as a client: one per app. Client ids are globally unique, because the
-- token endpoint looks a client up before it knows its workspace.
CREATE TABLE oauth_clients (
    client_id                   TEXT PRIMARY KEY,
    workspace_id                TEXT NOT NULL REFERENCES workspaces(id),
    -- UNIQUE is both the one-client-per-app rule and the index of the lookup by app.
    app_id                      TEXT NOT NULL UNIQUE REFERENCES apps(id),
    grant_types                 TEXT NOT NULL,
    scopes                      TEXT NOT NULL,
    auth_method                 TEXT NOT NULL,
    secret_hash                 BLOB,
    secret_last4                TEXT,
    previous_secret_hash        BLOB,
    previous_secret_expires_at  BIGINT,
    jwks                        TEXT,
    access_token_format         TEXT NOT NULL,
    signing_alg                 TEXT NOT NULL,
    access_token_ttl_seconds    BIGINT NOT NULL,
    refresh_token_ttl_seconds   BIGINT NOT NULL,
    created_at                  BIGINT NOT NULL,
    updated_at                  BIGINT NOT NULL,
    version                     BIGINT NOT NULL
);

-- The instance's signing keys (not per workspace).
CREATE TABLE oauth_signing_keys (
    kid             TEXT PRIMARY KEY,
    alg             TEXT NOT NULL,
    public_jwk      TEXT NOT NULL,
    sealed_private  BLOB NOT NULL,
    created_at      BIGINT NOT NULL,
    signs_from      BIGINT NOT NULL,
    retired_at      BIGINT,
    drop_after      BIGINT
);

-- One row per refresh-token family. Issuing a token into a family takes this row's lock and checks
-- revoked_at; revoking the family sets it first. So a rotation racing with the family's revocation
-- (a stolen token replayed at the same moment) either lands before it and is revoked with the
-- rest, or is refused. No foreign key to apps: a deleted app's families stay, revoked, until
-- their access tokens have expired.
CREATE TABLE oauth_token_families (
    family_id     TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL,
    app_id        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT
);
CREATE INDEX oauth_token_families_by_app ON oauth_token_families (app_id);

CREATE TABLE oauth_refresh_tokens (
    hash          BLOB PRIMARY KEY,
    family_id     TEXT NOT NULL REFERENCES oauth_token_families(family_id),
    -- Deleting an app deletes its refresh tokens before its client (see delete_app).
    client_id     TEXT NOT NULL REFERENCES oauth_clients(client_id),
    workspace_id  TEXT NOT NULL,
    app_id        TEXT NOT NULL,
    subject       TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    dpop_jkt      TEXT,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    used_at       BIGINT,
    revoked_at    BIGINT
);
CREATE INDEX oauth_refresh_tokens_by_family ON oauth_refresh_tokens (family_id);
CREATE INDEX oauth_refresh_tokens_by_app ON oauth_refresh_tokens (app_id);
CREATE INDEX oauth_refresh_tokens_by_expiry ON oauth_refresh_tokens (expires_at);

-- Every access token issued, for introspection and family revocation. No foreign key to the
-- client: a deleted app's tokens stay, revoked, until they expire and are pruned.
CREATE TABLE oauth_access_tokens (
    jti           TEXT PRIMARY KEY,
    client_id     TEXT NOT NULL,
    workspace_id  TEXT NOT NULL,
    app_id        TEXT NOT NULL,
    family_id     TEXT REFERENCES oauth_token_families(family_id),
    subject       TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    dpop_jkt      TEXT,
    issued_at     BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    revoked_at    BIGINT
);
CREATE INDEX oauth_access_tokens_by_family ON oauth_access_tokens (family_id);
CREATE INDEX oauth_access_tokens_by_app ON oauth_access_tokens (app_id);
CREATE INDEX oauth_access_tokens_by_expiry ON oauth_access_tokens (expires_at);

-- The change feed's access-token revocations, numbered from feed_state.seq like token_changes,
-- so gateways learn of a revoked JWT the way they learn of a revoked API token. A row is useless
-- once its token has expired, and is pruned then.
CREATE TABLE jti_revocations (
    seq         BIGINT PRIMARY KEY,
    jti         TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX jti_revocations_by_expiry ON jti_revocations (expires_at);
