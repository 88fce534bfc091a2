-- sd-outbox's table, written for the default name `outbox`: it applies with `psql -f`
-- as it stands; `Outbox::migrate` (sd-core's Migrator) puts in the configured name.

-- The relay's states of a row. An enum rather than TEXT with a CHECK: PostgreSQL
-- prepares every CHECK expression for each INSERT statement, and that IN list alone
-- cost an insert a third of a bare INSERT's work.
DO $$
BEGIN
    IF to_regtype('outbox_status') IS NULL THEN
        CREATE TYPE outbox_status AS ENUM ('pending', 'published', 'dead');
    END IF;
END
$$;

-- The outbox. The first five columns are Debezium's Outbox Event Router defaults, so a
-- CDC connector can read this table instead of the relay without touching producers.
CREATE TABLE IF NOT EXISTS outbox (
    id              UUID        PRIMARY KEY,
    aggregatetype   TEXT        NOT NULL,
    aggregateid     TEXT        NOT NULL,
    type            TEXT        NOT NULL,
    payload         JSONB,
    -- What the relay needs.
    payload_bytes   BYTEA,
    headers         JSONB       NOT NULL DEFAULT '{}'::jsonb,
    seq             BIGINT      GENERATED ALWAYS AS IDENTITY,
    txid            XID8        NOT NULL DEFAULT pg_current_xact_id(),
    status          outbox_status NOT NULL DEFAULT 'pending',
    attempts        INTEGER     NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ,
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at    TIMESTAMPTZ
    -- No CHECK that exactly one payload is set: PostgreSQL prepares every CHECK for each
    -- INSERT statement (a tenth of an enqueue's server work). `enqueue` always sets one;
    -- a row written with plain SQL and neither is published with a JSON null payload
    -- (Debezium's tombstone), and with both, the JSON one wins.
);
-- Ordered mode reads pending rows in transaction order.
CREATE INDEX IF NOT EXISTS outbox_ordered_idx ON outbox (txid, seq) WHERE status = 'pending';
-- Parallel mode reads pending rows per lane (a hash of the aggregate, 0 to 63) in
-- insertion order. An expression index rather than a generated column: PostgreSQL
-- prepares a generated column's expression for every INSERT statement, which cost more
-- than the rest of the row's extra work together; the relay's queries use the same
-- expression, so they read this index.
CREATE INDEX IF NOT EXISTS outbox_lane_hash_idx ON outbox
    (((hashtextextended(aggregatetype || chr(31) || aggregateid, 0) & 63)::smallint), seq)
    WHERE status = 'pending';
-- Aggregates whose head waits for a retry (a tiny index: only rows that failed).
CREATE INDEX IF NOT EXISTS outbox_retry_idx ON outbox (aggregatetype, aggregateid, seq)
    WHERE status = 'pending' AND next_attempt_at IS NOT NULL;
-- The retention sweep and dead-letter listing.
CREATE INDEX IF NOT EXISTS outbox_published_idx ON outbox (published_at) WHERE status = 'published';
CREATE INDEX IF NOT EXISTS outbox_dead_idx ON outbox (seq) WHERE status = 'dead';

-- Parallel relays claim lanes (hash of the aggregate, 64 of them) with
-- FOR UPDATE SKIP LOCKED: all events of one aggregate go through one relay at a time.
CREATE TABLE IF NOT EXISTS outbox_lanes (lane SMALLINT PRIMARY KEY);
INSERT INTO outbox_lanes SELECT generate_series(0, 63) ON CONFLICT DO NOTHING;

-- A wake-up for the relays at commit; the payload is empty (NOTIFY folds duplicates).
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
