-- Token exchange's delegation rule (issue 12): the apps whose API keys and OAuth tokens a client
-- may present as a subject token, besides its own app's (a JSON array of app ids).
ALTER TABLE oauth_clients ADD COLUMN exchange_subject_apps TEXT NOT NULL DEFAULT '[]';
