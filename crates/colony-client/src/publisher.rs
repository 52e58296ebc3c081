//! Publishing many messages with few calls: concurrent [`Publisher::publish`] calls are gathered
//! into PublishBatch calls on one connection, and each caller gets its own message's answer
//! (committed on a majority, or why not) as a Publish call would give it.
//!
//! Batches form by themselves, with no waiting: a batch leaves as soon as one of
//! [`PublisherConfig::calls_in_flight_max`] call slots is free, holding everything queued by then.
//! A lone publisher therefore pays no delay, and under load each call carries many messages, so
//! the per-call costs (TLS records, HTTP/2 frames, authentication, the audit line, a forwarding
//! hop) are paid once per batch instead of once per message.
//!
//! Nothing is retried here: a call that fails gives every message in it that failure, and a
//! caller that retries should give its messages idempotency keys (the outcome of a call that
//! failed in flight is unknown).

use crate::Channel;
use colony_proto::pb;
use colony_proto::pb::admin_client::AdminClient;
use prost::Message as _;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status};

/// Bounds on the calls a [`Publisher`] makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublisherConfig {
    /// Messages in one call (the server takes at most 1,000).
    pub batch_messages_max: usize,
    /// Encoded bytes of the messages in one call (the server takes at most 4 MiB); one larger
    /// message still goes, alone.
    pub batch_bytes_max: usize,
    /// Calls sent and not yet answered.
    pub calls_in_flight_max: usize,
    /// Messages waiting for a call; beyond this, `publish` waits (backpressure).
    pub queue_messages_max: usize,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            batch_messages_max: 1000,
            batch_bytes_max: 1 << 20,
            calls_in_flight_max: 4,
            queue_messages_max: 16_384,
        }
    }
}

struct Pending {
    request: pb::PublishRequest,
    bytes: usize,
    reply: Reply,
}

/// Where one message's answer goes.
type Reply = oneshot::Sender<Result<pb::PublishResponse, Status>>;

/// A handle for publishing through one connection; clones share its batches. The gathering task
/// ends when the last handle is dropped.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Pending>,
}

impl Publisher {
    /// Starts gathering publishes into calls on `client` (on the current tokio runtime).
    pub fn spawn(client: AdminClient<Channel>, config: PublisherConfig) -> Publisher {
        let (tx, rx) = mpsc::channel(config.queue_messages_max.max(1));
        tokio::spawn(gather(client, rx, config));
        Publisher { tx }
    }

    /// Publishes one message and waits for its answer: the message's sequence number in its
    /// topic once committed on a majority, or the status its own Publish would have had.
    pub async fn publish(
        &self,
        request: pb::PublishRequest,
    ) -> Result<pb::PublishResponse, Status> {
        let (reply, answer) = oneshot::channel();
        let bytes = request.encoded_len();
        self.tx
            .send(Pending { request, bytes, reply })
            .await
            .map_err(|_| Status::cancelled("the publisher has stopped"))?;
        answer.await.map_err(|_| Status::cancelled("the publisher has stopped"))?
    }
}

async fn gather(
    client: AdminClient<Channel>,
    mut rx: mpsc::Receiver<Pending>,
    config: PublisherConfig,
) {
    let slots = Arc::new(Semaphore::new(config.calls_in_flight_max.max(1)));
    // A message that did not fit the last batch starts the next one.
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match rx.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        // Waiting for a free slot is what lets a batch grow: messages queue behind `first`.
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < config.batch_messages_max {
            match rx.try_recv() {
                Ok(next) if bytes + next.bytes > config.batch_bytes_max => {
                    carried = Some(next);
                    break;
                }
                Ok(next) => {
                    bytes += next.bytes;
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        tokio::spawn(send(client.clone(), batch, permit));
    }
}

async fn send(mut client: AdminClient<Channel>, batch: Vec<Pending>, _slot: OwnedSemaphorePermit) {
    let (messages, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|p| (p.request, p.reply)).unzip();
    let count = messages.len();
    let results = match client.publish_batch(pb::PublishBatchRequest { messages }).await {
        Ok(response) => response.into_inner().results,
        Err(status) => return fail_all(replies, &status),
    };
    if results.len() != count {
        let status = Status::internal(format!(
            "the server answered {} results for a batch of {count} messages",
            results.len()
        ));
        return fail_all(replies, &status);
    }
    for (reply, result) in replies.into_iter().zip(results) {
        let _ = reply.send(answer(result));
    }
}

/// Gives every message of a batch the failure of the whole call.
fn fail_all(replies: Vec<Reply>, status: &Status) {
    for reply in replies {
        let _ = reply.send(Err(status.clone()));
    }
}

/// One message's result as the status its own Publish call would have had.
// tonic's `Status` is large; it is what a Publish call answers, so it is what a caller expects.
#[allow(clippy::result_large_err)]
fn answer(result: pb::PublishResult) -> Result<pb::PublishResponse, Status> {
    match result.result {
        Some(pb::publish_result::Result::Published(published)) => Ok(published),
        Some(pb::publish_result::Result::Error(error)) => {
            Err(Status::new(Code::from_i32(error.code), error.message))
        }
        None => Err(Status::internal("the server answered a message with no result")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_is_the_answer_its_own_publish_would_have_had() {
        let published = pb::PublishResponse { seq: 7, existing: false, dropped: 0 };
        let ok =
            pb::PublishResult { result: Some(pb::publish_result::Result::Published(published)) };
        assert_eq!(answer(ok).ok(), Some(published));
        let refused = pb::PublishResult {
            result: Some(pb::publish_result::Result::Error(pb::PublishError {
                code: Code::ResourceExhausted as i32,
                message: "topic is full".into(),
            })),
        };
        let status = answer(refused).err().map(|s| (s.code(), s.message().to_owned()));
        assert_eq!(status, Some((Code::ResourceExhausted, "topic is full".to_owned())));
        let empty = answer(pb::PublishResult { result: None }).err().map(|s| s.code());
        assert_eq!(empty, Some(Code::Internal));
    }
}
