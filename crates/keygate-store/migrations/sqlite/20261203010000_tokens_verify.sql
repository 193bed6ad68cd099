-- Keys that held every permission there was (`*`, the default of `keygate root-key create`) keep
-- holding every permission: they gain tokens:verify (POST /admin/v1/verify). Narrower keys do not.
UPDATE root_keys
SET permissions = '["tokens:read","tokens:write","apps:read","apps:write","plans:read","plans:write","audit:read","keys:write","root_keys:read","root_keys:write","routes:read","routes:write","workspaces:read","workspaces:write","tokens:verify"]'
WHERE permissions = '["tokens:read","tokens:write","apps:read","apps:write","plans:read","plans:write","audit:read","keys:write","root_keys:read","root_keys:write","routes:read","routes:write","workspaces:read","workspaces:write"]';
