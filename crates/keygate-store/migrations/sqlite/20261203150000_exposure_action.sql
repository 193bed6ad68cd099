-- What a workspace does with a token found exposed (issue 15): notify (mark it only), suspend or
-- revoke.
ALTER TABLE workspace_policies ADD COLUMN exposure_action TEXT NOT NULL DEFAULT 'notify';
