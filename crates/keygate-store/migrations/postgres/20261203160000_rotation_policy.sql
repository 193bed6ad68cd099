-- Rotation policy (issue 15): tokens are to be replaced within max_token_age_days of their
-- creation; past it they are flagged, or suspended if suspend_unrotated. rotation_notices records
-- the reminder and the overdue notice each token got, so that every node's hourly check records
-- each once.
ALTER TABLE workspace_policies ADD COLUMN max_token_age_days BIGINT;
ALTER TABLE workspace_policies ADD COLUMN suspend_unrotated INTEGER NOT NULL DEFAULT 0;
CREATE TABLE rotation_notices (
    token_id TEXT NOT NULL,
    kind     TEXT NOT NULL,
    at       BIGINT NOT NULL,
    PRIMARY KEY (token_id, kind)
);
