-- Tokens bound to a DPoP key (RFC 9449): the key's RFC 7638 thumbprint.
ALTER TABLE tokens ADD COLUMN dpop_jkt TEXT;
