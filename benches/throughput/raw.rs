//! The raw ceiling: a bare lapin consumer on the same queue, draining the
//! same messages with no decoding and no database, timed from its first
//! delivery to its last ack.

use std::time::Instant;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

use crate::support::{fill, passive_len};
use crate::{Bench, Target};

/// How the bare consumer acks.
#[derive(Clone, Copy, Debug)]
pub enum Ack {
    /// One `basic.ack` per delivery.
    Each,
    /// One `basic.ack` with `multiple` every this many deliveries, and one
    /// for the last.
    Multiple(usize),
}

/// Messages per second of the bare consumer draining `bodies`.
pub async fn rate(bench: &Bench, target: &Target, bodies: &[Vec<u8>], ack: Ack) -> f64 {
    let queue = target.topology.queue();
    crate::drain::reset(bench, target).await;
    fill(&bench.publisher, queue, bodies).await;
    let channel = bench.connection.create_channel().await.unwrap();
    channel
        .basic_qos(bench.raw_prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let n = bodies.len();
    let mut started = None;
    for i in 1..=n {
        let delivery = consumer.next().await.expect("a delivery").expect("no error");
        started.get_or_insert_with(Instant::now);
        let options = match ack {
            Ack::Each => Some(BasicAckOptions::default()),
            Ack::Multiple(every) if i % every == 0 || i == n => Some(BasicAckOptions { multiple: true }),
            Ack::Multiple(_) => None,
        };
        if let Some(options) = options {
            delivery.acker.ack(options).await.unwrap();
        }
    }
    let seconds = started.map_or(f64::NAN, |s| s.elapsed().as_secs_f64());
    // Closing waits for the broker, so every ack has been taken.
    channel.close(200, "".into()).await.ok();
    let left = passive_len(&bench.publisher, queue).await;
    assert_eq!(left, 0, "the bare consumer left {left} messages in {queue}");
    n as f64 / seconds
}
