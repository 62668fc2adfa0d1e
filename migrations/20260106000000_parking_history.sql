-- Round two of the parking lot (docs/console.md, "Round two"): every
-- parking of a message is a row, and an operator may fix a message before
-- retrying it.

-- One row per parking of a message, written by the statement that stores
-- the parking in parked_messages (docs/reliability.md, "The parking lot").
-- It goes with its message when retention deletes the message.
CREATE TABLE parkings (
    id bigserial PRIMARY KEY,
    parked_id bigint NOT NULL REFERENCES parked_messages (id) ON DELETE CASCADE,
    -- The main queue Q, repeated so the chart of the Failures page reads
    -- this table alone.
    queue text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    error_kind text NOT NULL,
    error text NOT NULL,
    fingerprint text NOT NULL,
    -- The attempt headers of the parked copy.
    retry_count bigint NULL,
    requeue_count int NOT NULL,
    failed_at timestamptz NULL
);

-- A message's history, in order.
CREATE INDEX parkings_of_message ON parkings (parked_id, at, id);
-- Messages parked per hour and kind, and the groups that grew lately.
CREATE INDEX parkings_by_time ON parkings (queue, at) INCLUDE (error_kind, fingerprint);

-- What the lot knew before: the latest parking of each message.
INSERT INTO parkings (parked_id, queue, at, error_kind, error, fingerprint, retry_count, requeue_count, failed_at)
SELECT id, queue, last_parked_at, error_kind, error, fingerprint,
       CASE WHEN jsonb_typeof(headers -> 'iot-retry-count') = 'number'
                 AND (headers ->> 'iot-retry-count')::numeric BETWEEN -9223372036854775808 AND 9223372036854775807
            THEN (headers ->> 'iot-retry-count')::numeric::bigint END,
       requeue_count, failed_at
FROM parked_messages;

-- Fix and retry: the operator's edit, as an action of its own.
ALTER TABLE operator_actions DROP CONSTRAINT operator_actions_action_check;
ALTER TABLE operator_actions ADD CONSTRAINT operator_actions_action_check
    CHECK (action IN ('retry', 'archive', 'unarchive', 'edit'));

-- What an `edit` action changed: the bytes before and after (the lot's
-- row keeps the original body), the header it set, and the diff the
-- message's page shows.
CREATE TABLE message_edits (
    action_id bigint PRIMARY KEY REFERENCES operator_actions (id) ON DELETE CASCADE,
    parked_id bigint NOT NULL REFERENCES parked_messages (id) ON DELETE CASCADE,
    original_body bytea NOT NULL,
    edited_body bytea NOT NULL,
    -- The one non-iot-* header set, if any, and its value.
    header text NULL,
    header_value text NULL,
    diff text NOT NULL
);

CREATE INDEX message_edits_of_message ON message_edits (parked_id);
