//! Durable messages: topics and mailboxes kept in the replicated state.
//!
//! A topic (`topics/papers`) or a mailbox (`agents/researcher`, `replies/<id>`) is an ordered log
//! of messages in one namespace, bounded by its policy (count, bytes, age). A publish is one
//! command: acknowledged once it is committed on a majority. Consumers are named: every distinct
//! name sees every message (broadcast); callers that share a name share its messages (competing
//! consumers). A receive is a command too, so who holds which delivery survives a leader change:
//! each delivery has an ack deadline stamped from the replicated clock, a message not acknowledged
//! by then is delivered again, and one delivered `deliveries_max` times without an ack goes to the
//! dead-letter topic (`dead-letter/<topic>`). Within a consumer, higher priority goes first, then
//! publish order; redeliveries go before new messages.
//!
//! Everything here is deterministic: time is the proposal's, nothing is random.

use imbl::{OrdMap, OrdSet};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where dead letters of `topic` go: this prefix, then the topic's name.
pub const DEAD_LETTER_PREFIX: &str = "dead-letter/";
/// The highest message priority (0 is the lowest and the default).
pub const PRIORITY_MAX: u8 = 9;

/// What a topic does when a publish would pass its count or byte bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WhenFull {
    /// Refuse the publish with a clear error (nothing is lost silently).
    Reject,
    /// Drop the oldest messages to make room (counted in the topic's `dropped`).
    DropOldest,
}

impl WhenFull {
    pub fn as_str(self) -> &'static str {
        match self {
            WhenFull::Reject => "reject",
            WhenFull::DropOldest => "drop-oldest",
        }
    }
}

/// A topic's bounds and delivery rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicPolicy {
    pub messages_max: u64,
    pub bytes_max: u64,
    /// Messages older than this are removed, delivered or not.
    pub age_ms_max: u64,
    pub when_full: WhenFull,
    /// Deliveries of one message to one consumer before it becomes a dead letter.
    pub deliveries_max: u32,
    /// How long a receiver has to acknowledge, when the receive does not say.
    pub ack_deadline_ms: u64,
    /// The most consumer names the topic keeps.
    pub consumers_max: u32,
}

impl Default for TopicPolicy {
    fn default() -> Self {
        TopicPolicy {
            messages_max: 100_000,
            bytes_max: 64 << 20,
            age_ms_max: 24 * 3_600_000,
            when_full: WhenFull::Reject,
            deliveries_max: 5,
            ack_deadline_ms: 30_000,
            consumers_max: 32,
        }
    }
}

/// Bounds on messaging as a whole and on what one command may carry. Named, so an error says
/// which one was passed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageLimits {
    pub payload_bytes_max: usize,
    pub topic_name_bytes_max: usize,
    pub consumer_name_bytes_max: usize,
    /// An idempotency key or a correlation id.
    pub key_bytes_max: usize,
    pub topics_max: usize,
    /// Payload bytes kept in every topic together: the bound on what messages cost each replica
    /// in memory, whatever the topics' own bounds add up to.
    pub total_bytes_max: u64,
    /// Messages one receive hands out.
    pub receive_max: u32,
    /// Payload bytes one receive hands out (one message always fits).
    pub receive_bytes_max: usize,
    /// Deliveries one ack command names.
    pub acks_max: usize,
    pub ack_deadline_ms_min: u64,
    pub ack_deadline_ms_max: u64,
    /// Bounds a policy given by a user may not pass.
    pub policy_messages_max: u64,
    pub policy_bytes_max: u64,
    pub policy_deliveries_max: u32,
    pub policy_consumers_max: u32,
}

impl Default for MessageLimits {
    fn default() -> Self {
        MessageLimits {
            payload_bytes_max: 64 << 10,
            topic_name_bytes_max: 200,
            consumer_name_bytes_max: 64,
            key_bytes_max: 128,
            topics_max: 10_000,
            total_bytes_max: 1 << 30,
            receive_max: 1_000,
            receive_bytes_max: 2 << 20,
            acks_max: 1_000,
            ack_deadline_ms_min: 100,
            ack_deadline_ms_max: 12 * 3_600_000,
            policy_messages_max: 10_000_000,
            policy_bytes_max: 1 << 30,
            policy_deliveries_max: 1_000,
            policy_consumers_max: 256,
        }
    }
}

/// A topic's identity: its namespace and its name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TopicKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for TopicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where a dead letter came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub topic: String,
    pub consumer: String,
    pub seq: u64,
    pub deliveries: u32,
}

/// One message as the topic keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Its place in the topic: numbered from 1, never reused.
    pub seq: u64,
    pub priority: u8,
    pub published_unix_ms: u64,
    pub payload: Vec<u8>,
    /// A publish with a key already kept in the topic is not stored again.
    pub idempotency_key: Option<String>,
    /// For a request: the mailbox the answer goes to, and the id it carries back.
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub dead_letter: Option<DeadLetter>,
}

/// What a publish asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishSpec {
    pub topic: TopicKey,
    pub priority: u8,
    pub payload: Vec<u8>,
    pub idempotency_key: Option<String>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
}

/// What a receive asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveSpec {
    pub topic: TopicKey,
    pub consumer: String,
    pub max: u32,
    /// `None`: the topic's.
    pub ack_deadline_ms: Option<u64>,
}

/// One delivery to acknowledge: a message and which of its deliveries is meant, so an ack for a
/// delivery that expired and went to someone else is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeliveryRef {
    pub seq: u64,
    pub delivery: u32,
}

/// One message handed to a receiver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    pub message: Message,
    /// 1 on the first delivery to this consumer.
    pub delivery: u32,
    pub ack_deadline_unix_ms: u64,
}

/// A delivery waiting for its ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub delivery: u32,
    pub deadline_unix_ms: u64,
}

/// One consumer name's view of a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consumer {
    /// Messages not yet delivered, in delivery order: `(PRIORITY_MAX - priority, seq)`.
    pub ready: OrdSet<(u8, u64)>,
    /// Delivered and not acknowledged.
    pub in_flight: OrdMap<u64, InFlight>,
    /// Exactly `in_flight`, by deadline.
    pub deadlines: OrdSet<(u64, u64)>,
    pub delivered: u64,
    pub acked: u64,
    pub dead_lettered: u64,
    pub created_unix_ms: u64,
}

/// A topic or mailbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topic {
    pub policy: TopicPolicy,
    pub created_unix_ms: u64,
    /// A temporary mailbox (a request's reply) is removed at this time.
    pub delete_after_unix_ms: Option<u64>,
    pub messages: OrdMap<u64, Message>,
    /// Exactly `messages`, in delivery order (what a new consumer starts with).
    pub order: OrdSet<(u8, u64)>,
    pub next_seq: u64,
    /// Payload bytes of `messages`.
    pub bytes: u64,
    /// Idempotency keys of kept messages.
    pub keys: OrdMap<String, u64>,
    pub consumers: OrdMap<String, Consumer>,
    pub published: u64,
    /// Messages removed by the count, byte or age bound.
    pub dropped: u64,
}

fn order_key(message: &Message) -> (u8, u64) {
    (PRIORITY_MAX - message.priority.min(PRIORITY_MAX), message.seq)
}

/// Why a messaging command was refused; it changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MessageError {
    #[error("invalid {what}: {why}")]
    Invalid { what: String, why: String },
    #[error("{what} is {len} bytes; the limit is {max}")]
    TooLong { what: String, len: usize, max: usize },
    #[error("topic {topic} is full ({messages} messages, {bytes} bytes; its policy rejects more): consume or raise its bounds")]
    TopicFull { topic: String, messages: u64, bytes: u64 },
    #[error("the cluster keeps {bytes} bytes of messages, and {adding} more would pass its limit of {max}: consume, delete topics or lower their bounds")]
    StoreFull { bytes: u64, adding: u64, max: u64 },
    #[error("there are {max} topics, the limit: delete one first")]
    TooManyTopics { max: usize },
    #[error("topic {topic} has {max} consumer names, its limit")]
    TooManyConsumers { topic: String, max: u32 },
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    #[error("idempotency key {key:?} was used for message {seq} with a different payload")]
    KeyConflict { key: String, seq: u64 },
}

/// The result of a publish.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub seq: u64,
    /// The idempotency key matched a kept message: nothing new was stored.
    pub existing: bool,
    /// Oldest messages dropped to make room.
    pub dropped: u64,
}

/// The result of a receive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Received {
    pub messages: Vec<Delivered>,
    /// Messages that passed `deliveries_max` during this receive and went to the dead-letter topic.
    pub dead_lettered: Vec<u64>,
}

/// The result of an ack command: each delivery acknowledged or refused with why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acked {
    pub acked: Vec<u64>,
    pub refused: Vec<(u64, String)>,
}

/// Totals over every topic (`Messaging::totals`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageTotals {
    pub topics: u64,
    pub messages: u64,
    pub bytes: u64,
    pub in_flight: u64,
}

/// A topic in brief, for lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSummary {
    pub key: TopicKey,
    pub policy: TopicPolicy,
    pub messages: u64,
    pub bytes: u64,
    pub published: u64,
    pub dropped: u64,
    /// Per consumer name: ready, in flight, delivered, acked, dead-lettered.
    pub consumers: Vec<ConsumerSummary>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerSummary {
    pub name: String,
    pub ready: u64,
    pub in_flight: u64,
    pub delivered: u64,
    pub acked: u64,
    pub dead_lettered: u64,
}

/// Every topic and mailbox.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Messaging {
    pub limits: MessageLimits,
    topics: OrdMap<TopicKey, Topic>,
    /// Payload bytes of every topic together.
    bytes: u64,
}

/// A name of a topic, mailbox or consumer: path-like ASCII, so it is safe in a log line and a URL.
fn check_name(what: &'static str, name: &str, max: usize) -> Result<(), MessageError> {
    if name.is_empty() {
        return Err(MessageError::Invalid { what: what.to_owned(), why: "it is empty".to_owned() });
    }
    if name.len() > max {
        return Err(MessageError::TooLong { what: what.to_owned(), len: name.len(), max });
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_./:".contains(*c))) {
        return Err(MessageError::Invalid {
            what: what.to_owned(),
            why: format!("{name:?} has {c:?}; use letters, digits and - _ . / :"),
        });
    }
    if name.starts_with('/') || name.ends_with('/') || name.contains("//") {
        return Err(MessageError::Invalid {
            what: what.to_owned(),
            why: format!("{name:?} has an empty path segment"),
        });
    }
    Ok(())
}

fn check_key(what: &'static str, key: &Option<String>, max: usize) -> Result<(), MessageError> {
    match key {
        Some(key) if key.is_empty() => {
            Err(MessageError::Invalid { what: what.to_owned(), why: "it is empty".to_owned() })
        }
        Some(key) if key.len() > max => {
            Err(MessageError::TooLong { what: what.to_owned(), len: key.len(), max })
        }
        _ => Ok(()),
    }
}

impl MessageLimits {
    /// Checks a publish against the limits (not against the topic's state).
    pub fn check_publish(&self, spec: &PublishSpec) -> Result<(), MessageError> {
        check_name("namespace", &spec.topic.namespace, self.topic_name_bytes_max)?;
        check_name("topic", &spec.topic.name, self.topic_name_bytes_max)?;
        if spec.payload.len() > self.payload_bytes_max {
            return Err(MessageError::TooLong {
                what: "message".to_owned(),
                len: spec.payload.len(),
                max: self.payload_bytes_max,
            });
        }
        if spec.priority > PRIORITY_MAX {
            return Err(MessageError::Invalid {
                what: "priority".to_owned(),
                why: format!("{} is above {PRIORITY_MAX}", spec.priority),
            });
        }
        check_key("idempotency key", &spec.idempotency_key, self.key_bytes_max)?;
        check_key("correlation id", &spec.correlation_id, self.key_bytes_max)?;
        if let Some(reply_to) = &spec.reply_to {
            check_name("reply mailbox", reply_to, self.topic_name_bytes_max)?;
        }
        Ok(())
    }

    pub fn check_receive(&self, spec: &ReceiveSpec) -> Result<(), MessageError> {
        check_name("namespace", &spec.topic.namespace, self.topic_name_bytes_max)?;
        check_name("topic", &spec.topic.name, self.topic_name_bytes_max)?;
        check_name("consumer", &spec.consumer, self.consumer_name_bytes_max)?;
        if spec.max == 0 || spec.max > self.receive_max {
            return Err(MessageError::Invalid {
                what: "receive count".to_owned(),
                why: format!("{} is outside 1..={}", spec.max, self.receive_max),
            });
        }
        if let Some(deadline) = spec.ack_deadline_ms {
            self.check_ack_deadline(deadline)?;
        }
        Ok(())
    }

    fn check_ack_deadline(&self, ms: u64) -> Result<(), MessageError> {
        if ms < self.ack_deadline_ms_min || ms > self.ack_deadline_ms_max {
            return Err(MessageError::Invalid {
                what: "ack deadline".to_owned(),
                why: format!(
                    "{ms} ms is outside {}..={} ms",
                    self.ack_deadline_ms_min, self.ack_deadline_ms_max
                ),
            });
        }
        Ok(())
    }

    pub fn check_policy(&self, policy: &TopicPolicy) -> Result<(), MessageError> {
        let bound = |what: &'static str, value: u64, max: u64| {
            if value == 0 || value > max {
                return Err(MessageError::Invalid {
                    what: what.to_owned(),
                    why: format!("{value} is outside 1..={max}"),
                });
            }
            Ok(())
        };
        bound("max messages", policy.messages_max, self.policy_messages_max)?;
        bound("max bytes", policy.bytes_max, self.policy_bytes_max)?;
        bound("max age (ms)", policy.age_ms_max, u64::MAX / 4)?;
        bound("max deliveries", policy.deliveries_max.into(), self.policy_deliveries_max.into())?;
        bound("max consumers", policy.consumers_max.into(), self.policy_consumers_max.into())?;
        if policy.bytes_max < self.payload_bytes_max as u64 {
            return Err(MessageError::Invalid {
                what: "max bytes".to_owned(),
                why: format!(
                    "{} is below one message of the largest size ({} bytes)",
                    policy.bytes_max, self.payload_bytes_max
                ),
            });
        }
        self.check_ack_deadline(policy.ack_deadline_ms)
    }

    fn check_topic(&self, topic: &TopicKey) -> Result<(), MessageError> {
        check_name("namespace", &topic.namespace, self.topic_name_bytes_max)?;
        check_name("topic", &topic.name, self.topic_name_bytes_max)
    }
}

impl Topic {
    fn new(policy: TopicPolicy, now: u64, delete_after_unix_ms: Option<u64>) -> Topic {
        Topic {
            policy,
            created_unix_ms: now,
            delete_after_unix_ms,
            messages: OrdMap::new(),
            order: OrdSet::new(),
            next_seq: 1,
            bytes: 0,
            keys: OrdMap::new(),
            consumers: OrdMap::new(),
            published: 0,
            dropped: 0,
        }
    }

    fn is_full(&self, adding_bytes: u64) -> bool {
        self.messages.len() as u64 >= self.policy.messages_max
            || self.bytes + adding_bytes > self.policy.bytes_max
    }

    /// Removes one message from the topic and from every consumer's view of it.
    fn remove(&mut self, seq: u64) {
        let Some(message) = self.messages.remove(&seq) else { return };
        let key = order_key(&message);
        self.order.remove(&key);
        self.bytes -= message.payload.len() as u64;
        if let Some(k) = &message.idempotency_key {
            if self.keys.get(k) == Some(&seq) {
                self.keys.remove(k);
            }
        }
        let names: Vec<String> = self.consumers.keys().cloned().collect();
        for name in names {
            let Some(consumer) = self.consumers.get_mut(&name) else { continue };
            consumer.ready.remove(&key);
            if let Some(flight) = consumer.in_flight.remove(&seq) {
                consumer.deadlines.remove(&(flight.deadline_unix_ms, seq));
            }
        }
    }

    /// Removes messages older than the policy's age; returns how many.
    fn expire(&mut self, now: u64) -> u64 {
        let cutoff = now.saturating_sub(self.policy.age_ms_max);
        let old: Vec<u64> = self
            .messages
            .values()
            .take_while(|m| m.published_unix_ms <= cutoff && now >= self.policy.age_ms_max)
            .map(|m| m.seq)
            .collect();
        for &seq in &old {
            self.remove(seq);
        }
        self.dropped += old.len() as u64;
        old.len() as u64
    }

    fn oldest_expires_unix_ms(&self) -> Option<u64> {
        let oldest = self.messages.values().next()?;
        Some(oldest.published_unix_ms.saturating_add(self.policy.age_ms_max))
    }

    /// Stores a message; the caller checked room.
    fn append(&mut self, message: Message) {
        let key = order_key(&message);
        let names: Vec<String> = self.consumers.keys().cloned().collect();
        for name in names {
            if let Some(consumer) = self.consumers.get_mut(&name) {
                consumer.ready.insert(key);
            }
        }
        self.order.insert(key);
        self.bytes += message.payload.len() as u64;
        if let Some(k) = &message.idempotency_key {
            self.keys.insert(k.clone(), message.seq);
        }
        self.next_seq = message.seq + 1;
        self.published += 1;
        self.messages.insert(message.seq, message);
    }

    fn summary(&self, key: &TopicKey) -> TopicSummary {
        TopicSummary {
            key: key.clone(),
            policy: self.policy.clone(),
            messages: self.messages.len() as u64,
            bytes: self.bytes,
            published: self.published,
            dropped: self.dropped,
            consumers: self
                .consumers
                .iter()
                .map(|(name, c)| ConsumerSummary {
                    name: name.clone(),
                    ready: c.ready.len() as u64,
                    in_flight: c.in_flight.len() as u64,
                    delivered: c.delivered,
                    acked: c.acked,
                    dead_lettered: c.dead_lettered,
                })
                .collect(),
        }
    }
}

impl Messaging {
    pub fn topic(&self, key: &TopicKey) -> Option<&Topic> {
        self.topics.get(key)
    }

    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// Totals over every topic, for metrics: messages kept, their payload bytes, and deliveries
    /// awaiting an ack. O(topics and consumers).
    pub fn totals(&self) -> MessageTotals {
        let mut totals = MessageTotals { topics: self.topics.len() as u64, ..Default::default() };
        for topic in self.topics.values() {
            totals.messages += topic.messages.len() as u64;
            totals.bytes += topic.bytes;
            totals.in_flight +=
                topic.consumers.values().map(|c| c.in_flight.len() as u64).sum::<u64>();
        }
        totals
    }

    /// Topics after `after` in key order that `keep` accepts, at most `limit`.
    pub fn list(
        &self,
        after: Option<&TopicKey>,
        limit: usize,
        keep: impl Fn(&TopicKey) -> bool,
    ) -> Vec<TopicSummary> {
        let range = match after {
            Some(after) => self
                .topics
                .range((std::ops::Bound::Excluded(after.clone()), std::ops::Bound::Unbounded)),
            None => self.topics.range::<_, TopicKey>(..),
        };
        range.filter(|(k, _)| keep(k)).take(limit).map(|(k, t)| t.summary(k)).collect()
    }

    /// Whether `consumer` of `topic` has something to receive at `now`: a message not yet
    /// delivered to it, or a delivery past its deadline. A receiver that would get nothing waits
    /// without writing to the log.
    pub fn receivable(&self, topic: &TopicKey, consumer: &str, now: u64) -> bool {
        let Some(t) = self.topics.get(topic) else { return false };
        match t.consumers.get(consumer) {
            Some(c) => {
                !c.ready.is_empty() || c.deadlines.iter().next().is_some_and(|(d, _)| *d <= now)
            }
            None => !t.messages.is_empty(),
        }
    }

    /// The earliest ack deadline of `consumer` of `topic`: when a waiting receiver should look
    /// again even if nothing is published.
    pub fn next_deadline(&self, topic: &TopicKey, consumer: &str) -> Option<u64> {
        let c = self.topics.get(topic)?.consumers.get(consumer)?;
        c.deadlines.iter().next().map(|(d, _)| *d)
    }

    /// Messages a reply mailbox holds with `correlation_id`, for a waiting requester.
    pub fn find_reply(&self, topic: &TopicKey, correlation_id: &str) -> Option<&Message> {
        let t = self.topics.get(topic)?;
        t.messages.values().find(|m| m.correlation_id.as_deref() == Some(correlation_id))
    }

    /// Creates a topic with `policy`, or changes an existing topic's policy (its messages beyond
    /// the new bounds are dropped, oldest first).
    pub fn create_topic(
        &mut self,
        key: &TopicKey,
        policy: &TopicPolicy,
        delete_after_unix_ms: Option<u64>,
        now: u64,
    ) -> Result<bool, MessageError> {
        self.limits.check_topic(key)?;
        self.limits.check_policy(policy)?;
        if let Some(topic) = self.topics.get_mut(key) {
            let before = topic.bytes;
            topic.policy = policy.clone();
            topic.delete_after_unix_ms = delete_after_unix_ms;
            while topic.messages.len() as u64 > policy.messages_max
                || topic.bytes > policy.bytes_max
            {
                let Some(&seq) = topic.messages.keys().next() else { break };
                topic.remove(seq);
                topic.dropped += 1;
            }
            topic.expire(now);
            self.bytes -= before - topic.bytes;
            return Ok(false);
        }
        if self.topics.len() >= self.limits.topics_max {
            return Err(MessageError::TooManyTopics { max: self.limits.topics_max });
        }
        self.topics.insert(key.clone(), Topic::new(policy.clone(), now, delete_after_unix_ms));
        Ok(true)
    }

    pub fn delete_topic(&mut self, key: &TopicKey) -> Result<Topic, MessageError> {
        let topic =
            self.topics.remove(key).ok_or_else(|| MessageError::UnknownTopic(key.to_string()))?;
        self.bytes -= topic.bytes;
        Ok(topic)
    }

    fn topic_mut(&mut self, key: &TopicKey, now: u64) -> Result<&mut Topic, MessageError> {
        if !self.topics.contains_key(key) {
            if self.topics.len() >= self.limits.topics_max {
                return Err(MessageError::TooManyTopics { max: self.limits.topics_max });
            }
            self.topics.insert(key.clone(), Topic::new(TopicPolicy::default(), now, None));
        }
        let topic =
            self.topics.get_mut(key).ok_or_else(|| MessageError::UnknownTopic(key.to_string()))?;
        let before = topic.bytes;
        topic.expire(now);
        self.bytes -= before - topic.bytes;
        Ok(topic)
    }

    pub fn publish(&mut self, spec: &PublishSpec, now: u64) -> Result<Published, MessageError> {
        self.limits.check_publish(spec)?;
        self.publish_message(&spec.topic, spec, None, now)
    }

    fn publish_message(
        &mut self,
        key: &TopicKey,
        spec: &PublishSpec,
        dead_letter: Option<DeadLetter>,
        now: u64,
    ) -> Result<Published, MessageError> {
        let total_max = self.limits.total_bytes_max;
        self.topic_mut(key, now)?;
        let elsewhere = self.bytes - self.topics.get(key).map_or(0, |t| t.bytes);
        let topic = self.topic_mut(key, now)?;
        if let Some(k) = &spec.idempotency_key {
            if let Some(&seq) = topic.keys.get(k) {
                let same = topic.messages.get(&seq).is_some_and(|m| m.payload == spec.payload);
                if !same {
                    return Err(MessageError::KeyConflict { key: k.clone(), seq });
                }
                return Ok(Published { seq, existing: true, dropped: 0 });
            }
        }
        let size = spec.payload.len() as u64;
        let mut dropped = 0;
        // A dead-letter topic always drops its oldest: a dead letter has nowhere else to go.
        let drop_oldest = topic.policy.when_full == WhenFull::DropOldest || dead_letter.is_some();
        while topic.is_full(size) {
            if !drop_oldest {
                return Err(MessageError::TopicFull {
                    topic: key.to_string(),
                    messages: topic.messages.len() as u64,
                    bytes: topic.bytes,
                });
            }
            let Some(&oldest) = topic.messages.keys().next() else { break };
            topic.remove(oldest);
            topic.dropped += 1;
            dropped += 1;
        }
        if elsewhere + topic.bytes + size > total_max {
            return Err(MessageError::StoreFull {
                bytes: elsewhere + topic.bytes,
                adding: size,
                max: total_max,
            });
        }
        let seq = topic.next_seq;
        topic.append(Message {
            seq,
            priority: spec.priority,
            published_unix_ms: now,
            payload: spec.payload.clone(),
            idempotency_key: spec.idempotency_key.clone(),
            reply_to: spec.reply_to.clone(),
            correlation_id: spec.correlation_id.clone(),
            dead_letter,
        });
        self.bytes = elsewhere + topic.bytes;
        Ok(Published { seq, existing: false, dropped })
    }

    pub fn receive(&mut self, spec: &ReceiveSpec, now: u64) -> Result<Received, MessageError> {
        self.limits.check_receive(spec)?;
        let bytes_max = self.limits.receive_bytes_max;
        let topic = self.topic_mut(&spec.topic, now)?;
        if !topic.consumers.contains_key(&spec.consumer) {
            if topic.consumers.len() as u32 >= topic.policy.consumers_max {
                return Err(MessageError::TooManyConsumers {
                    topic: spec.topic.to_string(),
                    max: topic.policy.consumers_max,
                });
            }
            let consumer = Consumer {
                ready: topic.order.clone(),
                in_flight: OrdMap::new(),
                deadlines: OrdSet::new(),
                delivered: 0,
                acked: 0,
                dead_lettered: 0,
                created_unix_ms: now,
            };
            topic.consumers.insert(spec.consumer.clone(), consumer);
        }
        let deadline =
            now.saturating_add(spec.ack_deadline_ms.unwrap_or(topic.policy.ack_deadline_ms));
        let deliveries_max = topic.policy.deliveries_max;
        let is_dead_letter_topic = spec.topic.name.starts_with(DEAD_LETTER_PREFIX);
        let messages = &topic.messages;
        let Some(consumer) = topic.consumers.get_mut(&spec.consumer) else {
            return Err(MessageError::UnknownTopic(spec.topic.to_string()));
        };
        let mut received = Received::default();
        let mut dead: Vec<(Message, u32)> = Vec::new();
        let mut bytes = 0usize;
        let room = |received: &Received, bytes: usize, next: usize| {
            (received.messages.len() as u32) < spec.max
                && (received.messages.is_empty() || bytes + next <= bytes_max)
        };
        // Expired deliveries first: delivered again, or dead letters once they reach the bound.
        let expired: Vec<(u64, u64)> =
            consumer.deadlines.iter().take_while(|(d, _)| *d <= now).copied().collect();
        for (old_deadline, seq) in expired {
            let Some(message) = messages.get(&seq) else { continue };
            let Some(flight) = consumer.in_flight.get(&seq).copied() else { continue };
            if flight.delivery >= deliveries_max {
                consumer.deadlines.remove(&(old_deadline, seq));
                consumer.in_flight.remove(&seq);
                consumer.dead_lettered += 1;
                received.dead_lettered.push(seq);
                dead.push((message.clone(), flight.delivery));
                continue;
            }
            if !room(&received, bytes, message.payload.len()) {
                break;
            }
            consumer.deadlines.remove(&(old_deadline, seq));
            let delivery = flight.delivery + 1;
            consumer.in_flight.insert(seq, InFlight { delivery, deadline_unix_ms: deadline });
            consumer.deadlines.insert((deadline, seq));
            consumer.delivered += 1;
            bytes += message.payload.len();
            received.messages.push(Delivered {
                message: message.clone(),
                delivery,
                ack_deadline_unix_ms: deadline,
            });
        }
        while let Some(&(rank, seq)) = consumer.ready.iter().next() {
            let Some(message) = messages.get(&seq) else {
                consumer.ready.remove(&(rank, seq));
                continue;
            };
            if !room(&received, bytes, message.payload.len()) {
                break;
            }
            consumer.ready.remove(&(rank, seq));
            consumer.in_flight.insert(seq, InFlight { delivery: 1, deadline_unix_ms: deadline });
            consumer.deadlines.insert((deadline, seq));
            consumer.delivered += 1;
            bytes += message.payload.len();
            received.messages.push(Delivered {
                message: message.clone(),
                delivery: 1,
                ack_deadline_unix_ms: deadline,
            });
        }
        // A dead letter of a dead-letter topic is dropped (counted above), not forwarded again.
        if !is_dead_letter_topic {
            let dead_topic = TopicKey {
                namespace: spec.topic.namespace.clone(),
                name: format!("{DEAD_LETTER_PREFIX}{}", spec.topic.name),
            };
            for (message, deliveries) in dead {
                let letter = PublishSpec {
                    topic: dead_topic.clone(),
                    priority: message.priority,
                    payload: message.payload,
                    idempotency_key: None,
                    reply_to: message.reply_to,
                    correlation_id: message.correlation_id,
                };
                let origin = DeadLetter {
                    topic: spec.topic.name.clone(),
                    consumer: spec.consumer.clone(),
                    seq: message.seq,
                    deliveries,
                };
                // Only a full set of topics can refuse it; the letter is then counted, not kept.
                let _ = self.publish_message(&dead_topic, &letter, Some(origin), now);
            }
        }
        Ok(received)
    }

    /// Acknowledges deliveries of `consumer`: each is removed from its in-flight set and never
    /// delivered to that consumer again. Each ack is checked on its own.
    pub fn ack(
        &mut self,
        topic: &TopicKey,
        consumer: &str,
        deliveries: &[DeliveryRef],
    ) -> Result<Acked, MessageError> {
        self.limits.check_topic(topic)?;
        check_name("consumer", consumer, self.limits.consumer_name_bytes_max)?;
        if deliveries.is_empty() || deliveries.len() > self.limits.acks_max {
            return Err(MessageError::Invalid {
                what: "ack".to_owned(),
                why: format!(
                    "it names {} deliveries; name 1..={}",
                    deliveries.len(),
                    self.limits.acks_max
                ),
            });
        }
        let t = self
            .topics
            .get_mut(topic)
            .ok_or_else(|| MessageError::UnknownTopic(topic.to_string()))?;
        let Some(c) = t.consumers.get_mut(consumer) else {
            return Err(MessageError::Invalid {
                what: "consumer".to_owned(),
                why: format!("{consumer:?} has never received from {topic}"),
            });
        };
        let mut acked = Acked::default();
        for d in deliveries {
            match c.in_flight.get(&d.seq).copied() {
                Some(flight) if flight.delivery == d.delivery => {
                    c.in_flight.remove(&d.seq);
                    c.deadlines.remove(&(flight.deadline_unix_ms, d.seq));
                    c.acked += 1;
                    acked.acked.push(d.seq);
                }
                Some(flight) => acked.refused.push((
                    d.seq,
                    format!(
                        "delivery {} of message {} expired; it is on delivery {} now",
                        d.delivery, d.seq, flight.delivery
                    ),
                )),
                None => acked.refused.push((
                    d.seq,
                    format!(
                        "message {} is not awaiting an ack from {consumer:?} (already acknowledged, never delivered, dead-lettered or removed)",
                        d.seq
                    ),
                )),
            }
        }
        Ok(acked)
    }

    /// Makes every delivery awaiting an ack due at `now`, so it goes out again with the next
    /// delivery number and an ack of the old one is refused (a backup restored into a new
    /// cluster: its receivers are from before the snapshot). Returns how many.
    pub fn expire_deliveries(&mut self, now: u64) -> u64 {
        let mut count = 0;
        let keys: Vec<TopicKey> = self.topics.keys().cloned().collect();
        for key in keys {
            let Some(topic) = self.topics.get_mut(&key) else { continue };
            let names: Vec<String> = topic.consumers.keys().cloned().collect();
            for name in names {
                let Some(consumer) = topic.consumers.get_mut(&name) else { continue };
                let due: Vec<(u64, InFlight)> =
                    consumer.in_flight.iter().map(|(seq, flight)| (*seq, *flight)).collect();
                for (seq, flight) in due {
                    consumer.deadlines.remove(&(flight.deadline_unix_ms, seq));
                    let flight = InFlight { deadline_unix_ms: now, ..flight };
                    consumer.in_flight.insert(seq, flight);
                    consumer.deadlines.insert((now, seq));
                    count += 1;
                }
            }
        }
        count
    }

    /// Whether `expire` at `now` would remove anything.
    pub fn expirable(&self, now: u64) -> bool {
        self.topics.values().any(|t| {
            t.delete_after_unix_ms.is_some_and(|at| at <= now)
                || t.oldest_expires_unix_ms().is_some_and(|at| at <= now)
        })
    }

    /// Removes messages past their topic's age and temporary mailboxes past their time; returns
    /// the messages and the topics removed.
    pub fn expire(&mut self, now: u64) -> (u64, u64) {
        let due: Vec<TopicKey> = self
            .topics
            .iter()
            .filter(|(_, t)| t.delete_after_unix_ms.is_some_and(|at| at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &due {
            if let Some(topic) = self.topics.remove(key) {
                self.bytes -= topic.bytes;
            }
        }
        let aged: Vec<TopicKey> = self
            .topics
            .iter()
            .filter(|(_, t)| t.oldest_expires_unix_ms().is_some_and(|at| at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        let mut messages = 0;
        for key in aged {
            if let Some(topic) = self.topics.get_mut(&key) {
                let before = topic.bytes;
                messages += topic.expire(now);
                self.bytes -= before - topic.bytes;
            }
        }
        (messages, due.len() as u64)
    }

    /// Every index exact: the order set and byte count mirror the messages, keys point at
    /// messages that carry them, each consumer's ready and in-flight sets are disjoint and within
    /// the messages, deadlines mirror in-flight.
    pub fn check(&self) -> Result<(), String> {
        let total: u64 = self.topics.values().map(|t| t.bytes).sum();
        if total != self.bytes {
            return Err(format!("topics hold {total} bytes, the store counts {}", self.bytes));
        }
        for (key, t) in &self.topics {
            let order: OrdSet<(u8, u64)> = t.messages.values().map(order_key).collect();
            if order != t.order {
                return Err(format!("topic {key}: the order index does not mirror the messages"));
            }
            let bytes: u64 = t.messages.values().map(|m| m.payload.len() as u64).sum();
            if bytes != t.bytes {
                return Err(format!("topic {key}: holds {bytes} bytes, counts {}", t.bytes));
            }
            if let Some((&last, _)) = t.messages.iter().next_back() {
                if last >= t.next_seq {
                    return Err(format!(
                        "topic {key}: message {last} is not below next {}",
                        t.next_seq
                    ));
                }
            }
            for (k, seq) in &t.keys {
                if t.messages.get(seq).and_then(|m| m.idempotency_key.as_ref()) != Some(k) {
                    return Err(format!("topic {key}: key {k:?} points at {seq}, which lacks it"));
                }
            }
            for (name, c) in &t.consumers {
                for (rank, seq) in &c.ready {
                    if !t.order.contains(&(*rank, *seq)) {
                        return Err(format!(
                            "topic {key} consumer {name}: ready {seq} is not kept"
                        ));
                    }
                    if c.in_flight.contains_key(seq) {
                        return Err(format!(
                            "topic {key} consumer {name}: {seq} is ready and in flight"
                        ));
                    }
                }
                let deadlines: OrdSet<(u64, u64)> =
                    c.in_flight.iter().map(|(seq, f)| (f.deadline_unix_ms, *seq)).collect();
                if deadlines != c.deadlines {
                    return Err(format!(
                        "topic {key} consumer {name}: deadlines do not mirror in-flight"
                    ));
                }
                if let Some(seq) = c.in_flight.keys().find(|seq| !t.messages.contains_key(*seq)) {
                    return Err(format!(
                        "topic {key} consumer {name}: in-flight {seq} is not kept"
                    ));
                }
            }
        }
        Ok(())
    }
}
