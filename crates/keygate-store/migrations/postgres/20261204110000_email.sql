-- Email notifications (issue 15). email_outbox holds one message per recipient and event, written
-- in the event's transaction when [email] is configured, claimed and retried like webhook
-- deliveries. notification_prefs holds each person's choices per workspace and event type
-- (email 1: send, 0: do not), over the event's default audience.
CREATE TABLE email_outbox (
    id              BIGSERIAL PRIMARY KEY,
    workspace_id    TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    recipient       TEXT NOT NULL,
    recipient_name  TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_at         BIGINT,
    lease_owner     TEXT,
    lease_until     BIGINT,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    sent_at         BIGINT
);
CREATE INDEX email_outbox_due ON email_outbox (state, next_at);
CREATE INDEX email_outbox_by_workspace ON email_outbox (workspace_id, id);
CREATE TABLE notification_prefs (
    workspace_id    TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    email           INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, user_id, event_type)
);
