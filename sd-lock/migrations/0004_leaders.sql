-- sd-lock: the elections table (default name `sd_lock_leaders`; `Migrator::name` puts in
-- a configured one). One row per election, kept after a term ends so `term` (the
-- fencing token) only grows.
CREATE TABLE IF NOT EXISTS sd_lock_leaders (
    name       text PRIMARY KEY,
    holder     text,
    value      text,
    term       bigint NOT NULL DEFAULT 0,
    expires_at timestamptz
);
