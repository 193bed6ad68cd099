-- Routes managed through the admin API (issue 13). `config` is the JSON of a `[[routes]]` table
-- without `workspace`; route ids are unique in the instance. Each change takes a change-feed
-- position, recorded in `route_changes`, so that every node's gateway notices and reloads.
CREATE TABLE routes (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    config        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX routes_workspace ON routes (workspace_id);

CREATE TABLE route_changes (
    seq       BIGINT PRIMARY KEY,
    route_id  TEXT NOT NULL,
    at        BIGINT NOT NULL
);
