-- Prompts and answers of the AI routes that log them (issue 16; [routes.ai] log_prompts, off by
-- default): the client's request body (never its headers, so never a credential) and the answer,
-- each cut at 64 KiB, kept until expires_at (the route's log_retention_days).
CREATE TABLE llm_logs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace_id   TEXT NOT NULL,
    route          TEXT NOT NULL,
    caller         TEXT NOT NULL,
    app_id         TEXT NOT NULL,
    model          TEXT NOT NULL,
    deployment     TEXT NOT NULL,
    at             BIGINT NOT NULL,
    status         BIGINT NOT NULL,
    request        TEXT NOT NULL,
    answer         TEXT NOT NULL,
    input_tokens   BIGINT NOT NULL,
    output_tokens  BIGINT NOT NULL,
    micro_usd      BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL
);
CREATE INDEX llm_logs_workspace ON llm_logs (workspace_id, id);
CREATE INDEX llm_logs_expiry ON llm_logs (expires_at);
