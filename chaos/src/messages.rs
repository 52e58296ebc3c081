//! Messages in the chaos workload. One publisher publishes a message every `PUBLISH_EVERY` to
//! each server in turn, each with a unique payload that is also its idempotency key; one consumer
//! receives from each server in turn with a short ack deadline and acknowledges what it got. Both
//! run through every fault. After the faults, the consumer drains the topic on the healed
//! cluster. The checks:
//!
//! - every acknowledged publish was delivered (an acknowledged message is never lost);
//! - nothing was delivered that no publisher sent (no message made up);
//! - no message was delivered again after a server confirmed its ack (duplicates come only from
//!   redelivery of unacknowledged messages);
//! - a payload keeps one sequence number (a retried publish is stored once).

use crate::checks::CheckResult;
use colony_client::Channel;
use colony_proto::pb;
use colony_proto::pb::admin_client::AdminClient;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The namespace and topic the workload uses.
pub const NAMESPACE: &str = "chaos-messages";
const TOPIC: &str = "topics/chaos";
const CONSUMER: &str = "checkers";
const PUBLISH_EVERY: Duration = Duration::from_millis(50);
/// Short, so unacknowledged deliveries (an ack lost to a fault) come back within the run.
const ACK_DEADLINE_MS: u64 = 3_000;
const RECEIVE_WAIT_MS: u64 = 500;
/// How long the final drain may take on the healed cluster.
const DRAIN_MAX: Duration = Duration::from_secs(90);

/// What the publisher did.
#[derive(Clone, Debug, Default)]
pub struct Published {
    /// Acknowledged payloads, with the seq each was acknowledged at.
    pub acknowledged: BTreeMap<String, u64>,
    /// Every payload a publish was attempted for (acknowledged or not).
    pub attempted: BTreeSet<String>,
    pub unknown: u64,
}

/// What the consumer saw.
#[derive(Clone, Debug, Default)]
pub struct Consumed {
    /// Deliveries per payload.
    pub delivered: BTreeMap<String, u64>,
    /// Seqs whose ack a server confirmed.
    pub acked: BTreeSet<u64>,
    /// A delivery of a seq after its ack was confirmed.
    pub after_ack: Vec<(u64, u32)>,
    /// Seq to payload, as delivered.
    pub payload_of: BTreeMap<u64, String>,
}

fn publish_request(payload: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        namespace: NAMESPACE.to_owned(),
        topic: TOPIC.to_owned(),
        payload: payload.as_bytes().to_vec(),
        priority: 0,
        idempotency_key: payload.to_owned(),
        reply_to: String::new(),
        correlation_id: String::new(),
    }
}

/// Publishes until told to stop. A publish that got no answer is retried with the same key on
/// the next server until one answers, so its outcome becomes known when the cluster allows.
pub async fn publisher(
    servers: Vec<(String, Channel)>,
    mut stop: watch::Receiver<bool>,
) -> Published {
    let mut published = Published::default();
    let mut n = 0u64;
    let mut turn = 0usize;
    while !*stop.borrow() {
        let payload = format!("cm-{n}");
        published.attempted.insert(payload.clone());
        let mut acknowledged = false;
        for _ in 0..servers.len() * 2 {
            let (_, channel) = &servers[turn % servers.len()];
            turn += 1;
            let mut admin = AdminClient::new(channel.clone());
            let call = admin.publish(publish_request(&payload));
            if let Ok(Ok(answer)) = tokio::time::timeout(crate::workload::CALL_TIMEOUT, call).await
            {
                published.acknowledged.insert(payload.clone(), answer.into_inner().seq);
                acknowledged = true;
                break;
            }
            if *stop.borrow() {
                break;
            }
        }
        if !acknowledged {
            published.unknown += 1;
        }
        n += 1;
        tokio::select! {
            _ = tokio::time::sleep(PUBLISH_EVERY) => {}
            _ = stop.changed() => {}
        }
    }
    published
}

/// One receive and ack round against one server; false when the server did not answer.
async fn round(channel: &Channel, consumed: &mut Consumed) -> bool {
    let mut admin = AdminClient::new(channel.clone());
    let request = pb::ReceiveRequest {
        namespace: NAMESPACE.to_owned(),
        topic: TOPIC.to_owned(),
        consumer: CONSUMER.to_owned(),
        max: 100,
        ack_deadline_ms: ACK_DEADLINE_MS,
        wait_ms: RECEIVE_WAIT_MS,
    };
    let Ok(Ok(answer)) =
        tokio::time::timeout(crate::workload::CALL_TIMEOUT, admin.receive(request)).await
    else {
        return false;
    };
    let mut refs = Vec::new();
    for d in answer.into_inner().deliveries {
        let Some(m) = d.message else { continue };
        if consumed.acked.contains(&m.seq) {
            consumed.after_ack.push((m.seq, d.delivery));
        }
        let payload = String::from_utf8_lossy(&m.payload).into_owned();
        *consumed.delivered.entry(payload.clone()).or_default() += 1;
        consumed.payload_of.insert(m.seq, payload);
        refs.push(pb::DeliveryRef { seq: m.seq, delivery: d.delivery });
    }
    if refs.is_empty() {
        return true;
    }
    let request = pb::AckRequest {
        namespace: NAMESPACE.to_owned(),
        topic: TOPIC.to_owned(),
        consumer: CONSUMER.to_owned(),
        deliveries: refs,
    };
    // An ack whose answer is lost may or may not have landed: only confirmed ones count.
    if let Ok(Ok(answer)) =
        tokio::time::timeout(crate::workload::CALL_TIMEOUT, admin.ack(request)).await
    {
        consumed.acked.extend(answer.into_inner().acked);
    }
    true
}

/// Receives and acknowledges, each server in turn, until told to stop.
pub async fn consumer(servers: Vec<(String, Channel)>, stop: watch::Receiver<bool>) -> Consumed {
    let mut consumed = Consumed::default();
    let mut turn = 0usize;
    while !*stop.borrow() {
        let (_, channel) = &servers[turn % servers.len()];
        turn += 1;
        if !round(channel, &mut consumed).await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    consumed
}

/// The message checks' findings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MessageReport {
    pub acknowledged: u64,
    pub unknown: u64,
    pub delivered: u64,
    /// Payloads delivered more than once (allowed: redelivery of an unconfirmed ack).
    pub redelivered: u64,
    pub lost: CheckResult,
    pub made_up: CheckResult,
    pub after_ack: CheckResult,
    pub stored_twice: CheckResult,
}

/// Drains the topic on the healed cluster until every acknowledged message was delivered (or
/// `DRAIN_MAX` passes), then checks.
pub async fn check(
    servers: &[(String, Channel)],
    published: &Published,
    mut consumed: Consumed,
) -> MessageReport {
    let started = Instant::now();
    let mut turn = 0usize;
    let missing = |consumed: &Consumed| {
        published.acknowledged.keys().filter(|p| !consumed.delivered.contains_key(*p)).count()
    };
    while missing(&consumed) > 0 && started.elapsed() < DRAIN_MAX {
        let (_, channel) = &servers[turn % servers.len()];
        turn += 1;
        if !round(channel, &mut consumed).await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut report = MessageReport {
        acknowledged: published.acknowledged.len() as u64,
        unknown: published.unknown,
        delivered: consumed.delivered.len() as u64,
        redelivered: consumed.delivered.values().filter(|n| **n > 1).count() as u64,
        ..Default::default()
    };
    for (payload, seq) in &published.acknowledged {
        if !consumed.delivered.contains_key(payload) {
            report.lost.add(|| {
                format!("message {payload:?} (seq {seq}) was acknowledged but never delivered")
            });
        }
    }
    for payload in consumed.delivered.keys() {
        if !published.attempted.contains(payload) {
            report.made_up.add(|| format!("{payload:?} was delivered but never published"));
        }
    }
    for (seq, delivery) in &consumed.after_ack {
        report.after_ack.add(|| {
            format!(
                "seq {seq} was delivered again (delivery {delivery}) after its ack was confirmed"
            )
        });
    }
    let mut seqs_of: BTreeMap<&String, BTreeSet<u64>> = BTreeMap::new();
    for (seq, payload) in &consumed.payload_of {
        seqs_of.entry(payload).or_default().insert(*seq);
    }
    for (payload, seqs) in seqs_of.iter().filter(|(_, s)| s.len() > 1) {
        report.stored_twice.add(|| format!("{payload:?} was stored as seqs {seqs:?}"));
    }
    report
}
