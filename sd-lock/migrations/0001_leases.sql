-- sd-lock: the leases table (default name `sd_lock_leases`; `Migrator::name` puts in a
-- configured one). One row per resource, kept after release so `epoch` (the fencing
-- token) only grows.
CREATE TABLE IF NOT EXISTS sd_lock_leases (
    resource   text PRIMARY KEY,
    holder     text,
    epoch      bigint NOT NULL DEFAULT 0,
    expires_at timestamptz
);
