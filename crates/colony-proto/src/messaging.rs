//! Conversions between messaging proto messages and colony-core's messaging types. A message that
//! cannot become a valid core value is an error naming the field, never a panic.

use crate::pb;
use colony_core::{Message, TopicPolicy, TopicSummary, WhenFull, DEFAULT_NAMESPACE};

/// A namespace as a request names it: empty means the default.
pub fn namespace_or_default(namespace: &str) -> String {
    match namespace.is_empty() {
        true => DEFAULT_NAMESPACE.to_owned(),
        false => namespace.to_owned(),
    }
}

/// An empty string is "not set".
pub fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

pub fn when_full_from_proto(value: &str) -> Result<WhenFull, String> {
    match value {
        "" | "reject" => Ok(WhenFull::Reject),
        "drop-oldest" => Ok(WhenFull::DropOldest),
        other => Err(format!("when_full {other:?} is neither \"reject\" nor \"drop-oldest\"")),
    }
}

/// A policy from a request: unset (zero) fields take the defaults.
pub fn policy_from_proto(policy: Option<pb::TopicPolicy>) -> Result<TopicPolicy, String> {
    let defaults = TopicPolicy::default();
    let Some(p) = policy else { return Ok(defaults) };
    let or = |value: u64, default: u64| if value == 0 { default } else { value };
    Ok(TopicPolicy {
        messages_max: or(p.max_messages, defaults.messages_max),
        bytes_max: or(p.max_bytes, defaults.bytes_max),
        age_ms_max: or(p.max_age_ms, defaults.age_ms_max),
        when_full: when_full_from_proto(&p.when_full)?,
        deliveries_max: if p.max_deliveries == 0 {
            defaults.deliveries_max
        } else {
            p.max_deliveries
        },
        ack_deadline_ms: or(p.ack_deadline_ms, defaults.ack_deadline_ms),
        consumers_max: if p.max_consumers == 0 { defaults.consumers_max } else { p.max_consumers },
    })
}

impl From<&TopicPolicy> for pb::TopicPolicy {
    fn from(p: &TopicPolicy) -> Self {
        pb::TopicPolicy {
            max_messages: p.messages_max,
            max_bytes: p.bytes_max,
            max_age_ms: p.age_ms_max,
            when_full: p.when_full.as_str().to_owned(),
            max_deliveries: p.deliveries_max,
            ack_deadline_ms: p.ack_deadline_ms,
            max_consumers: p.consumers_max,
        }
    }
}

impl From<&Message> for pb::Message {
    fn from(m: &Message) -> Self {
        let dead = m.dead_letter.as_ref();
        pb::Message {
            seq: m.seq,
            priority: m.priority.into(),
            published_unix_ms: m.published_unix_ms,
            payload: m.payload.clone(),
            idempotency_key: m.idempotency_key.clone().unwrap_or_default(),
            reply_to: m.reply_to.clone().unwrap_or_default(),
            correlation_id: m.correlation_id.clone().unwrap_or_default(),
            dead_letter_topic: dead.map(|d| d.topic.clone()).unwrap_or_default(),
            dead_letter_consumer: dead.map(|d| d.consumer.clone()).unwrap_or_default(),
            dead_letter_seq: dead.map_or(0, |d| d.seq),
            dead_letter_deliveries: dead.map_or(0, |d| d.deliveries),
        }
    }
}

impl From<&TopicSummary> for pb::TopicInfo {
    fn from(t: &TopicSummary) -> Self {
        pb::TopicInfo {
            namespace: t.key.namespace.clone(),
            name: t.key.name.clone(),
            policy: Some(pb::TopicPolicy::from(&t.policy)),
            messages: t.messages,
            bytes: t.bytes,
            published: t.published,
            dropped: t.dropped,
            consumers: t
                .consumers
                .iter()
                .map(|c| pb::ConsumerInfo {
                    name: c.name.clone(),
                    ready: c.ready,
                    in_flight: c.in_flight,
                    delivered: c.delivered,
                    acked: c.acked,
                    dead_lettered: c.dead_lettered,
                })
                .collect(),
        }
    }
}
