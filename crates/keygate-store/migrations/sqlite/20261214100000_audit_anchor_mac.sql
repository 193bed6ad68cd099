-- The audit chain's anchor authenticated (keygate-core's audit_chain::anchor_mac): an HMAC under
-- the chain's key over the workspace, anchor_seq and anchor_link, written by the retention pass
-- with the anchor, so that someone with the database alone cannot delete the start of the trail
-- and move the anchor past it. Existing anchors are left without one on purpose: computing it here
-- would authenticate an anchor that may have been forged. `keygate audit verify` reports such an
-- anchor as unauthenticated until the next retention pass replaces it (docs/operations.md).
ALTER TABLE audit_chains ADD COLUMN anchor_mac TEXT;
