-- sd-idempotency: one row per (scope, key), in the default table `idempotency_keys`
-- (`Migrator::name` puts in a configured name; the index follows it).
CREATE TABLE IF NOT EXISTS idempotency_keys (
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
CREATE INDEX IF NOT EXISTS idempotency_keys_expires_idx ON idempotency_keys (expires_at);
