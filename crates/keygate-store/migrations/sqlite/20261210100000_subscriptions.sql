-- Subscriptions with approval (issue 17). An API says who may call its routes: every admitted
-- token ('open', as before), only tokens of apps subscribed to it ('subscription'), or the same
-- with each subscription waiting for an owner's or admin's approval ('approval').
ALTER TABLE apis ADD COLUMN access TEXT NOT NULL DEFAULT 'open';
-- An app's subscription to an API, or to one of its versions (version NULL: every version),
-- optionally under a plan whose rate limit and quota the app's calls to the API share. Status:
-- pending, active, rejected, cancelled. Each change takes a change-feed position in
-- `route_changes` (as 'subscription:<id>'), so every node's gateway rebuilds its table. The plan
-- is not a foreign key: a deleted plan leaves the subscription without limits.
CREATE TABLE api_subscriptions (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    app_id        TEXT NOT NULL REFERENCES apps(id),
    api_id        TEXT NOT NULL REFERENCES apis(id),
    version       TEXT,
    plan_id       TEXT,
    status        TEXT NOT NULL,
    requested_by  TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    decided_by    TEXT,
    decided_at    BIGINT,
    reason        TEXT
);
CREATE INDEX api_subscriptions_workspace ON api_subscriptions (workspace_id, created_at);
CREATE INDEX api_subscriptions_app ON api_subscriptions (app_id);
-- At most one pending or active subscription per app, API and version, whichever node adds it.
CREATE UNIQUE INDEX api_subscriptions_live ON api_subscriptions (app_id, api_id, COALESCE(version, ''))
    WHERE status IN ('pending', 'active');
