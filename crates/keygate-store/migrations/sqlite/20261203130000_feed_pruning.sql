-- The change feed is pruned (rows older than cluster.feed_retention_hours); pruned_through is the
-- highest position deleted. A follower whose position is below it cannot replay the feed and
-- reloads a snapshot instead.
ALTER TABLE feed_state ADD COLUMN pruned_through BIGINT NOT NULL DEFAULT 0;
CREATE INDEX token_changes_by_time ON token_changes (at);
