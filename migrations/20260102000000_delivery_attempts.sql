-- Crash-loop protection on classic queues: redeliveries of a message that
-- was never settled, counted durably so a message that kills the process
-- is parked after the topology's delivery_limit.
CREATE TABLE delivery_attempts (
    delivery_key  text PRIMARY KEY,
    redeliveries  int NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);
