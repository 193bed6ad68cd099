-- The call log in chunks (issue 15): one row per workspace, token and app per write, holding up to
-- 4096 calls in keygate's own compact encoding (crates/keygate-core/src/calls.rs), instead of a row
-- per call, which cost more CPU than the gateway itself at tens of thousands of calls a second.
-- The per-call table it replaces is dropped (its calls are not carried over).
DROP TABLE call_log;
CREATE TABLE call_chunks (
    id           BIGSERIAL PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    token_id     TEXT,
    app_id       TEXT,
    first_at     BIGINT NOT NULL,
    last_at      BIGINT NOT NULL,
    calls        INTEGER NOT NULL,
    data         BYTEA NOT NULL
);
CREATE INDEX call_chunks_workspace ON call_chunks (workspace_id, id);
CREATE INDEX call_chunks_token ON call_chunks (token_id, id);
CREATE INDEX call_chunks_app ON call_chunks (app_id, id);
