//! Arbitrary AMQP header tables into the retry-header readers and the retry
//! policy: the decision stays inside its invariants (park after the maximum,
//! retry counts grow by one, delays never decrease), and the failure headers
//! the worker writes read back as written.
#![no_main]

use arbitrary::Arbitrary;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use libfuzzer_sys::fuzz_target;
use worker_iot_core::headers::{self, FailureRecord};
use worker_iot_core::{ErrorKind, Topology, next_retry};

#[derive(Arbitrary, Debug)]
enum Value {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F64(f64),
    Text(String),
    Bytes(Vec<u8>),
    Timestamp(u64),
    Void,
}

#[derive(Arbitrary, Debug)]
struct Input {
    headers: Vec<(u8, Value)>,
    transient: bool,
    kind: u8,
    max_attempts: u8,
    delays_ms: Vec<u32>,
    error: String,
    now_ms: i64,
    received_ms: i64,
}

const KEYS: [&str; 6] = [
    headers::RETRY_COUNT,
    headers::FIRST_FAILURE_AT,
    headers::LAST_FAILURE_AT,
    headers::ERROR_KIND,
    headers::ORIGINAL_EXCHANGE,
    "x-producer",
];

fn amqp(value: Value) -> AMQPValue {
    match value {
        Value::Bool(v) => AMQPValue::Boolean(v),
        Value::I8(v) => AMQPValue::ShortShortInt(v),
        Value::U8(v) => AMQPValue::ShortShortUInt(v),
        Value::I16(v) => AMQPValue::ShortInt(v),
        Value::U16(v) => AMQPValue::ShortUInt(v),
        Value::I32(v) => AMQPValue::LongInt(v),
        Value::U32(v) => AMQPValue::LongUInt(v),
        Value::I64(v) => AMQPValue::LongLongInt(v),
        Value::F64(v) => AMQPValue::Double(v),
        Value::Text(v) => AMQPValue::LongString(LongString::from(v)),
        Value::Bytes(v) => AMQPValue::ByteArray(v.into()),
        Value::Timestamp(v) => AMQPValue::Timestamp(v),
        Value::Void => AMQPValue::Void,
    }
}

fuzz_target!(|input: Input| {
    let mut table = FieldTable::default();
    for (key, value) in input.headers {
        table.insert(KEYS[usize::from(key) % KEYS.len()].into(), amqp(value));
    }
    let retries = headers::retry_count(Some(&table));
    let _ = headers::read_string(Some(&table), headers::ERROR_KIND);

    let kind = ErrorKind::ALL[usize::from(input.kind) % ErrorKind::ALL.len()];
    let max_attempts = u32::from(input.max_attempts % 100) + 1;
    match next_retry(input.transient, kind, retries, max_attempts) {
        Ok(retry) => {
            assert!(input.transient, "permanent failures never retry");
            assert_eq!(retry, retries + 1);
            assert!(retry < max_attempts, "retried past max_attempts");
        }
        Err(parked) if input.transient => {
            assert_eq!(parked, ErrorKind::AttemptsExhausted);
            assert!(retries.saturating_add(1) >= max_attempts);
        }
        Err(parked) => assert_eq!(parked, kind),
    }

    let mut delays: Vec<u32> = input.delays_ms.iter().take(8).map(|d| d % 86_400_000 + 1).collect();
    if !delays.is_empty() {
        delays.sort_unstable();
        let list: Vec<String> = delays.iter().map(|d| format!("\"{d}ms\"")).collect();
        let text = format!(
            "queue_type = \"classic\"\ndelivery_limit = 3\n[retry]\ndelays = [{}]\nmax_attempts = {max_attempts}\n",
            list.join(", ")
        );
        let topology = Topology::parse(&text, "q").expect("sorted delays are a valid topology");
        let retry = retries.min(1000).max(1);
        assert!(topology.retry.delay(retry + 1).delay >= topology.retry.delay(retry).delay);
    }

    let record = FailureRecord {
        kind,
        message_type: Some("MEASUREMENT"),
        error: &input.error,
        retry_count: retries,
        now_ms: input.now_ms,
        received_ms: input.received_ms,
        exchange: "amq.topic",
        routing_key: "iot.x",
        failed_by: "fuzz/0",
    };
    let copy = headers::with_failure(&BasicProperties::default().with_headers(table), &record);
    let h = copy.headers().as_ref();
    assert_eq!(copy.delivery_mode(), &Some(2), "every copy is persistent");
    assert_eq!(headers::retry_count(h), retries);
    assert_eq!(headers::read_i64(h, headers::LAST_FAILURE_AT), Some(input.now_ms));
    let error = headers::read_string(h, headers::ERROR).expect("iot-error written");
    assert!(error.len() <= headers::MAX_ERROR_BYTES && input.error.starts_with(&error));
});
