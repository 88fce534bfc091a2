-- sd-saga log, written for the default names: schema `public`, tables `sagas` and
-- `sagas_events`. `PostgresStore::migrate` puts in the configured names (sd-core's
-- Migrator); as it stands the file applies with `psql -f`.
CREATE SCHEMA IF NOT EXISTS public;
-- One row per saga instance: where it is, its data, the optimistic-concurrency version
-- and the lease (owner, fencing epoch, expiry).
CREATE TABLE IF NOT EXISTS public.sagas (
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
CREATE INDEX IF NOT EXISTS sagas_live_idx ON public.sagas (saga_type, lease_until)
    WHERE state IN ('running', 'compensating');
-- What metrics() scans: unfinished sagas by age.
CREATE INDEX IF NOT EXISTS sagas_unfinished_idx ON public.sagas (saga_type, created_at)
    WHERE state IN ('running', 'compensating', 'stuck');
-- The step log: one row per write, keyed by the saga version it was written at.
CREATE TABLE IF NOT EXISTS public.sagas_events (
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
