-- The call log (issue 15): every gateway call that names a workspace (by its token or its route),
-- written in batches by each node; deleted after [call_log] retention_days. Never a secret, a
-- query or a body.
CREATE TABLE call_log (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace_id TEXT NOT NULL,
    at           BIGINT NOT NULL,
    token_id     TEXT,
    app_id       TEXT,
    route        TEXT,
    method       TEXT NOT NULL,
    path         TEXT NOT NULL,
    status       INTEGER NOT NULL,
    latency_us   BIGINT NOT NULL,
    client_ip    TEXT NOT NULL,
    refusal      TEXT
);
CREATE INDEX call_log_workspace ON call_log (workspace_id, id);
CREATE INDEX call_log_token ON call_log (token_id, id);
CREATE INDEX call_log_app ON call_log (app_id, id);
