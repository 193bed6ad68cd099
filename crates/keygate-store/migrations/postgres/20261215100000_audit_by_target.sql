-- A token's (or client's) audit events by action, newest first, without reading the workspace's
-- trail: the alert's resume reads a token's latest `token.suspend` and `token.exposed`, a secret-
-- scanning report the token's earlier exposures, and the admin API filters by target and action.
CREATE INDEX audit_by_target ON audit_events (workspace_id, target, action, id);
