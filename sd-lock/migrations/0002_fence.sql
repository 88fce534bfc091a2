-- sd-lock: the fence table. `{table}` is replaced by the configured name.
-- The newest fencing token each protected resource has accepted.
SELECT pg_advisory_xact_lock(hashtextextended('sd-lock migrate {table}', 0));
CREATE TABLE IF NOT EXISTS {table} (
    resource text PRIMARY KEY,
    token    bigint NOT NULL
);
