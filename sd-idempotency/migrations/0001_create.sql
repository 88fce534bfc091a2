-- One row per (scope, key). `{table}` is replaced by the configured table name.
CREATE TABLE IF NOT EXISTS {table} (
    scope           TEXT        NOT NULL,
    key             TEXT        NOT NULL,
    fingerprint     BYTEA       NOT NULL,
    state           TEXT        NOT NULL CHECK (state IN ('in_flight', 'completed')),
    epoch           BIGINT      NOT NULL,
    token           BIGINT      NOT NULL,
    lock_expires_at TIMESTAMPTZ,
    expires_at      TIMESTAMPTZ NOT NULL,
    response        BYTEA,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS {table}_expires_idx ON {table} (expires_at);
