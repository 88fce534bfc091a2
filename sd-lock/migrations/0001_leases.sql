-- sd-lock: the leases table. `{table}` is replaced by the configured name.
-- One row per resource, kept after release so `epoch` (the fencing token) only grows.
SELECT pg_advisory_xact_lock(hashtextextended('sd-lock migrate {table}', 0));
CREATE TABLE IF NOT EXISTS {table} (
    resource   text PRIMARY KEY,
    holder     text,
    epoch      bigint NOT NULL DEFAULT 0,
    expires_at timestamptz
);
