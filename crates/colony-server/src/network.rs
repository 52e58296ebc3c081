//! openraft's network over gRPC: each Raft RPC is one unary call carrying openraft's own message.

use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::wire;
use colony_proto::pb::RaftMessage;
use colony_store::TypeConfig;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use std::error::Error;
use std::sync::Arc;
use std::time::Instant;

/// Creates a client per target server.
#[derive(Clone)]
pub struct Network {
    /// This server's id.
    pub id: u64,
    pub peers: Peers,
    pub cluster_id: String,
    pub metrics: Arc<Metrics>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        self.client(target, node.addr.clone())
    }
}

impl Network {
    pub fn client(&self, target: u64, addr: String) -> PeerClient {
        PeerClient {
            id: self.id,
            target,
            addr,
            peers: self.peers.clone(),
            cluster_id: self.cluster_id.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// The connection to one peer.
pub struct PeerClient {
    id: u64,
    target: u64,
    addr: String,
    peers: Peers,
    cluster_id: String,
    metrics: Arc<Metrics>,
}

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl Rpc {
    fn kind(self) -> RPCTypes {
        match self {
            Rpc::AppendEntries => RPCTypes::AppendEntries,
            Rpc::Vote => RPCTypes::Vote,
            Rpc::InstallSnapshot => RPCTypes::InstallSnapshot,
        }
    }
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &self,
        rpc: Rpc,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: serde::Serialize,
        Resp: DeserializeOwned,
        E: Error + DeserializeOwned,
    {
        let payload =
            wire::encode(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client =
            self.peers.raft(&self.addr).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let message = RaftMessage { cluster_id: self.cluster_id.clone(), payload };
        let call = async {
            match rpc {
                Rpc::AppendEntries => client.append_entries(message).await,
                Rpc::Vote => client.vote(message).await,
                Rpc::InstallSnapshot => client.install_snapshot(message).await,
            }
        };
        let started = Instant::now();
        let reply = tokio::time::timeout(option.hard_ttl(), call).await;
        self.metrics
            .agent_communication_seconds
            .with_label_values(&["server", "server"])
            .observe(started.elapsed().as_secs_f64());
        // A peer that answers late is slow, not gone: `Timeout` lets openraft send again at once,
        // where `Unreachable` would stop replication to it for half a second (openraft's backoff),
        // and a follower that hears nothing for that long stands for election.
        let reply = reply
            .map_err(|_| {
                RPCError::Timeout(Timeout {
                    action: rpc.kind(),
                    id: self.id,
                    target: self.target,
                    timeout: option.hard_ttl(),
                })
            })?
            .map_err(|status| match status.code() {
                tonic::Code::Unavailable
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded => RPCError::Unreachable(Unreachable::new(&status)),
                _ => RPCError::Network(NetworkError::new(&status)),
            })?;
        let result: Result<Resp, RaftError<u64, E>> = wire::decode(&reply.into_inner().payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                BasicNode::new(&self.addr),
                e,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(Rpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}
