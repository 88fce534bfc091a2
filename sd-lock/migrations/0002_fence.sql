-- sd-lock: the fence table (default name `sd_lock_fence`; `Migrator::name` puts in a
-- configured one). The newest fencing token each protected resource has accepted.
CREATE TABLE IF NOT EXISTS sd_lock_fence (
    resource text PRIMARY KEY,
    token    bigint NOT NULL
);
