-- Plan requests (sqlite): a developer asks for one of their apps to move to a plan, and an admin
-- approves or denies it when the workspace policy says plan changes need approval. Booleans are
-- BIGINT 0/1; timestamps are Unix milliseconds.
ALTER TABLE workspace_policies ADD COLUMN plan_changes_need_approval BIGINT NOT NULL DEFAULT 0;

CREATE TABLE plan_requests (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    -- Deleting an app deletes its requests first (see delete_app).
    app_id        TEXT NOT NULL REFERENCES apps(id),
    plan_id       TEXT NOT NULL REFERENCES plans(id),
    requested_by  TEXT NOT NULL REFERENCES users(id),
    note          TEXT,
    -- pending, approved or denied; only a pending request can be decided.
    status        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    decided_by    TEXT REFERENCES users(id),
    decided_at    BIGINT
);
CREATE INDEX plan_requests_by_status ON plan_requests (workspace_id, status);
