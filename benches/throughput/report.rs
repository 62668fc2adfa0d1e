//! What the bench prints: a header naming the run, a line per round, and the
//! final markdown table for docs/benchmarks.md.

use crate::Bench;
use crate::child::{passed_through, shipped_settings};
use crate::support::median;

/// Every round's figures of one queue type.
#[derive(Default)]
pub struct Figures {
    pub raw_each: Vec<f64>,
    pub raw_multiple: Vec<f64>,
    pub clean: Vec<f64>,
    /// The clean mix drained by `BENCH_BASELINE_WORKER`, when set.
    pub baseline: Vec<f64>,
    /// The clean mix into the stored database (`BENCH_STORED`).
    pub stored: Vec<f64>,
    /// Raw device readings through a device route (`BENCH_RAW_DEVICES=on`).
    pub raw_devices: Vec<f64>,
    pub poison: Vec<f64>,
    pub transient: Vec<f64>,
    pub rss_clean: Vec<f64>,
    /// Every drain's peak: clean, raw device readings, poison and transient.
    pub rss_all: Vec<f64>,
    pub p50: Vec<f64>,
    pub p99: Vec<f64>,
}

type Row = (&'static str, fn(&Figures) -> String);

const ROWS: &[Row] = &[
    ("raw ceiling: bare consumer, ack each (msg/s)", |f| {
        rate(median(&f.raw_each))
    }),
    ("raw ceiling: bare consumer, ack `multiple` every 64 (msg/s)", |f| {
        rate(median(&f.raw_multiple))
    }),
    ("worker, clean mix (msg/s)", |f| rate(median(&f.clean))),
    ("worker ÷ raw ceiling, ack each", |f| {
        ratio(median(&f.clean), median(&f.raw_each))
    }),
    ("worker ÷ raw ceiling, ack `multiple`", |f| {
        ratio(median(&f.clean), median(&f.raw_multiple))
    }),
    ("baseline worker, clean mix (msg/s)", |f| rate(median(&f.baseline))),
    ("worker ÷ baseline worker", |f| {
        ratio(median(&f.clean), median(&f.baseline))
    }),
    ("worker, clean mix into the stored database (msg/s)", |f| {
        rate(median(&f.stored))
    }),
    ("stored ÷ empty database", |f| {
        ratio(median(&f.stored), median(&f.clean))
    }),
    ("worker, raw device readings (msg/s)", |f| rate(median(&f.raw_devices))),
    // The clean drain is the enveloped readings: `BENCH_RAW_DEVICES=on`
    // requires `BENCH_MIX=readings`.
    ("raw device ÷ enveloped readings", |f| {
        ratio(median(&f.raw_devices), median(&f.clean))
    }),
    ("worker, 5 % poison (msg/s)", |f| rate(median(&f.poison))),
    ("worker with poison ÷ clean worker", |f| {
        ratio(median(&f.poison), median(&f.clean))
    }),
    ("worker, 5 % transient once (msg/s)", |f| rate(median(&f.transient))),
    ("worker with transient ÷ clean worker", |f| {
        ratio(median(&f.transient), median(&f.clean))
    }),
    ("worker peak RSS, clean drain (MiB)", |f| mib(median(&f.rss_clean))),
    ("worker peak RSS, highest of all drains (MiB)", |f| {
        mib(f.rss_all.iter().copied().fold(f64::NAN, f64::max))
    }),
    ("100 msg/s: publish → commit p50 (ms)", |f| ms(median(&f.p50))),
    ("100 msg/s: publish → commit p99 (ms)", |f| ms(median(&f.p99))),
];

pub fn header(bench: &Bench) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{} messages per drain, {} round(s), medians; machine: {cores} cores",
        bench.n, bench.rounds
    );
    let base = match shipped_settings() {
        Some((_, file)) => format!("the shipped {file}"),
        None => "its defaults".to_owned(),
    };
    let settings = passed_through();
    if settings.is_empty() {
        println!("worker settings: {base}");
    } else {
        let shown: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("worker settings: {} (others: {base})", shown.join(" "));
    }
    if bench.raw_devices {
        println!(
            "raw device readings: on, {} per round from 200 devices on MQTT topic {}/+/pressure \
             (amq.topic, routing key {}.<device>.pressure), against the enveloped readings",
            bench.n, bench.prefix, bench.prefix
        );
    }
    if !cfg!(feature = "test-handlers") {
        println!(
            "note: built without --features test-handlers, so the worker has no TEST_FLAKY handler \
             and the transient-once figures are skipped"
        );
    }
}

/// One line of progress: this round's figures.
pub fn round(queue_type: &str, round: usize, f: &Figures) {
    let last = |v: &Vec<f64>| v.last().copied().unwrap_or(f64::NAN);
    println!(
        "{queue_type} round {}: raw each {} / multiple {} msg/s; worker clean {} (baseline {}, stored {}), \
         raw devices {} ({} of clean), poison {}, transient {} msg/s; peak RSS {} MiB; p50 {} ms, p99 {} ms",
        round + 1,
        rate(last(&f.raw_each)),
        rate(last(&f.raw_multiple)),
        rate(last(&f.clean)),
        rate(last(&f.baseline)),
        rate(last(&f.stored)),
        rate(last(&f.raw_devices)),
        ratio(last(&f.raw_devices), last(&f.clean)),
        rate(last(&f.poison)),
        rate(last(&f.transient)),
        mib(last(&f.rss_clean)),
        ms(last(&f.p50)),
        ms(last(&f.p99)),
    );
}

/// The markdown table: one column per queue type.
pub fn table(bench: &Bench, results: &[(String, Figures)]) {
    println!();
    let names: Vec<&str> = results.iter().map(|(t, _)| t.as_str()).collect();
    println!(
        "| {} messages, median of {} | {} |",
        bench.n,
        bench.rounds,
        names.join(" | ")
    );
    println!("|---|{}", "---|".repeat(names.len()));
    for (label, figure) in ROWS {
        let cells: Vec<String> = results.iter().map(|(_, f)| figure(f)).collect();
        println!("| {label} | {} |", cells.join(" | "));
    }
}

/// Messages per second with thousands separators, "n/a" when not measured.
fn rate(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".into();
    }
    let digits = format!("{value:.0}");
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ratio(a: f64, b: f64) -> String {
    let r = a / b;
    if r.is_finite() { format!("{r:.2}") } else { "n/a".into() }
}

fn mib(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.1}")
    } else {
        "n/a".into()
    }
}

fn ms(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.1}")
    } else {
        "n/a".into()
    }
}
