-- The parking lot (docs/reliability.md, "The parking lot"): every message
-- that reaches Q.dlq is kept here, one row per message, and acted on by
-- `requeue` and the console.
CREATE TABLE parked_messages (
    id bigserial PRIMARY KEY,
    -- The main queue Q the message was parked from.
    queue text NOT NULL,
    message_id text NOT NULL,
    message_type text NULL,
    error_kind text NOT NULL,
    error text NOT NULL,
    fingerprint text NOT NULL,
    -- Every AMQP header, readable (strings, numbers, arrays, objects).
    headers jsonb NOT NULL,
    body bytea NOT NULL,
    status text NOT NULL DEFAULT 'parked' CHECK (status IN ('parked', 'retried', 'archived')),
    times_parked int NOT NULL DEFAULT 1,
    first_parked_at timestamptz NOT NULL DEFAULT now(),
    last_parked_at timestamptz NOT NULL DEFAULT now(),
    status_changed_at timestamptz NOT NULL DEFAULT now(),
    status_changed_by text NULL,
    -- Every AMQP property but the headers, readable.
    properties jsonb NOT NULL,
    -- The properties (headers included) exactly as AMQP encodes them in a
    -- content header: a retry republishes the message with the same
    -- properties and the same header types.
    amqp_properties bytea NOT NULL,
    -- iot-requeue-count of the parking stored: a copy with the same count
    -- is the same parking again (a crash between confirm and ack), a
    -- higher one a new parking after a retry.
    requeue_count int NOT NULL DEFAULT 0,
    -- iot-last-failure-at (or the broker's dead-lettering time).
    failed_at timestamptz NULL,
    UNIQUE (queue, message_id)
);

-- Groups by fingerprint and the pages of one group.
CREATE INDEX parked_messages_by_group ON parked_messages (queue, status, fingerprint, last_parked_at, id);
-- Pages of every message, newest or oldest first, and time filters.
CREATE INDEX parked_messages_by_time ON parked_messages (queue, status, last_parked_at, id);
-- Retention: retried and archived rows by age.
CREATE INDEX parked_messages_retention ON parked_messages (status_changed_at) WHERE status <> 'parked';

CREATE TABLE operator_actions (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    action text NOT NULL CHECK (action IN ('retry', 'archive', 'unarchive')),
    -- The filter as given (flags or console fields), with the queue.
    filter jsonb NOT NULL,
    -- Messages the action changed, counted as each batch commits.
    messages int NOT NULL DEFAULT 0,
    queue text NOT NULL,
    -- Where a retry published (NULL for archive and unarchive).
    target text NULL
);

CREATE INDEX operator_actions_by_time ON operator_actions (at);

-- Which messages each action changed: the history `requeue --show` and
-- the console print for one message.
CREATE TABLE operator_action_messages (
    parked_id bigint NOT NULL REFERENCES parked_messages (id) ON DELETE CASCADE,
    action_id bigint NOT NULL REFERENCES operator_actions (id) ON DELETE CASCADE,
    PRIMARY KEY (parked_id, action_id)
);
