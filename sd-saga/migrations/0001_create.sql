-- sd-saga log. `{schema}`, `{table}` (schema-qualified), `{events}` (schema-qualified) and
-- `{name}` (the bare table name, for index names) are replaced by the configured names.
CREATE SCHEMA IF NOT EXISTS {schema};
-- One row per saga instance: where it is, its data, the optimistic-concurrency version
-- and the lease (owner, fencing epoch, expiry).
CREATE TABLE IF NOT EXISTS {table} (
    id           TEXT        PRIMARY KEY,
    saga_type    TEXT        NOT NULL,
    state        TEXT        NOT NULL CHECK (state IN ('running', 'compensating', 'completed', 'compensated', 'stuck')),
    step         INTEGER     NOT NULL,
    compensating BOOLEAN     NOT NULL,
    data         JSONB       NOT NULL,
    version      BIGINT      NOT NULL,
    owner        TEXT,
    epoch        BIGINT      NOT NULL,
    lease_until  TIMESTAMPTZ,
    reason       TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
-- What recover() scans: live sagas of a type by lease expiry.
CREATE INDEX IF NOT EXISTS {name}_live_idx ON {table} (saga_type, lease_until)
    WHERE state IN ('running', 'compensating');
-- What metrics() scans: unfinished sagas by age.
CREATE INDEX IF NOT EXISTS {name}_unfinished_idx ON {table} (saga_type, created_at)
    WHERE state IN ('running', 'compensating', 'stuck');
-- The step log: one row per write, keyed by the saga version it was written at.
CREATE TABLE IF NOT EXISTS {events} (
    saga_id   TEXT        NOT NULL,
    version   BIGINT      NOT NULL,
    epoch     BIGINT      NOT NULL,
    step      INTEGER     NOT NULL,
    direction TEXT        NOT NULL CHECK (direction IN ('forward', 'compensate')),
    kind      TEXT        NOT NULL CHECK (kind IN ('intent', 'done', 'failed', 'resumed')),
    attempt   INTEGER     NOT NULL,
    error     TEXT,
    at        TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (saga_id, version)
);
