-- Anomaly detection (issue 15). token_baselines: each token's usage as the detectors remember it
-- (JSON, keygate_core::anomaly::Baseline). token_sightings: the networks, routes and user agents
-- a token was used from, each recorded once (its insertion is what makes a value "new" across
-- nodes). alerts: what the detectors found; one alert per token, kind and key while it is not
-- resolved (a repeat counts an occurrence). anomaly_suspend: the severity from which an alert
-- suspends its token.
CREATE TABLE token_baselines (
    token_id     TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    baseline     TEXT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE TABLE token_sightings (
    token_id TEXT NOT NULL,
    kind     TEXT NOT NULL,
    value    TEXT NOT NULL,
    first_at BIGINT NOT NULL,
    PRIMARY KEY (token_id, kind, value)
);
CREATE TABLE alerts (
    id              TEXT PRIMARY KEY,
    workspace_id    TEXT NOT NULL,
    token_id        TEXT NOT NULL,
    app_id          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    severity        TEXT NOT NULL,
    status          TEXT NOT NULL,
    dedup           TEXT NOT NULL,
    summary         TEXT NOT NULL,
    evidence        TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    last_at         BIGINT NOT NULL,
    occurrences     BIGINT NOT NULL DEFAULT 1,
    action          TEXT,
    acknowledged_by TEXT,
    acknowledged_at BIGINT,
    resolved_by     TEXT,
    resolved_at     BIGINT
);
CREATE UNIQUE INDEX alerts_active ON alerts (token_id, kind, dedup) WHERE status <> 'resolved';
CREATE INDEX alerts_workspace ON alerts (workspace_id, id);
CREATE INDEX alerts_status ON alerts (status, severity);
ALTER TABLE workspace_policies ADD COLUMN anomaly_suspend TEXT;
