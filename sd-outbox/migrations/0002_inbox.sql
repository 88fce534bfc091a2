-- The consumer-side inbox. `{table}` is replaced by the configured table name.
CREATE TABLE IF NOT EXISTS {table} (
    consumer    TEXT        NOT NULL,
    message_id  UUID        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX IF NOT EXISTS {table}_received_idx ON {table} (received_at);
