-- Crash-loop protection: redeliveries of a message that was never
-- settled, counted durably before it runs, so a message that kills the
-- process is parked. `boot_id` is the worker process that last started it:
-- redeliveries within one process (a reconnect) are not counted again.
CREATE TABLE delivery_attempts (
    delivery_key  text PRIMARY KEY,
    redeliveries  int NOT NULL,
    boot_id       text NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delivery_attempts_last_seen ON delivery_attempts (last_seen_at);
