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
    -- `events` is a view over the three partitioned tables; each of
    -- their day partitions, and each generation of the inbox, is a table
    -- of its own and moves too.
    tables text[] := ARRAY['events', 'event_rows', 'commands', 'devices', 'measurements', 'beacon_readings',
                           'outbox', 'delivery_attempts', 'operator_action_messages',
                           'operator_actions', 'parked_messages', 'parkings', 'message_edits',
                           'inbox_filters', '_sqlx_migrations'];
    role text := current_setting('worker.role');
    name text;
    func text;
BEGIN
    tables := tables || ARRAY(
        SELECT c.relname::text FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid
          JOIN pg_class p ON p.oid = i.inhparent
          JOIN pg_namespace n ON n.oid = p.relnamespace
         WHERE n.nspname = 'public' AND p.relname IN ('measurements', 'beacon_readings', 'event_rows')
         UNION ALL
        SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname ~ '^inbox_g[0-9]{8}$');
    FOREACH name IN ARRAY tables LOOP
        IF to_regclass(format('public.%I', name)) IS NOT NULL THEN
            -- Owned sequences (bigserial) and indexes move with the table.
            EXECUTE format('ALTER TABLE public.%I SET SCHEMA iot', name);
            EXECUTE format('ALTER TABLE iot.%I OWNER TO %I', name, role);
        END IF;
    END LOOP;
    FOREACH func IN ARRAY ARRAY['outbox_notify()', 'day_partition(regclass, date)', 'inbox_generation(date)'] LOOP
        IF to_regprocedure('public.' || func) IS NOT NULL THEN
            EXECUTE format('ALTER FUNCTION public.%s SET SCHEMA iot', func);
            EXECUTE format('ALTER FUNCTION iot.%s OWNER TO %I', func, role);
        END IF;
    END LOOP;
END
$$;
COMMIT;
