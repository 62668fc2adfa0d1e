-- The filters of the inbox's sealed generations (docs/reliability.md,
-- "The inbox"): one Bloom filter for each window of days (counted from
-- 1970, INBOX_WINDOW_DAYS long) over the ids of its sealed generations
-- `days`. One worker at a time adds a generation to it; every worker reads
-- it. `hashes` is the number of probes per id; `bits` the filter, 64-bit
-- words in little-endian order.
CREATE TABLE inbox_filters (
    bucket date PRIMARY KEY,
    days date[] NOT NULL,
    hashes integer NOT NULL,
    bits bytea NOT NULL
);

-- Random bits do not compress: store them out of line as they are.
ALTER TABLE inbox_filters ALTER COLUMN bits SET STORAGE EXTERNAL;

-- A generation begins every day now, so at midnight every worker's first
-- batch may begin it at once; two concurrent CREATE TABLE IF NOT EXISTS
-- can fail on the catalog's unique index. One waits for the other, then
-- finds it made.
CREATE OR REPLACE FUNCTION inbox_generation(start date) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('inbox_generation'));
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I (id uuid PRIMARY KEY)', 'inbox_g' || to_char(start, 'YYYYMMDD'));
END
$$;
