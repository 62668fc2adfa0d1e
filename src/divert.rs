//! The copy a failed delivery becomes (docs/reliability.md, "Copies and
//! their headers"): where it goes, with which properties, and the outcome
//! it gives. Pure: the pipeline publishes the
//! plan and acks the delivery once the copy is confirmed.

use chrono::{DateTime, Utc};
use lapin::BasicProperties;

use crate::envelope::MessageType;
use crate::failure::Failed;
use crate::headers::{self, FailureRecord};
use crate::outcome::Outcome;
use crate::retry::Disposition;
use crate::topology::Topology;

/// What is known of the failed delivery.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub properties: &'a BasicProperties,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    /// When the message was first received (see [`headers::first_received`]).
    pub received: DateTime<Utc>,
    /// The id a raw device message was given at first receipt, when its
    /// properties carry none: the copy carries it as its `message_id`, so
    /// every attempt is the same message (docs/devices.md, "Guarantees").
    pub message_id: Option<&'a str>,
}

/// A copy to publish to the default exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub routing_key: String,
    pub properties: BasicProperties,
    pub outcome: Outcome,
}

/// Where the worker writes failures from, and the connection's frame size
/// (the copy's headers must fit one frame).
#[derive(Debug, Clone, Copy)]
pub struct Writer<'a> {
    /// `host/version`, for `iot-failed-by`.
    pub failed_by: &'a str,
    pub frame_max: usize,
}

/// The copy of `origin` that `failed` calls for under `topology`'s retry
/// policy, at `now`.
pub fn plan(origin: &Origin<'_>, failed: &Failed, topology: &Topology, writer: Writer<'_>, now: DateTime<Utc>) -> Plan {
    let retries = headers::retry_count(origin.properties.headers().as_ref());
    let disposition = topology.disposition(&failed.failure, retries);
    let (routing_key, kind, retry_count) = match &disposition {
        Disposition::RetryLater { retry, queue } => (queue.clone(), failed.failure.kind(), *retry),
        Disposition::Park { kind } => (topology.dlq(), *kind, retries),
    };
    let error = failed.failure.to_string();
    let record = FailureRecord {
        kind,
        message_type: failed.message_type.as_ref().map(MessageType::as_str),
        error: &error,
        retry_count,
        now_ms: now.timestamp_millis(),
        received_ms: origin.received.timestamp_millis(),
        exchange: origin.exchange,
        routing_key: origin.routing_key,
        failed_by: writer.failed_by,
    };
    let mut properties = headers::with_failure(origin.properties, &record);
    if let (None, Some(id)) = (properties.message_id(), origin.message_id) {
        properties = properties.with_message_id(id.into());
    }
    let properties = headers::fit_frame(properties, writer.frame_max);
    Plan {
        routing_key,
        properties,
        outcome: Outcome::Diverted(disposition),
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use lapin::types::FieldTable;

    use super::*;
    use crate::failure::{ErrorKind, Failure};
    use crate::headers::{ERROR_KIND, FIRST_FAILURE_AT, RETRY_COUNT, read_i64, read_string};

    const TOPOLOGY: &str =
        "queue_type = \"classic\"\ndelivery_limit = 3\n[retry]\ndelays = [\"50ms\", \"1s\"]\nmax_attempts = 3\n";
    const WRITER: Writer<'static> = Writer {
        failed_by: "host/1",
        frame_max: 131_072,
    };

    fn plan_for(failure: Failure, retries: i64) -> Plan {
        let topology = Topology::parse(TOPOLOGY, "iot").unwrap();
        let mut table = FieldTable::default();
        headers::put_long(&mut table, RETRY_COUNT, retries);
        headers::put_long(&mut table, FIRST_FAILURE_AT, 5);
        let properties = BasicProperties::default().with_headers(table);
        let origin = Origin {
            properties: &properties,
            exchange: "amq.topic",
            routing_key: "iot.d1",
            received: Utc.timestamp_millis_opt(7).unwrap(),
            message_id: None,
        };
        let failed = Failed {
            message_type: Some(MessageType::Handled("MEASUREMENT")),
            failure,
        };
        plan(
            &origin,
            &failed,
            &topology,
            WRITER,
            Utc.timestamp_millis_opt(9).unwrap(),
        )
    }

    fn header_long(plan: &Plan, key: &str) -> Option<i64> {
        read_i64(plan.properties.headers().as_ref(), key)
    }

    #[test]
    fn a_transient_failure_goes_to_the_next_retry_queue() {
        let plan = plan_for(Failure::Database(sqlx::Error::PoolTimedOut), 1);
        assert_eq!(plan.routing_key, "iot.retry.1s");
        let retry = Disposition::RetryLater {
            retry: 2,
            queue: "iot.retry.1s".into(),
        };
        assert_eq!(plan.outcome, Outcome::Diverted(retry));
        assert_eq!(header_long(&plan, RETRY_COUNT), Some(2));
        assert_eq!(
            header_long(&plan, FIRST_FAILURE_AT),
            Some(5),
            "kept from the first failure"
        );
        let kind = read_string(plan.properties.headers().as_ref(), ERROR_KIND);
        assert_eq!(kind.as_deref(), Some("transient"));
        assert_eq!(plan.properties.delivery_mode(), &Some(2));
    }

    #[test]
    fn exhausted_and_permanent_failures_are_parked_with_their_retry_count() {
        let plan = plan_for(Failure::Database(sqlx::Error::PoolTimedOut), 2);
        assert_eq!(plan.routing_key, "iot.dlq");
        let kind = ErrorKind::AttemptsExhausted;
        assert_eq!(plan.outcome, Outcome::Diverted(Disposition::Park { kind }));
        assert_eq!(header_long(&plan, RETRY_COUNT), Some(2), "not counted up when parked");

        let plan = plan_for(Failure::Panic("boom".into()), 0);
        assert_eq!(plan.routing_key, "iot.dlq");
        let kind = read_string(plan.properties.headers().as_ref(), ERROR_KIND);
        assert_eq!(kind.as_deref(), Some("panic"));
    }

    /// A raw device message's id, given at first receipt, travels on its
    /// copy as `message_id`; a producer's own `message_id` is never replaced.
    #[test]
    fn a_minted_id_travels_on_the_copy() {
        let topology = Topology::parse(TOPOLOGY, "iot").unwrap();
        let failed = Failed::untyped(Failure::Database(sqlx::Error::PoolTimedOut));
        let received = Utc.timestamp_millis_opt(7).unwrap();
        for (own, expected) in [(None, "raw-1"), (Some("producer-9"), "producer-9")] {
            let mut properties = BasicProperties::default();
            if let Some(id) = own {
                properties = properties.with_message_id(id.into());
            }
            let origin = Origin {
                properties: &properties,
                exchange: "amq.topic",
                routing_key: "d1.pressure",
                received,
                message_id: Some("raw-1"),
            };
            let plan = plan(&origin, &failed, &topology, WRITER, received);
            assert_eq!(
                plan.properties.message_id().as_ref().map(|id| id.as_str()),
                Some(expected)
            );
            assert_eq!(headers::first_received(&plan.properties), Some(received));
        }
    }
}
