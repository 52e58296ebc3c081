//! The feed follower: streams `WatchFinishedTasks` from one server at a time, resumes after the
//! last record it passed on, and moves to the next server with backoff whenever one fails.

use std::time::Duration;

use colony_client::Channel;
use colony_client::Client;
use colony_proto::pb;
use colony_proto::pb::admin_client::AdminClient;
use tokio::sync::mpsc;

use super::RPC_ATTEMPT_TIMEOUT;

/// Backoff between attempts to (re)open the feed: starts here, doubles, stops growing at max.
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What the feed task reports to the loop.
#[derive(Debug)]
pub(super) enum FeedEvent {
    Opened {
        server: String,
        after_seq: u64,
    },
    Finished(Box<pb::FinishedTask>),
    /// Retention removed the records after `from` up to `to` before they were read: the feed
    /// resumes after `to`.
    Skipped {
        from: u64,
        to: u64,
    },
    Lost {
        server: String,
        reason: String,
    },
}

/// How following one server ended.
enum Followed {
    Lost(String),
    /// The server said where to resume (records were removed): open again, at once.
    Resume,
    /// The loop is gone; stop.
    Closed,
}

/// Follows the feed from `after_seq` on, forever, moving to the next server whenever one fails.
pub(super) async fn follow(client: Client, mut after_seq: u64, feed: mpsc::Sender<FeedEvent>) {
    let mut backoff = BACKOFF_INITIAL;
    for (addr, client) in client.servers().iter().cycle() {
        let reason =
            match follow_one(client.clone(), addr, &mut after_seq, &feed, &mut backoff).await {
                Followed::Lost(reason) => reason,
                Followed::Resume => continue,
                Followed::Closed => return,
            };
        let lost = FeedEvent::Lost { server: addr.clone(), reason };
        if feed.send(lost).await.is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn follow_one(
    mut client: AdminClient<Channel>,
    addr: &str,
    after_seq: &mut u64,
    feed: &mpsc::Sender<FeedEvent>,
    backoff: &mut Duration,
) -> Followed {
    let request = pb::WatchFinishedTasksRequest { after_seq: *after_seq };
    let mut stream =
        match tokio::time::timeout(RPC_ATTEMPT_TIMEOUT, client.watch_finished_tasks(request)).await
        {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return refused(&status, after_seq, feed).await,
            Err(_) => return Followed::Lost("no answer to WatchFinishedTasks".to_owned()),
        };
    let opened = FeedEvent::Opened { server: addr.to_owned(), after_seq: *after_seq };
    if feed.send(opened).await.is_err() {
        return Followed::Closed;
    }
    loop {
        match stream.message().await {
            Ok(Some(finished)) => {
                // A server resumes exactly after the cursor, but a duplicate or a step back
                // (a server whose applied state lags) must never be counted twice.
                if finished.seq <= *after_seq {
                    continue;
                }
                *after_seq = finished.seq;
                // A stream that delivers is healthy: the next failure starts backing off anew.
                *backoff = BACKOFF_INITIAL;
                if feed.send(FeedEvent::Finished(Box::new(finished))).await.is_err() {
                    return Followed::Closed;
                }
            }
            Ok(None) => return Followed::Lost("the server ended the stream".to_owned()),
            Err(status) => return refused(&status, after_seq, feed).await,
        }
    }
}

/// A failed call or stream: lost, unless retention removed records past the cursor and the
/// server said where to resume (then the gap is reported and the cursor moves past it).
async fn refused(
    status: &tonic::Status,
    after_seq: &mut u64,
    feed: &mpsc::Sender<FeedEvent>,
) -> Followed {
    let resume = (status.code() == tonic::Code::OutOfRange)
        .then(|| status.metadata().get(colony_proto::RESUME_AFTER_SEQ)?.to_str().ok()?.parse().ok())
        .flatten()
        .filter(|&to: &u64| to > *after_seq);
    let Some(to) = resume else {
        return Followed::Lost(format!("{:?}: {}", status.code(), status.message()));
    };
    let skipped = FeedEvent::Skipped { from: *after_seq, to };
    *after_seq = to;
    match feed.send(skipped).await {
        Ok(()) => Followed::Resume,
        Err(_) => Followed::Closed,
    }
}
