//! The messages of one drain and the rows they must leave behind.
//!
//! The base is the `publish sample` mix ([`samples::mix`]); every 50th
//! message (2 %) is replaced by a re-send of the message 500 places earlier
//! (a duplicate: same id, no effect). The poison variant replaces every
//! 20th message (5 %) by one of the invalid cases of `publish invalid`
//! (parked); the transient variant replaces them by `TEST_FLAKY` events that
//! fail transiently on their first run. In a batch that run rolls the batch
//! back and each message runs again alone, where the flaky one succeeds in
//! process; alone, it goes through the retry queue once. So `retried` is
//! at most one per flaky message.

use std::collections::HashSet;

use serde_json::{Value, json};
use worker_iot_core::cli::samples;
use worker_iot_core::envelope::Kind;

const DUPLICATE_EVERY: usize = 50;
const DUPLICATE_LAG: usize = 500;
/// Poison or transient messages sit where `i % SPECIAL_EVERY == 10`: even
/// positions, so never on a duplicate's (odd) position.
const SPECIAL_EVERY: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Clean,
    /// 5 % invalid messages, parked in the DLQ.
    Poison,
    /// 5 % `TEST_FLAKY` messages that fail transiently once.
    Transient,
}

/// What a drain of the mix must leave: rows, and settled deliveries by
/// outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    pub events: i64,
    pub commands: i64,
    pub measurements: i64,
    pub duplicates: u64,
    pub parked: u64,
    /// At most this many delayed retries (see the module's text).
    pub retried: u64,
}

impl Expected {
    /// Deliveries settled as processed (one per inbox row).
    pub fn processed(&self) -> u64 {
        (self.events + self.commands) as u64
    }
}

pub struct Mix {
    pub bodies: Vec<Vec<u8>>,
    pub expected: Expected,
}

/// The base mix (`BENCH_MIX`): `sample` (the `publish sample` mix, the
/// default), `fleet` (a fleet's traffic: 75 % readings over 200 devices,
/// 10 % `DEVICE_UP`/`DEVICE_DOWN`, 10 % `IBEACON_READ`, 5 % `SET_LED`) or
/// `readings` (`MEASUREMENT` only, over 200 devices).
fn base(n: usize, seed: u64) -> Vec<Vec<u8>> {
    let which = crate::support::env_or("BENCH_MIX", "sample");
    if which == "sample" {
        return samples::mix(n, seed);
    }
    let readings_only = match which.as_str() {
        "fleet" => false,
        "readings" => true,
        other => panic!("BENCH_MIX={other:?}: expected sample, fleet or readings"),
    };
    (0..n)
        .map(|i| {
            // A fixed spread, the same for every seed but the ids.
            let device = format!("fleet-{}", (i * 7919) % 200);
            let id = format!("{which}-{seed}-{i}");
            let roll = if readings_only { 0 } else { (i * 37) % 100 };
            let (kind, message_type, data) = match roll {
                0..75 => (
                    Kind::Event,
                    "MEASUREMENT",
                    json!({"device_id": device, "sensor": "temperature", "value": (i % 400) as f64 / 10.0, "unit": "C"}),
                ),
                75..80 => (Kind::Event, "DEVICE_UP", json!({"device_id": device, "ip": format!("10.0.{}.{}", i % 200, i % 250)})),
                80..85 => (Kind::Event, "DEVICE_DOWN", json!({"device_id": device})),
                85..95 => (Kind::Event, "IBEACON_READ", json!({"raw": "0201061aff4c00", "device_id": device})),
                _ => (Kind::Command, "SET_LED", json!({"device_id": device, "state": if i % 2 == 0 { "on" } else { "off" }})),
            };
            samples::envelope(kind, message_type, data, Some(&id))
        })
        .collect()
}

/// `n` messages of `variant`, deterministic for `seed`.
pub fn build(n: usize, seed: u64, variant: Variant) -> Mix {
    let mut bodies = base(n, seed);
    for i in (DUPLICATE_LAG..n).filter(|i| i % DUPLICATE_EVERY == DUPLICATE_EVERY / 2) {
        bodies[i] = bodies[i - DUPLICATE_LAG].clone();
    }
    let invalid = samples::invalid_cases();
    let mut expected = Expected::default();
    let mut seen = HashSet::new();
    for (i, body) in bodies.iter_mut().enumerate() {
        let special = variant != Variant::Clean && i % SPECIAL_EVERY == SPECIAL_EVERY / 2;
        match variant {
            Variant::Poison if special => {
                body.clone_from(&invalid[(i / SPECIAL_EVERY) % invalid.len()].1);
                expected.parked += 1;
            }
            Variant::Transient if special => {
                let id = format!("flaky-{seed}-{i}");
                *body = samples::envelope(Kind::Event, "TEST_FLAKY", json!({"fail_first": 1}), Some(&id));
                expected.events += 1;
                expected.measurements += 1;
                expected.retried += 1;
            }
            _ => count(body, &mut seen, &mut expected),
        }
    }
    Mix { bodies, expected }
}

/// Counts the rows a valid sample message leaves (none for a duplicate).
fn count(body: &[u8], seen: &mut HashSet<String>, expected: &mut Expected) {
    let value: Value = serde_json::from_slice(body).expect("sample bodies are JSON");
    let id = value["id"].as_str().expect("sample messages carry an id");
    if !seen.insert(id.to_owned()) {
        expected.duplicates += 1;
        return;
    }
    match value["kind"].as_str() {
        Some("command") => expected.commands += 1,
        _ => {
            expected.events += 1;
            if value["type"] == "MEASUREMENT" {
                expected.measurements += 1;
            }
        }
    }
}

/// "MEASUREMENT 22 %, SET_LED 11 %, …": what the clean mix holds, by type.
pub fn describe(mix: &Mix) -> String {
    let mut types = std::collections::BTreeMap::<String, usize>::new();
    for body in &mix.bodies {
        let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let name = value["type"].as_str().unwrap_or("invalid").to_owned();
        *types.entry(name).or_default() += 1;
    }
    let total = mix.bodies.len().max(1) as f64;
    let mut parts: Vec<(String, usize)> = types.into_iter().collect();
    parts.sort_by_key(|part| std::cmp::Reverse(part.1));
    let mut text: Vec<String> = parts
        .iter()
        .map(|(name, n)| format!("{name} {:.0} %", 100.0 * *n as f64 / total))
        .collect();
    text.push(format!(
        "of which duplicates {:.0} %",
        100.0 * mix.expected.duplicates as f64 / total
    ));
    text.join(", ")
}
