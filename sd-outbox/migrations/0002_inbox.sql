-- The consumer-side inbox, written for the default name `outbox_inbox`: it applies with
-- `psql -f` as it stands; `Inbox::migrate` (sd-core's Migrator) puts in the configured name.
CREATE TABLE IF NOT EXISTS outbox_inbox (
    consumer    TEXT        NOT NULL,
    message_id  UUID        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX IF NOT EXISTS outbox_inbox_received_idx ON outbox_inbox (received_at);
