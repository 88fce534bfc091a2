-- sd-lock: the semaphore's permits table (default name `sd_lock_permits`;
-- `Migrator::name` puts in a configured one). One row per slot of a resource, kept
-- after release; slot -1 is the resource's token counter, bumped by every grant.
CREATE TABLE IF NOT EXISTS sd_lock_permits (
    resource   text NOT NULL,
    slot       integer NOT NULL,
    holder     text,
    epoch      bigint NOT NULL DEFAULT 0,
    expires_at timestamptz,
    PRIMARY KEY (resource, slot)
);
