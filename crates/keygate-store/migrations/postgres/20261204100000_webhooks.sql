-- Webhooks (issue 15; keygate-core's notify module). webhook_endpoints are a workspace's URLs,
-- each with its signing key sealed under the pepper. webhook_deliveries is the outbox: a row per
-- message and endpoint, written in the transaction of the audit event that raised it, claimed by
-- one node at a time (lease_owner, lease_until) and retried on a schedule; webhook_attempts logs
-- every HTTP attempt.
CREATE TABLE webhook_endpoints (
    id              TEXT PRIMARY KEY,
    workspace_id    TEXT NOT NULL,
    url             TEXT NOT NULL,
    description     TEXT,
    event_types     TEXT NOT NULL,
    enabled         INTEGER NOT NULL,
    disabled_reason TEXT,
    sealed_secret   BYTEA NOT NULL,
    failing_since   BIGINT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
CREATE INDEX webhook_endpoints_by_workspace ON webhook_endpoints (workspace_id);
CREATE TABLE webhook_deliveries (
    id              BIGSERIAL PRIMARY KEY,
    workspace_id    TEXT NOT NULL,
    endpoint_id     TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_at         BIGINT,
    lease_owner     TEXT,
    lease_until     BIGINT,
    last_attempt_at BIGINT,
    last_status     BIGINT,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    delivered_at    BIGINT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_at);
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, id);
CREATE INDEX webhook_deliveries_by_workspace ON webhook_deliveries (workspace_id, id);
CREATE INDEX webhook_deliveries_by_time ON webhook_deliveries (created_at);
CREATE TABLE webhook_attempts (
    delivery_id     BIGINT NOT NULL,
    at              BIGINT NOT NULL,
    status          BIGINT,
    error           TEXT,
    duration_ms     BIGINT NOT NULL
);
CREATE INDEX webhook_attempts_by_delivery ON webhook_attempts (delivery_id, at);
-- Keys that held every permission there was keep holding every permission: they gain
-- webhooks:read and webhooks:write. Narrower keys do not.
UPDATE root_keys
SET permissions = '["tokens:read","tokens:write","apps:read","apps:write","plans:read","plans:write","audit:read","keys:write","root_keys:read","root_keys:write","routes:read","routes:write","workspaces:read","workspaces:write","tokens:verify","webhooks:read","webhooks:write"]'
WHERE permissions = '["tokens:read","tokens:write","apps:read","apps:write","plans:read","plans:write","audit:read","keys:write","root_keys:read","root_keys:write","routes:read","routes:write","workspaces:read","workspaces:write","tokens:verify"]';
