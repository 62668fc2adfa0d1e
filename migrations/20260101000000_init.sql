-- The worker's tables (SPEC §5). `events` and `commands`, keyed by message
-- id, are the inbox: a message whose id is already there has no effect.

CREATE TABLE events (
    message_id  text PRIMARY KEY,
    type        text NOT NULL,
    actor       text,
    target      text,
    occurred_at timestamptz NOT NULL,
    data        jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE commands (
    message_id  text PRIMARY KEY,
    type        text NOT NULL,
    device_id   text,
    data        jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    device_id    text PRIMARY KEY,
    status       text NOT NULL CHECK (status IN ('online', 'offline')),
    ip           text,
    last_seen_at timestamptz NOT NULL
);

CREATE TABLE measurements (
    id          bigserial PRIMARY KEY,
    message_id  text NOT NULL UNIQUE,
    device_id   text NOT NULL,
    sensor      text NOT NULL,
    value       double precision NOT NULL,
    unit        text,
    measured_at timestamptz NOT NULL
);
CREATE INDEX measurements_device_time ON measurements (device_id, measured_at);

CREATE TABLE beacon_readings (
    id          bigserial PRIMARY KEY,
    message_id  text NOT NULL UNIQUE,
    mac_address text,
    uuid        text,
    major       int,
    minor       int,
    tx_power    int,
    rssi        int,
    observed_at timestamptz NOT NULL
);

CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    message_id   text NOT NULL,
    exchange     text NOT NULL,
    routing_key  text NOT NULL,
    body         bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
