-- Per-token usage, aggregated per minute and route by the gateway and flushed in the background.
CREATE TABLE token_usage (
    token_id      TEXT NOT NULL,
    workspace_id  TEXT NOT NULL,
    route         TEXT NOT NULL,
    minute        BIGINT NOT NULL,
    requests      BIGINT NOT NULL,
    status_2xx    BIGINT NOT NULL,
    status_3xx    BIGINT NOT NULL,
    status_4xx    BIGINT NOT NULL,
    status_5xx    BIGINT NOT NULL,
    bytes_in      BIGINT NOT NULL,
    bytes_out     BIGINT NOT NULL,
    latency_us_sum BIGINT NOT NULL,
    -- Latency histogram: requests that took at most 1, 5, 10, 25, 50, 100, 250, 500, 1000 ms, and more.
    lat_1ms BIGINT NOT NULL, lat_5ms BIGINT NOT NULL, lat_10ms BIGINT NOT NULL, lat_25ms BIGINT NOT NULL,
    lat_50ms BIGINT NOT NULL, lat_100ms BIGINT NOT NULL, lat_250ms BIGINT NOT NULL, lat_500ms BIGINT NOT NULL,
    lat_1s BIGINT NOT NULL, lat_inf BIGINT NOT NULL,
    PRIMARY KEY (token_id, route, minute)
);
CREATE INDEX token_usage_by_workspace ON token_usage (workspace_id, token_id, minute);

-- Quota counts per token and period, so they survive a restart.
CREATE TABLE quota_counters (
    token_id      TEXT PRIMARY KEY,
    period_start  BIGINT NOT NULL,
    count         BIGINT NOT NULL
);
