//! Messages: publish, receive (a long poll that writes to the log only when there is something to
//! hand out), ack, request-response through a temporary reply mailbox, and topic administration.
//! Every call names its namespace; publishing and consuming need `TaskSubmit` there, listing
//! `TaskRead`.

use super::auth::Caller;
use super::{route, AdminService};
use colony_core::{
    Command, DeliveryRef, Outcome, Permission, PublishSpec, ReceiveSpec, TopicKey, TopicPolicy,
};
use colony_proto::messaging::{namespace_or_default, non_empty, policy_from_proto};
use colony_proto::pb;
use std::time::Duration;
use tonic::Status;

/// The longest a receive waits for a message.
pub const RECEIVE_WAIT_MS_MAX: u64 = 30_000;
/// The longest a request waits for its answer, and its default.
pub const REQUEST_TIMEOUT_MS_MAX: u64 = 60_000;
const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// A reply mailbox outlives its request by this much, so a late answer has somewhere to land
/// until retention removes the mailbox.
const REPLY_MAILBOX_GRACE_MS: u64 = 60_000;
/// Where reply mailboxes live.
const REPLY_PREFIX: &str = "replies/";
/// How often a waiting call looks again when nothing it can observe changes (a safety net; it
/// wakes on every applied entry).
const WAIT_TICK: Duration = Duration::from_millis(200);
/// The most messages one PublishBatch carries (its bytes are bounded by the server's 4 MiB
/// message limit).
pub const PUBLISH_BATCH_MESSAGES_MAX: usize = 1000;
const PAGE_SIZE_DEFAULT: usize = 100;
const PAGE_SIZE_MAX: usize = 1000;

fn topic_key(namespace: &str, name: &str) -> TopicKey {
    TopicKey { namespace: namespace_or_default(namespace), name: name.to_owned() }
}

fn priority(value: u32) -> Result<u8, Status> {
    u8::try_from(value)
        .ok()
        .filter(|p| *p <= colony_core::messaging::PRIORITY_MAX)
        .ok_or_else(|| Status::invalid_argument(format!("priority {value} is outside 0..=9")))
}

/// The command a Publish asks for, once the caller may and the request is well formed.
fn publish_command(caller: &Caller, request: pb::PublishRequest) -> Result<Command, Status> {
    let topic = topic_key(&request.namespace, &request.topic);
    caller.require(Permission::TaskSubmit, Some(&topic.namespace))?;
    let spec = PublishSpec {
        topic,
        priority: priority(request.priority)?,
        payload: request.payload,
        idempotency_key: non_empty(request.idempotency_key),
        reply_to: non_empty(request.reply_to),
        correlation_id: non_empty(request.correlation_id),
    };
    Ok(caller.fenced(Command::Publish(spec)))
}

fn published(outcome: Outcome) -> Result<pb::PublishResponse, Status> {
    match outcome {
        Outcome::Published(p) => {
            Ok(pb::PublishResponse { seq: p.seq, existing: p.existing, dropped: p.dropped })
        }
        other => Err(Status::internal(format!("publish produced {other:?}"))),
    }
}

impl AdminService {
    pub(super) async fn publish_here(
        &self,
        caller: Caller,
        request: pb::PublishRequest,
    ) -> Result<pb::PublishResponse, Status> {
        let command = publish_command(&caller, request)?;
        published(self.propose(command).await?)
    }

    /// Each message as its own Publish would be: checked, committed and answered alone. They
    /// are proposed in request order, so they share Raft entries and keep that order in a topic.
    pub(super) async fn publish_batch_here(
        &self,
        caller: Caller,
        request: pb::PublishBatchRequest,
    ) -> Result<pb::PublishBatchResponse, Status> {
        let count = request.messages.len();
        if count == 0 {
            return Err(Status::invalid_argument("a batch needs at least one message"));
        }
        if count > PUBLISH_BATCH_MESSAGES_MAX {
            return Err(Status::invalid_argument(format!(
                "a batch holds at most {PUBLISH_BATCH_MESSAGES_MAX} messages; this one has {count}"
            )));
        }
        // Each message's check; the well-formed ones' commands go to Raft, in order.
        let mut commands = Vec::with_capacity(count);
        let checked: Vec<Result<(), Status>> = request
            .messages
            .into_iter()
            .map(|m| publish_command(&caller, m).map(|command| commands.push(command)))
            .collect();
        let mut outcomes = self.node.propose_all(commands).await.into_iter();
        let results = checked
            .into_iter()
            .map(|checked| {
                let answer = checked.and_then(|()| match outcomes.next() {
                    Some(outcome) => published(outcome.map_err(route::propose_failed)?),
                    None => Err(Status::internal("a proposed message got no outcome")),
                });
                pb::PublishResult {
                    result: Some(match answer {
                        Ok(published) => pb::publish_result::Result::Published(published),
                        Err(status) => pb::publish_result::Result::Error(pb::PublishError {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        }),
                    }),
                }
            })
            .collect();
        Ok(pb::PublishBatchResponse { results })
    }

    pub(super) async fn receive_here(
        &self,
        caller: Caller,
        request: pb::ReceiveRequest,
    ) -> Result<pb::ReceiveResponse, Status> {
        let topic = topic_key(&request.namespace, &request.topic);
        caller.require(Permission::TaskSubmit, Some(&topic.namespace))?;
        if request.wait_ms > RECEIVE_WAIT_MS_MAX {
            return Err(Status::invalid_argument(format!(
                "wait_ms {} is above {RECEIVE_WAIT_MS_MAX}",
                request.wait_ms
            )));
        }
        let spec = ReceiveSpec {
            topic,
            consumer: request.consumer,
            max: request.max.max(1),
            ack_deadline_ms: (request.ack_deadline_ms > 0).then_some(request.ack_deadline_ms),
        };
        self.node
            .state()
            .machine
            .messaging()
            .limits
            .check_receive(&spec)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let until = tokio::time::Instant::now() + Duration::from_millis(request.wait_ms);
        let mut metrics = self.node.raft().metrics();
        loop {
            let now = colony_process::unix_ms();
            let (ready, next_deadline) = {
                let state = self.node.state();
                let messaging = state.machine.messaging();
                (
                    messaging.receivable(&spec.topic, &spec.consumer, now),
                    messaging.next_deadline(&spec.topic, &spec.consumer),
                )
            };
            let last = tokio::time::Instant::now() >= until;
            if ready || last {
                match self.propose(caller.fenced(Command::Receive(spec.clone()))).await? {
                    Outcome::Received(r)
                        if !r.messages.is_empty() || !r.dead_lettered.is_empty() || last =>
                    {
                        return Ok(pb::ReceiveResponse {
                            deliveries: r
                                .messages
                                .iter()
                                .map(|d| pb::Delivery {
                                    message: Some(pb::Message::from(&d.message)),
                                    delivery: d.delivery,
                                    ack_deadline_unix_ms: d.ack_deadline_unix_ms,
                                })
                                .collect(),
                            dead_lettered: r.dead_lettered,
                        });
                    }
                    // Another receiver with this name took them first: wait on.
                    Outcome::Received(_) => {}
                    other => return Err(Status::internal(format!("receive produced {other:?}"))),
                }
            }
            // Wake on the next applied entry, a deadline passing, or the end of the wait.
            let mut wake = until;
            if let Some(deadline) = next_deadline {
                let in_ms = deadline.saturating_sub(now) + 1;
                wake = wake.min(tokio::time::Instant::now() + Duration::from_millis(in_ms));
            }
            wake = wake.min(tokio::time::Instant::now() + WAIT_TICK);
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("the server is shutting down; retry"));
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    pub(super) async fn ack_here(
        &self,
        caller: Caller,
        request: pb::AckRequest,
    ) -> Result<pb::AckResponse, Status> {
        let topic = topic_key(&request.namespace, &request.topic);
        caller.require(Permission::TaskSubmit, Some(&topic.namespace))?;
        let deliveries = request
            .deliveries
            .iter()
            .map(|d| DeliveryRef { seq: d.seq, delivery: d.delivery })
            .collect();
        let command = Command::Ack { topic, consumer: request.consumer, deliveries };
        match self.propose(caller.fenced(command)).await? {
            Outcome::Acked(a) => Ok(pb::AckResponse {
                acked: a.acked,
                refused: a
                    .refused
                    .into_iter()
                    .map(|(seq, reason)| pb::RefusedAck { seq, reason })
                    .collect(),
            }),
            other => Err(Status::internal(format!("ack produced {other:?}"))),
        }
    }

    pub(super) async fn request_here(
        &self,
        caller: Caller,
        request: pb::RequestRequest,
    ) -> Result<pb::RequestResponse, Status> {
        let topic = topic_key(&request.namespace, &request.topic);
        caller.require(Permission::TaskSubmit, Some(&topic.namespace))?;
        let timeout_ms = match request.timeout_ms {
            0 => REQUEST_TIMEOUT_MS_DEFAULT,
            t if t > REQUEST_TIMEOUT_MS_MAX => {
                return Err(Status::invalid_argument(format!(
                    "timeout_ms {t} is above {REQUEST_TIMEOUT_MS_MAX}"
                )))
            }
            t => t,
        };
        let id = hex::encode(rand::random::<[u8; 12]>());
        let mailbox =
            TopicKey { namespace: topic.namespace.clone(), name: format!("{REPLY_PREFIX}{id}") };
        let spec = PublishSpec {
            topic,
            priority: priority(request.priority)?,
            payload: request.payload,
            idempotency_key: None,
            reply_to: Some(mailbox.name.clone()),
            correlation_id: Some(id.clone()),
        };
        // Checked before the mailbox exists, so a bad request leaves nothing behind.
        self.node
            .state()
            .machine
            .messaging()
            .limits
            .check_publish(&spec)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let started = tokio::time::Instant::now();
        let policy = TopicPolicy { messages_max: 16, consumers_max: 4, ..TopicPolicy::default() };
        let delete_after = colony_process::unix_ms() + timeout_ms + REPLY_MAILBOX_GRACE_MS;
        self.propose(Command::CreateTopic {
            topic: mailbox.clone(),
            policy,
            delete_after_unix_ms: Some(delete_after),
        })
        .await?;
        let result = self
            .await_reply(&caller, spec, &mailbox, &id, started + Duration::from_millis(timeout_ms))
            .await;
        // The mailbox is private to this request: gone once it has its answer (or gave up).
        // Should this fail, retention removes it at `delete_after`.
        let _ = self.propose(Command::DeleteTopic { topic: mailbox }).await;
        result
    }

    async fn await_reply(
        &self,
        caller: &Caller,
        spec: PublishSpec,
        mailbox: &TopicKey,
        correlation_id: &str,
        until: tokio::time::Instant,
    ) -> Result<pb::RequestResponse, Status> {
        let target = spec.topic.to_string();
        let request_seq = match self.propose(caller.fenced(Command::Publish(spec))).await? {
            Outcome::Published(p) => p.seq,
            other => return Err(Status::internal(format!("publish produced {other:?}"))),
        };
        let mut metrics = self.node.raft().metrics();
        loop {
            if let Some(reply) =
                self.node.state().machine.messaging().find_reply(mailbox, correlation_id)
            {
                return Ok(pb::RequestResponse {
                    reply: Some(pb::Message::from(reply)),
                    request_seq,
                });
            }
            let wake = until.min(tokio::time::Instant::now() + WAIT_TICK);
            if tokio::time::Instant::now() >= until {
                return Err(Status::deadline_exceeded(format!(
                    "no answer to request {request_seq} on {target} in time: is anything consuming it?"
                )));
            }
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("the server is shutting down"));
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    pub(super) async fn create_topic_here(
        &self,
        caller: Caller,
        request: pb::CreateTopicRequest,
    ) -> Result<pb::CreateTopicResponse, Status> {
        let topic = topic_key(&request.namespace, &request.topic);
        caller.require(Permission::TaskSubmit, Some(&topic.namespace))?;
        let policy = policy_from_proto(request.policy).map_err(Status::invalid_argument)?;
        let command = Command::CreateTopic { topic, policy, delete_after_unix_ms: None };
        match self.propose(command).await? {
            Outcome::TopicCreated { created } => Ok(pb::CreateTopicResponse { created }),
            other => Err(Status::internal(format!("create topic produced {other:?}"))),
        }
    }

    pub(super) async fn delete_topic_here(
        &self,
        caller: Caller,
        request: pb::DeleteTopicRequest,
    ) -> Result<pb::DeleteTopicResponse, Status> {
        let topic = topic_key(&request.namespace, &request.topic);
        caller.require(Permission::TaskCancel, Some(&topic.namespace))?;
        match self.propose(Command::DeleteTopic { topic }).await? {
            Outcome::TopicDeleted { messages } => Ok(pb::DeleteTopicResponse { messages }),
            other => Err(Status::internal(format!("delete topic produced {other:?}"))),
        }
    }

    pub(super) async fn list_topics_here(
        &self,
        caller: Caller,
        request: pb::ListTopicsRequest,
    ) -> Result<pb::ListTopicsResponse, Status> {
        let only = non_empty(request.namespace);
        if let Some(namespace) = &only {
            caller.require(Permission::TaskRead, Some(namespace))?;
        }
        let limit = match request.page_size as usize {
            0 => PAGE_SIZE_DEFAULT,
            n => n.min(PAGE_SIZE_MAX),
        };
        let after = (!request.after_name.is_empty())
            .then(|| topic_key(&request.after_namespace, &request.after_name));
        let state = self.node.state();
        let found = state.machine.messaging().list(after.as_ref(), limit, |key| {
            caller.covers(&key.namespace) && only.as_ref().is_none_or(|n| *n == key.namespace)
        });
        let topics: Vec<pb::TopicInfo> = found.iter().map(pb::TopicInfo::from).collect();
        let (next_ns, next_name) = match (topics.len() == limit, topics.last()) {
            (true, Some(last)) => (last.namespace.clone(), last.name.clone()),
            _ => (String::new(), String::new()),
        };
        Ok(pb::ListTopicsResponse {
            topics,
            next_after_namespace: next_ns,
            next_after_name: next_name,
        })
    }
}
