//! The receiving side of Raft traffic: decodes openraft's messages and hands them to the local node.
//!
//! Only a server of this cluster may send them: the connection must have asked for the Raft name
//! and presented a server certificate (the handshake enforces both), and the message must name
//! this cluster. Snapshot chunks are accepted only in order and within [`SNAPSHOT_BYTES_MAX`]:
//! openraft seeks to a chunk's offset before writing, so an absurd offset would be an absurd
//! allocation.

use crate::tls::ConnInfo;
use crate::wire;
use colony_proto::pb::raft_server::Raft as RaftRpc;
use colony_proto::pb::RaftMessage;
use colony_quic::CertRole;
use colony_store::TypeConfig;
use openraft::raft::InstallSnapshotRequest;
use openraft::{Raft, ServerState, Vote};
use std::collections::HashMap;
use std::sync::Mutex;
use tonic::{Request, Response, Status};

/// The largest snapshot a server accepts.
pub const SNAPSHOT_BYTES_MAX: u64 = 8 << 30;

pub struct RaftService {
    raft: Raft<TypeConfig>,
    cluster_id: String,
    chunks: SnapshotChunks,
}

/// Bytes received so far of the snapshot being streamed, by snapshot id: a chunk must start
/// where the received bytes end (or earlier, a retry), and end within `SNAPSHOT_BYTES_MAX`.
#[derive(Default)]
struct SnapshotChunks {
    received: Mutex<HashMap<String, u64>>,
}

impl SnapshotChunks {
    /// Checks a chunk against what was received of its snapshot, and records it.
    #[allow(clippy::result_large_err)]
    fn check(&self, chunk: &InstallSnapshotRequest<TypeConfig>) -> Result<(), Status> {
        let id = &chunk.meta.snapshot_id;
        let end = chunk
            .offset
            .checked_add(chunk.data.len() as u64)
            .filter(|&end| end <= SNAPSHOT_BYTES_MAX);
        let Some(end) = end else {
            return Err(Status::invalid_argument(format!(
                "snapshot chunk at offset {} of {} bytes is beyond the {SNAPSHOT_BYTES_MAX}-byte limit",
                chunk.offset,
                chunk.data.len()
            )));
        };
        let mut received = self.received.lock().unwrap_or_else(|p| p.into_inner());
        if chunk.offset == 0 {
            // A new snapshot (or a restart of one): forget the others.
            received.clear();
            received.insert(id.clone(), 0);
        }
        let so_far = received.get(id).copied().ok_or_else(|| {
            Status::invalid_argument(format!(
                "snapshot {id} chunk at offset {} without its start",
                chunk.offset
            ))
        })?;
        if chunk.offset > so_far {
            return Err(Status::invalid_argument(format!(
                "snapshot {id} chunk at offset {} but only {so_far} bytes received",
                chunk.offset
            )));
        }
        received.insert(id.clone(), so_far.max(end));
        if chunk.done {
            received.remove(id);
        }
        Ok(())
    }
}

/// Refuses Raft traffic on a connection that is not a server's Raft connection.
#[allow(clippy::result_large_err)]
fn from_server<T>(request: &Request<T>) -> Result<(), Status> {
    match request.extensions().get::<ConnInfo>() {
        Some(ConnInfo { raft: true, peer: Some(CertRole::Server(_)), .. }) => Ok(()),
        _ => Err(Status::unauthenticated(
            "Raft messages are accepted only from this cluster's servers (TLS name colony-raft, server certificate)",
        )),
    }
}

impl RaftService {
    pub fn new(raft: Raft<TypeConfig>, cluster_id: String) -> RaftService {
        RaftService { raft, cluster_id, chunks: SnapshotChunks::default() }
    }

    /// The message, if it comes from a server of this cluster.
    #[allow(clippy::result_large_err)]
    fn accept(&self, request: Request<RaftMessage>) -> Result<RaftMessage, Status> {
        from_server(&request)?;
        let message = request.into_inner();
        if message.cluster_id != self.cluster_id {
            return Err(Status::failed_precondition(format!(
                "raft message from cluster {:?} refused: this server belongs to cluster {}",
                message.cluster_id, self.cluster_id
            )));
        }
        Ok(message)
    }

    fn reply<T: serde::Serialize>(&self, value: &T) -> Result<Response<RaftMessage>, Status> {
        let payload = wire::encode(value).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(RaftMessage { cluster_id: self.cluster_id.clone(), payload }))
    }
}

fn decode<T: serde::de::DeserializeOwned>(message: &RaftMessage) -> Result<T, Status> {
    wire::decode(&message.payload).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let message = self.accept(request)?;
        let result = self.raft.append_entries(decode(&message)?).await;
        self.reply(&result)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let message = self.accept(request)?;
        let result = self.raft.vote(decode(&message)?).await;
        self.reply(&result)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let message = self.accept(request)?;
        let chunk: InstallSnapshotRequest<TypeConfig> = decode(&message)?;
        self.chunks.check(&chunk)?;
        let result = self.raft.install_snapshot(chunk).await;
        self.reply(&result)
    }

    async fn timeout_now(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let message = self.accept(request)?;
        let leader_vote: Vote<u64> = decode(&message)?;
        // Only the leader this server follows may ask, and only while it still leads.
        let follows = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.vote == leader_vote
                && leader_vote.is_committed()
                && m.state == ServerState::Follower
                && m.membership_config.membership().voter_ids().any(|id| id == m.id)
        };
        if follows {
            tracing::info!("the stopping leader asked this server to stand for election");
            self.raft.trigger().elect().await.map_err(|e| Status::unavailable(e.to_string()))?;
        }
        self.reply(&follows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{SnapshotMeta, StoredMembership, Vote};

    fn chunk(id: &str, offset: u64, len: usize, done: bool) -> InstallSnapshotRequest<TypeConfig> {
        InstallSnapshotRequest {
            vote: Vote::new_committed(1, 1),
            meta: SnapshotMeta {
                last_log_id: None,
                last_membership: StoredMembership::default(),
                snapshot_id: id.to_owned(),
            },
            offset,
            data: vec![0; len],
            done,
        }
    }

    #[test]
    fn chunks_come_in_order_and_within_the_limit() {
        let chunks = SnapshotChunks::default();
        let refused = |r: Result<(), Status>| r.err().map(|s| s.code());
        // An absurd offset, a chunk past the limit, and one of a snapshot never started.
        assert_eq!(
            refused(chunks.check(&chunk("a", 1 << 50, 1, false))),
            Some(tonic::Code::InvalidArgument)
        );
        assert_eq!(
            refused(chunks.check(&chunk("a", u64::MAX, 1, false))),
            Some(tonic::Code::InvalidArgument)
        );
        assert_eq!(
            refused(chunks.check(&chunk("a", 10, 10, false))),
            Some(tonic::Code::InvalidArgument)
        );
        // In order, with a retry of the previous chunk, then a gap.
        assert!(chunks.check(&chunk("a", 0, 10, false)).is_ok());
        assert!(chunks.check(&chunk("a", 10, 10, false)).is_ok());
        assert!(chunks.check(&chunk("a", 10, 10, false)).is_ok(), "a retried chunk");
        assert_eq!(
            refused(chunks.check(&chunk("a", 30, 10, false))),
            Some(tonic::Code::InvalidArgument)
        );
        assert!(chunks.check(&chunk("a", 20, 5, true)).is_ok());
        // Done: the snapshot is forgotten, so its next chunk needs a new start.
        assert_eq!(
            refused(chunks.check(&chunk("a", 25, 5, false))),
            Some(tonic::Code::InvalidArgument)
        );
        assert_eq!(
            refused(chunks.check(&chunk("b", SNAPSHOT_BYTES_MAX, 1, false))),
            Some(tonic::Code::InvalidArgument)
        );
    }
}
