-- LLM providers made through the admin API or the dashboard (issue 16). `config` is the JSON of
-- a [[providers]] table without the key's source; the key itself is sealed under the pepper
-- (AES-256-GCM, bound to the provider's id) and never stored in the clear. Ids are unique in the
-- instance. Each change takes a change-feed position in `route_changes` (as 'provider:<id>'), so
-- every node's gateway reloads its providers with its routes.
CREATE TABLE llm_providers (
    id               TEXT PRIMARY KEY,
    workspace_id     TEXT NOT NULL REFERENCES workspaces(id),
    config           TEXT NOT NULL,
    sealed_key       BLOB NOT NULL,
    key_fingerprint  TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    key_rotated_at   BIGINT NOT NULL
);
CREATE INDEX llm_providers_workspace ON llm_providers (workspace_id);
-- Keys that held every permission there was keep holding every permission: they gain
-- providers:read and providers:write. Narrower keys do not.
UPDATE root_keys
SET permissions = '["tokens:read","tokens:write","apps:read","apps:write","plans:read","plans:write","audit:read","keys:write","root_keys:read","root_keys:write","routes:read","routes:write","workspaces:read","workspaces:write","tokens:verify","webhooks:read","webhooks:write","providers:read","providers:write"]'
WHERE permissions = '["tokens:read","tokens:write","apps:read","apps:write","plans:read","plans:write","audit:read","keys:write","root_keys:read","root_keys:write","routes:read","routes:write","workspaces:read","workspaces:write","tokens:verify","webhooks:read","webhooks:write"]';
