-- The AI gateway (issue 16): LLM usage per caller, route, deployment and hour, and spending per
-- virtual key, route and budget period (added to by every node; budgets read the totals back).
CREATE TABLE llm_usage (
    workspace_id  TEXT NOT NULL,
    caller        TEXT NOT NULL,
    app_id        TEXT NOT NULL,
    route         TEXT NOT NULL,
    deployment    TEXT NOT NULL,
    hour          BIGINT NOT NULL,
    requests      BIGINT NOT NULL,
    errors        BIGINT NOT NULL,
    input_tokens  BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    micro_usd     BIGINT NOT NULL,
    fallbacks     BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, caller, route, deployment, hour)
);
CREATE TABLE llm_spending (
    spend_key    TEXT NOT NULL,
    route_key    BIGINT NOT NULL,
    period_start BIGINT NOT NULL,
    micro_usd    BIGINT NOT NULL,
    PRIMARY KEY (spend_key, route_key, period_start)
);
CREATE INDEX llm_spending_period ON llm_spending (period_start);
