-- Growth (docs/architecture.md, "Growth"; docs/operations.md, "Retention"):
-- readings and events are partitioned by day, a reading is stored once,
-- and message ids are remembered in an inbox of their own, in generations
-- that are dropped whole. Every row of the tables before is kept.

-- Makes the partition of `parent` for the UTC day `day`, unless it is
-- there: `<parent>_pYYYYMMDD`, FOR VALUES FROM that midnight TO the next.
-- Made as a table first and then attached, which locks the parent less
-- than CREATE TABLE … PARTITION OF (ingest goes on). Two makers of one
-- partition wait for each other; a table of that name left detached by an
-- interrupted retention run is dropped and made again.
CREATE FUNCTION day_partition(parent regclass, day date) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    schema text;
    base text;
    name text;
    lower timestamptz := day::timestamp AT TIME ZONE 'UTC';
BEGIN
    SELECT n.nspname, c.relname INTO schema, base
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = parent;
    name := format('%s_p%s', base, to_char(day, 'YYYYMMDD'));
    PERFORM pg_advisory_xact_lock(hashtext(schema || '.' || name));
    IF EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE i.inhparent = parent AND c.relname = name AND n.nspname = schema) THEN
        RETURN;
    END IF;
    IF to_regclass(format('%I.%I', schema, name)) IS NOT NULL THEN
        EXECUTE format('DROP TABLE %I.%I', schema, name);
    END IF;
    EXECUTE format('CREATE TABLE %I.%I (LIKE %I.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   schema, name, schema, base);
    EXECUTE format('ALTER TABLE %I.%I ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
                   schema, base, schema, name, lower, lower + interval '1 day');
END
$$;

-- The tables as they were, kept until their rows are copied.
ALTER TABLE events RENAME TO events_before_growth;
ALTER INDEX events_pkey RENAME TO events_before_growth_pkey;
ALTER TABLE measurements RENAME TO measurements_before_growth;
ALTER INDEX measurements_pkey RENAME TO measurements_before_growth_pkey;
ALTER INDEX measurements_device_time RENAME TO measurements_before_growth_device_time;
ALTER TABLE beacon_readings RENAME TO beacon_readings_before_growth;
ALTER INDEX beacon_readings_pkey RENAME TO beacon_readings_before_growth_pkey;
-- The ids go on from where they were.
ALTER SEQUENCE measurements_id_seq OWNED BY NONE;
ALTER SEQUENCE beacon_readings_id_seq OWNED BY NONE;

-- One row per reading, partitioned by when it was measured. Its message id
-- is unique by the inbox (below), its id by its sequence: a unique index
-- on a partitioned table must hold the partition key, and an index over
-- random ids is what made a full table slow.
CREATE TABLE measurements (
    id          bigint NOT NULL DEFAULT nextval('measurements_id_seq'),
    message_id  text NOT NULL,
    device_id   text NOT NULL,
    sensor      text NOT NULL,
    value       double precision NOT NULL,
    unit        text,
    measured_at timestamptz NOT NULL
) PARTITION BY RANGE (measured_at);
ALTER SEQUENCE measurements_id_seq OWNED BY measurements.id;
CREATE INDEX measurements_device_time ON measurements (device_id, measured_at);

CREATE TABLE beacon_readings (
    id          bigint NOT NULL DEFAULT nextval('beacon_readings_id_seq'),
    message_id  text NOT NULL,
    mac_address text,
    uuid        text,
    major       int,
    minor       int,
    tx_power    int,
    rssi        int,
    observed_at timestamptz NOT NULL
) PARTITION BY RANGE (observed_at);
ALTER SEQUENCE beacon_readings_id_seq OWNED BY beacon_readings.id;

-- The events that no typed table keeps (device status, record-only types),
-- in full, partitioned by the message's time.
CREATE TABLE event_rows (
    message_id  text NOT NULL,
    type        text NOT NULL,
    actor       text,
    target      text,
    occurred_at timestamptz NOT NULL,
    data        jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (occurred_at);

-- A partition for every day the rows before were on, and for today and
-- the week ahead (the worker makes them ahead from then on).
SELECT day_partition(t, (now() AT TIME ZONE 'UTC')::date + n)
  FROM UNNEST(ARRAY['measurements', 'beacon_readings', 'event_rows']::regclass[]) AS t,
       generate_series(0, 7) AS n;
SELECT day_partition('measurements', d)
  FROM (SELECT DISTINCT (measured_at AT TIME ZONE 'UTC')::date AS d FROM measurements_before_growth) days;
SELECT day_partition('beacon_readings', d)
  FROM (SELECT DISTINCT (observed_at AT TIME ZONE 'UTC')::date AS d FROM beacon_readings_before_growth) days;
SELECT day_partition('event_rows', d)
  FROM (SELECT DISTINCT (occurred_at AT TIME ZONE 'UTC')::date AS d FROM events_before_growth) days;

INSERT INTO measurements (id, message_id, device_id, sensor, value, unit, measured_at)
SELECT id, message_id, device_id, sensor, value, unit, measured_at
  FROM measurements_before_growth ORDER BY measured_at;
INSERT INTO beacon_readings (id, message_id, mac_address, uuid, major, minor, tx_power, rssi, observed_at)
SELECT id, message_id, mac_address, uuid, major, minor, tx_power, rssi, observed_at
  FROM beacon_readings_before_growth ORDER BY observed_at;
-- Every event row, except a reading whose typed row keeps it.
INSERT INTO event_rows (message_id, type, actor, target, occurred_at, data, received_at)
SELECT e.message_id, e.type, e.actor, e.target, e.occurred_at, e.data, e.received_at
  FROM events_before_growth e
 WHERE NOT (e.type = 'MEASUREMENT'
            AND EXISTS (SELECT 1 FROM measurements_before_growth m WHERE m.message_id = e.message_id))
   AND NOT (e.type = 'IBEACON_CHANGE'
            AND EXISTS (SELECT 1 FROM beacon_readings_before_growth b WHERE b.message_id = e.message_id))
 ORDER BY e.occurred_at;

-- `events` as users read it: every event the worker applied, one row each,
-- a reading's `data` made again from its typed row (docs/architecture.md,
-- "Growth": the columns of before; a reading's actor, target and
-- received_at are not kept).
CREATE VIEW events AS
SELECT message_id, type, actor, target, occurred_at, data, received_at
  FROM event_rows
UNION ALL
SELECT message_id, 'MEASUREMENT', NULL, NULL, measured_at,
       jsonb_strip_nulls(jsonb_build_object('device_id', device_id, 'sensor', sensor, 'value', value,
                                            'unit', unit, 'time', measured_at)),
       NULL
  FROM measurements
UNION ALL
SELECT message_id, 'IBEACON_CHANGE', NULL, NULL, observed_at,
       CASE WHEN mac_address IS NULL THEN 'null'::jsonb
            ELSE jsonb_build_object('mac_address', mac_address, 'uuid', uuid, 'major', major, 'minor', minor,
                                    'tx_power', tx_power, 'rssi', rssi) END,
       NULL
  FROM beacon_readings;

-- The inbox of events: a generation is a table of the ids (the first 16
-- bytes of SHA-256 of the message id, as a uuid) first seen while it was
-- the newest, `inbox_gYYYYMMDD` by the UTC day it began. The worker begins
-- one every INBOX_WINDOW_DAYS, checks an id against every generation, and
-- drops a generation once the one after it is a window old.
CREATE FUNCTION inbox_generation(start date) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I (id uuid PRIMARY KEY)', 'inbox_g' || to_char(start, 'YYYYMMDD'));
END
$$;

-- The ids of the events of the last 60 days (two windows of the default
-- 30) go into the generation a 30-day window begins now.
DO $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    start date := date '1970-01-01' + ((today - date '1970-01-01') / 30) * 30;
BEGIN
    PERFORM inbox_generation(start);
    EXECUTE format(
        'INSERT INTO %I (id) SELECT encode(substring(sha256(convert_to(message_id, %L)) FROM 1 FOR 16), %L)::uuid
           FROM events_before_growth WHERE received_at > now() - interval %L ORDER BY 1 ON CONFLICT DO NOTHING',
        'inbox_g' || to_char(start, 'YYYYMMDD'), 'UTF8', 'hex', '60 days');
END
$$;

DROP TABLE events_before_growth, measurements_before_growth, beacon_readings_before_growth;
