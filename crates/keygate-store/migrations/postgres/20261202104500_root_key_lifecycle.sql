-- Root keys can expire, be revoked (kept for the list and the audit trail) and say when they
-- were last used (written at most once a minute per key, never on every request).
ALTER TABLE root_keys ADD COLUMN expires_at BIGINT;
ALTER TABLE root_keys ADD COLUMN revoked_at BIGINT;
ALTER TABLE root_keys ADD COLUMN last_used_at BIGINT;

-- Keys made with every permission there was (`*`, the default of `keygate root-key create`) keep
-- holding every permission: they gain root_keys:read and root_keys:write. Narrower keys do not.
UPDATE root_keys
SET permissions = '["tokens:read","tokens:write","apps:read","apps:write","plans:read","plans:write","audit:read","keys:write","root_keys:read","root_keys:write"]'
WHERE permissions = '["tokens:read","tokens:write","apps:read","apps:write","plans:read","plans:write","audit:read","keys:write"]';
