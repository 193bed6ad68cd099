-- Refusals by reason (issue 17's reports): what the gateway refused on a workspace's routes, per
-- route, reason (the stable code: unknown_token, rate_limited, subscription_required, …) and
-- hour, added to by every node's usage flush. Refusals before routing (no route, a denied
-- address on [gateway] deny) belong to no workspace and are only in each node's /metrics.
CREATE TABLE usage_refusals (
    workspace_id TEXT NOT NULL,
    route        TEXT NOT NULL,
    reason       TEXT NOT NULL,
    hour         BIGINT NOT NULL,
    status       INTEGER NOT NULL,
    requests     BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, hour, route, reason)
);
