-- A webhook secret rotated with an overlap (issue 15): the replaced signing key, sealed as the
-- current one is, keeps signing beside the new one until previous_secret_until (milliseconds), so
-- that receivers can move to the new secret without losing a message. NULL: no overlap.
ALTER TABLE webhook_endpoints ADD COLUMN previous_sealed_secret BLOB;
ALTER TABLE webhook_endpoints ADD COLUMN previous_secret_until BIGINT;
