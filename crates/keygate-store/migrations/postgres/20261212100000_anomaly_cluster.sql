-- Anomaly detection across nodes (issue 15): each node's gateway sees only its share of a token's
-- traffic, so the detectors run on one node at a time, the holder of the detector lease, over
-- what every node counted. anomaly_activity: what a node that does not hold the lease counted in
-- one turn (its activities as one JSON array), taken by the holder at its next turn.
-- anomaly_detector: the lease (one row).
CREATE TABLE anomaly_activity (
    id    BIGSERIAL PRIMARY KEY,
    node  TEXT NOT NULL,
    at    BIGINT NOT NULL,
    batch TEXT NOT NULL
);
CREATE TABLE anomaly_detector (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    owner       TEXT NOT NULL,
    lease_until BIGINT NOT NULL
);
