-- A suspended state for OAuth clients (the anomaly policy suspends a client whose JWTs were used
-- suspiciously, as it suspends an API key): when and why. NULL while the client is active. Its
-- refresh tokens are kept while it is suspended (resuming it needs no new grant); its access
-- tokens are revoked on the change feed when it is suspended.
ALTER TABLE oauth_clients ADD COLUMN suspended_at BIGINT;
ALTER TABLE oauth_clients ADD COLUMN suspended_reason TEXT;
