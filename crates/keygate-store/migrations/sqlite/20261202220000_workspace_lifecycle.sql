-- Workspaces are deleted softly (issue 13): the row stays for the audit trail and the history of
-- its tokens, under a name that frees the old one; a deleted workspace is never listed or found.
ALTER TABLE workspaces ADD COLUMN deleted_at BIGINT;
