-- Issue 17 (governance). A rate limit and a quota that belong to an app and are shared by all of
-- its tokens (JSON, the shapes of a token's; NULL: none), and a token's limit on uses in all
-- (NULL: none; 1: a single-use token).
ALTER TABLE apps ADD COLUMN rate_limit TEXT;
ALTER TABLE apps ADD COLUMN quota TEXT;
ALTER TABLE tokens ADD COLUMN max_uses BIGINT;
-- A workspace's token rules and denylist (JSON: keygate_core::account::TokenRules; NULL: none).
ALTER TABLE workspace_policies ADD COLUMN rules TEXT;
-- A plan's prices (JSON: keygate_core::billing::Pricing; NULL: not priced).
ALTER TABLE plans ADD COLUMN pricing TEXT;
