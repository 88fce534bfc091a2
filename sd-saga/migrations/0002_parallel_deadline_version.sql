-- sd-saga log, second migration (default names, as 0001): what parallel groups,
-- deadlines, cancels and definition versions need. Rows written before it keep working:
-- `progress` NULL means "no progress kept" and `definition_version` defaults to 1.
-- The current stage's progress (which parallel branches started, finished, failed; which
-- compensations are owed and done), as JSON.
ALTER TABLE public.sagas ADD COLUMN IF NOT EXISTS progress JSONB;
-- Set by cancel(): why the saga was asked to stop going forward.
ALTER TABLE public.sagas ADD COLUMN IF NOT EXISTS cancel_reason TEXT;
-- The saga's deadline, in milliseconds on the starting orchestrator's clock.
ALTER TABLE public.sagas ADD COLUMN IF NOT EXISTS deadline_ms BIGINT;
-- The version of the definition the saga runs under.
ALTER TABLE public.sagas ADD COLUMN IF NOT EXISTS definition_version INTEGER NOT NULL DEFAULT 1;
-- Two new event kinds: a cancel or a deadline taking effect.
ALTER TABLE public.sagas_events DROP CONSTRAINT IF EXISTS sagas_events_kind_check;
ALTER TABLE public.sagas_events ADD CONSTRAINT sagas_events_kind_check
    CHECK (kind IN ('intent', 'done', 'failed', 'resumed', 'cancelled', 'deadline'));
