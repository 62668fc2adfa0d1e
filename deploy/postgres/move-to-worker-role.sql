-- Moves a database that a worker migrated as the superuser (its tables in
-- the schema `public`, owned by `postgres`) to the worker's role: run
-- worker-role.sql first, then this, as a superuser connected to the
-- worker's database, with every worker stopped:
--
--   WORKER_DB_USER=iot_worker \
--       psql -v ON_ERROR_STOP=1 -d worker_iot_core -f deploy/postgres/move-to-worker-role.sql
--
-- Every table the migrations made moves into the schema `iot` and passes
-- to the role, rows, indexes, sequences, triggers and the migration history
-- with it; nothing is copied. One transaction: all or nothing. Then point
-- DATABASE_URL at the role (docs/deployment.md, "Moving an existing
-- database to the role"); tests/it/deploy.rs runs this file.

\getenv worker_role WORKER_DB_USER
SELECT set_config('worker.role', :'worker_role', false);

BEGIN;
DO $$
DECLARE
    -- What the migrations create (store::TABLES, and the relay's trigger
    -- function). A table that is not there is skipped.
    tables text[] := ARRAY['events', 'commands', 'devices', 'measurements', 'beacon_readings',
                           'outbox', 'delivery_attempts', 'operator_action_messages',
                           'operator_actions', 'parked_messages', 'parkings', 'message_edits',
                           '_sqlx_migrations'];
    role text := current_setting('worker.role');
    name text;
BEGIN
    FOREACH name IN ARRAY tables LOOP
        IF to_regclass(format('public.%I', name)) IS NOT NULL THEN
            -- Owned sequences (bigserial) and indexes move with the table.
            EXECUTE format('ALTER TABLE public.%I SET SCHEMA iot', name);
            EXECUTE format('ALTER TABLE iot.%I OWNER TO %I', name, role);
        END IF;
    END LOOP;
    IF to_regprocedure('public.outbox_notify()') IS NOT NULL THEN
        ALTER FUNCTION public.outbox_notify() SET SCHEMA iot;
        EXECUTE format('ALTER FUNCTION iot.outbox_notify() OWNER TO %I', role);
    END IF;
END
$$;
COMMIT;
