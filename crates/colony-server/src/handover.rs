//! A leader stopped with SIGTERM hands leadership to its most up-to-date voter before it goes,
//! so writers wait about a round trip instead of an election timeout plus the leader lease.
//!
//! It stops proposing (clients are told to retry and reach the new leader through any server),
//! waits until a voter holds its whole log, and sends that voter `TimeoutNow` (Raft's leadership
//! transfer). The voter stands at once; this server grants its vote (openraft's lease on a leader
//! runs from when it was elected, and its log is no longer than the candidate's), and with three
//! servers that vote and the candidate's own are a majority. The other voters refuse while their
//! lease from this leader runs, so with five servers the new leader may wait for that lease to
//! end, as after a crash. Anything that fails leaves the cluster to elect as after a crash.

use crate::node::Node;
use colony_proto::pb::RaftMessage;
use openraft::ServerState;
use std::time::{Duration, Instant};

/// How long the chosen voter may take to hold the whole log.
const CATCH_UP_MAX: Duration = Duration::from_millis(500);
/// How long a candidate may take to win.
const ELECTED_MAX: Duration = Duration::from_millis(300);
/// Candidates asked before giving up.
const ATTEMPTS: usize = 3;

pub async fn hand_over(node: &Node) {
    let started = Instant::now();
    let vote = {
        let m = node.raft().metrics();
        let m = m.borrow();
        if m.state != ServerState::Leader {
            return;
        }
        m.vote
    };
    if tokio::time::timeout(CATCH_UP_MAX, node.stop_proposing()).await.is_err() {
        return tracing::warn!("stopping without handing over: proposals still in flight");
    }
    let message = match crate::wire::encode(&vote) {
        Ok(payload) => RaftMessage { cluster_id: node.cluster_id().to_owned(), payload },
        Err(e) => return tracing::warn!("stopping without handing over: {e}"),
    };
    // A candidate refused (a write the check did not see, a lost message) is asked again.
    for _ in 0..ATTEMPTS {
        let Some((target, addr)) = caught_up_voter(node).await else {
            return tracing::warn!(
                "stopping without handing over: no voter caught up within {CATCH_UP_MAX:?}"
            );
        };
        let asked = match node.peers().raft(&addr) {
            Ok(mut client) => {
                tokio::time::timeout(CATCH_UP_MAX, client.timeout_now(message.clone())).await
            }
            Err(e) => return tracing::warn!("stopping without handing over: {e}"),
        };
        let stood = asked
            .ok()
            .and_then(|reply| reply.ok())
            .and_then(|reply| crate::wire::decode::<bool>(&reply.into_inner().payload).ok());
        if stood != Some(true) {
            tracing::warn!("node {target} did not stand for election");
            continue;
        }
        let me = node.id();
        let wait = node.raft().wait(Some(ELECTED_MAX));
        match wait.metrics(|m| m.current_leader.is_some_and(|l| l != me), "a new leader").await {
            Ok(m) => {
                return tracing::info!(
                    "handed leadership over to node {:?} in {} ms",
                    m.current_leader,
                    started.elapsed().as_millis()
                )
            }
            Err(e) => tracing::warn!("node {target} stood but did not win: {e}"),
        }
    }
    tracing::warn!("stopping without handing over after {ATTEMPTS} candidates");
}

/// The voter (not this server) that holds this leader's whole log, once one does.
async fn caught_up_voter(node: &Node) -> Option<(u64, String)> {
    let deadline = Instant::now() + CATCH_UP_MAX;
    let mut metrics = node.raft().metrics();
    loop {
        {
            let m = metrics.borrow_and_update();
            let membership = m.membership_config.membership();
            let last = m.last_log_index;
            let caught_up = m.replication.as_ref().and_then(|replication| {
                replication
                    .iter()
                    .filter(|(id, _)| **id != m.id && membership.voter_ids().any(|v| v == **id))
                    .find(|(_, matched)| matched.map(|l| l.index) >= last)
                    .map(|(&id, _)| id)
            });
            if let Some(id) = caught_up {
                return membership.get_node(&id).map(|n| (id, n.addr.clone()));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || tokio::time::timeout(left, metrics.changed()).await.is_err() {
            return None;
        }
    }
}
