-- APIs with a lifecycle (issue 17): a workspace's named API, its OpenAPI document (JSON text,
-- at most 1 MiB, checked by the service), its state (draft, published, deprecated, retired) with
-- the deprecation's date, sunset and successor, and its versions (a JSON array of
-- {name, state, deprecated_at, sunset, successor}). Names are unique per workspace. Each change
-- takes a change-feed position in `route_changes` (as 'api:<id>'), so every node's gateway
-- rebuilds its routes with the new states.
CREATE TABLE apis (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    name          TEXT NOT NULL,
    description   TEXT NOT NULL,
    openapi       TEXT,
    state         TEXT NOT NULL,
    deprecated_at BIGINT,
    sunset        BIGINT,
    successor     TEXT,
    versions      TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    UNIQUE (workspace_id, name)
);
-- Requests to publish an API (or a version) that wait for an owner, when the workspace's policy
-- says publishing needs approval.
CREATE TABLE api_publish_requests (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    api_id        TEXT NOT NULL,
    version       TEXT,
    requested_by  TEXT NOT NULL,
    status        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    decided_by    TEXT,
    decided_at    BIGINT
);
CREATE INDEX api_publish_requests_workspace ON api_publish_requests (workspace_id, created_at);
ALTER TABLE workspace_policies ADD COLUMN api_publish_needs_approval BIGINT NOT NULL DEFAULT 0;
-- Keys that held every permission there was keep holding every permission: they gain
-- apis:read and apis:write. Narrower keys do not.
UPDATE root_keys
SET permissions = '["tokens:read","tokens:write","apps:read","apps:write","plans:read","plans:write","audit:read","keys:write","root_keys:read","root_keys:write","routes:read","routes:write","workspaces:read","workspaces:write","tokens:verify","webhooks:read","webhooks:write","providers:read","providers:write","apis:read","apis:write"]'
WHERE permissions = '["tokens:read","tokens:write","apps:read","apps:write","plans:read","plans:write","audit:read","keys:write","root_keys:read","root_keys:write","routes:read","routes:write","workspaces:read","workspaces:write","tokens:verify","webhooks:read","webhooks:write","providers:read","providers:write"]';
