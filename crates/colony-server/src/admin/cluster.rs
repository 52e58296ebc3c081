//! The cluster: status and identity, membership (join, remove), join tokens, executors, drains.

use super::auth::{Caller, Principal};
use super::AdminService;
use colony_core::{Command, ExecutorId, JoinKind};
use colony_proto::convert::executor_to_proto;
use colony_proto::pb;
use colony_quic::CertRole;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tonic::Status;

/// What `SaveSnapshot` streams: the backup file in chunks.
pub type SnapshotStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SnapshotChunk, Status>> + Send>>;
/// The most bytes one `SnapshotChunk` carries.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);
/// Join tokens live at most this long (a week).
const JOIN_TOKEN_TTL_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// Drains may run at most this long before attempts are stopped.
const DRAIN_DEADLINE_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

impl AdminService {
    pub(super) async fn cluster_status_here(
        &self,
        _caller: Caller,
        _request: pb::ClusterStatusRequest,
    ) -> Result<pb::ClusterStatusResponse, Status> {
        let metrics = self.raft_metrics();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let probes = membership.nodes().map(|(&id, node)| {
            let addr = node.addr.clone();
            async move {
                let reachable = id == self.node.id() || self.reachable(&addr).await;
                (id, addr, reachable)
            }
        });
        let probed = futures::future::join_all(probes).await;
        let matched: BTreeMap<u64, u64> = metrics
            .replication
            .iter()
            .flatten()
            .filter_map(|(id, log_id)| log_id.map(|l| (*id, l.index)))
            .collect();
        let members = probed
            .into_iter()
            .map(|(id, addr, reachable)| pb::Member {
                id,
                addr,
                role: if voters.contains(&id) { "voter" } else { "learner" }.to_owned(),
                reachable,
                matched_index: matched.get(&id).copied(),
            })
            .collect();
        let state = self.node.state();
        let tasks_by_state = state
            .machine
            .count_by_state()
            .into_iter()
            .map(|(s, n)| (s.as_str().to_owned(), n))
            .collect();
        let mut executors_by_state: std::collections::HashMap<String, u64> = Default::default();
        for executor in state.machine.executors() {
            *executors_by_state.entry(executor.state.as_str().to_owned()).or_default() += 1;
        }
        Ok(pb::ClusterStatusResponse {
            cluster_id: self.node.cluster_id().to_owned(),
            node_id: self.node.id(),
            state: format!("{:?}", metrics.state).to_lowercase(),
            leader_id: metrics.current_leader,
            term: metrics.current_term,
            commit_index: self.node.committed_index(),
            applied_index: metrics.last_applied.map_or(0, |l| l.index),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            snapshot_index: metrics.snapshot.map(|l| l.index),
            purged_index: metrics.purged.map(|l| l.index),
            members,
            joint: membership.get_joint_config().len() > 1,
            task_count: state.machine.task_count() as u64,
            tasks_by_state,
            rss_bytes: colony_process::rss_bytes(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            executors_by_state,
        })
    }

    pub(super) async fn state_digest_here(
        &self,
        _caller: Caller,
        _request: pb::StateDigestRequest,
    ) -> Result<pb::StateDigestResponse, Status> {
        use sha2::Digest as _;
        let state = self.node.state_copy();
        let (applied_index, task_count) =
            (state.last_applied.map_or(0, |l| l.index), state.machine.task_count() as u64);
        let digest = tokio::task::spawn_blocking(move || {
            colony_store::codec::encode(&state.machine)
                .map(|encoded| sha2::Sha256::digest(&encoded))
        });
        let sha256 = digest
            .await
            .map_err(|e| Status::internal(format!("cannot encode the state: {e}")))?
            .map_err(|e| Status::internal(format!("cannot encode the state: {e}")))?;
        let sha256 = hex::encode(sha256);
        Ok(pb::StateDigestResponse { node_id: self.node.id(), applied_index, sha256, task_count })
    }

    /// A backup of the leader's applied state, taken after a read barrier so it holds every
    /// write acknowledged before the call.
    pub(super) async fn save_snapshot_here(&self) -> Result<SnapshotStream, Status> {
        if !self.is_leader() {
            let metrics = self.raft_metrics();
            let leader = metrics.current_leader.and_then(|id| {
                metrics.membership_config.membership().get_node(&id).map(|n| n.addr.clone())
            });
            let mut trailer = tonic::metadata::MetadataMap::new();
            if let Some(value) = leader.as_deref().and_then(|addr| addr.parse().ok()) {
                trailer.insert(colony_proto::LEADER_ADDR, value);
            }
            let message = match leader {
                Some(addr) => format!("backups are taken on the leader, at {addr}"),
                None => "backups are taken on the leader, and none is elected now".to_owned(),
            };
            return Err(Status::with_metadata(tonic::Code::FailedPrecondition, message, trailer));
        }
        self.read_barrier().await?;
        let node = self.node.clone();
        let file = tokio::task::spawn_blocking(move || node.backup())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        let chunks: Vec<Result<pb::SnapshotChunk, Status>> = file
            .chunks(SNAPSHOT_CHUNK_BYTES)
            .map(|chunk| Ok(pb::SnapshotChunk { data: chunk.to_vec() }))
            .collect();
        Ok(Box::pin(tokio_stream::iter(chunks)))
    }

    pub(super) async fn cluster_info_here(
        &self,
        _caller: Caller,
        _request: pb::ClusterInfoRequest,
    ) -> Result<pb::ClusterInfoResponse, Status> {
        let metrics = self.raft_metrics();
        let members = metrics
            .membership_config
            .membership()
            .nodes()
            .map(|(&id, node)| (id, node.addr.clone()))
            .collect();
        Ok(pb::ClusterInfoResponse {
            cluster_id: self.node.cluster_id().to_owned(),
            node_id: self.node.id(),
            leader_id: metrics.current_leader,
            members,
            commit_index: self.node.committed_index(),
        })
    }

    pub(super) async fn join_cluster_here(
        &self,
        caller: Caller,
        request: pb::JoinClusterRequest,
    ) -> Result<pb::JoinClusterResponse, Status> {
        // Only the server the certificate names joins, as itself.
        match caller.principal {
            Principal::Certificate { holder: CertRole::Server(id), .. }
                if id == request.node_id => {}
            _ => {
                return Err(Status::permission_denied(format!(
                    "only server {} itself, with its certificate, may join as node {}",
                    request.node_id, request.node_id
                )))
            }
        }
        if request.cluster_id != self.node.cluster_id() {
            return Err(Status::failed_precondition(format!(
                "the joining server belongs to cluster {:?}; this is cluster {}",
                request.cluster_id,
                self.node.cluster_id()
            )));
        }
        let id = request.node_id;
        let metrics = self.raft_metrics();
        let membership = metrics.membership_config.membership();
        let members: Vec<(u64, String)> =
            membership.nodes().map(|(&id, node)| (id, node.addr.clone())).collect();
        self.check_new_member(id, &request.addr, &members)?;
        let is_voter = membership.voter_ids().any(|v| v == id);
        let is_member = membership.get_node(&id).is_some();
        let reply = || pb::JoinClusterResponse {
            cluster_id: self.node.cluster_id().to_owned(),
            leader_id: self.node.id(),
        };
        if is_voter {
            return Ok(reply());
        }
        if !is_member {
            tracing::info!(node_id = id, addr = %request.addr, "adding learner; waiting for it to catch up");
            let add = self.node.raft().add_learner(id, BasicNode::new(&request.addr), true);
            tokio::time::timeout(CATCH_UP_TIMEOUT, add)
                .await
                .map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "node {id} did not catch up within {CATCH_UP_TIMEOUT:?}"
                    ))
                })?
                .map_err(membership_failed)?;
        }
        tracing::info!(node_id = id, "promoting learner to voter");
        self.node
            .raft()
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(membership_failed)?;
        Ok(reply())
    }

    pub(super) async fn remove_node_here(
        &self,
        _caller: Caller,
        request: pb::RemoveNodeRequest,
    ) -> Result<pb::RemoveNodeResponse, Status> {
        let id = request.node_id;
        let metrics = self.raft_metrics();
        let membership = metrics.membership_config.membership();
        if membership.get_node(&id).is_none() {
            return Err(Status::not_found(format!("node {id} is not a member")));
        }
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(Status::failed_precondition(format!(
                    "node {id} is the last voter; removing it would leave no cluster"
                )));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        tracing::info!(node_id = id, "removing node");
        let response =
            self.node.raft().change_membership(change, false).await.map_err(membership_failed)?;
        let voters = response.membership.map(|m| m.voter_ids().collect()).unwrap_or_default();
        Ok(pb::RemoveNodeResponse { leader_id: self.node.id(), voters })
    }

    pub(super) async fn create_join_token_here(
        &self,
        _caller: Caller,
        request: pb::CreateJoinTokenRequest,
    ) -> Result<pb::CreateJoinTokenResponse, Status> {
        let ttl = Duration::from_millis(request.ttl_ms);
        if ttl.is_zero() || ttl > JOIN_TOKEN_TTL_MAX {
            return Err(Status::invalid_argument(format!(
                "ttl must be between 1ms and {}",
                humanize(JOIN_TOKEN_TTL_MAX)
            )));
        }
        let record = self
            .node
            .state()
            .machine
            .ca()
            .cloned()
            .ok_or_else(|| Status::unavailable("the cluster CA is not created yet; retry"))?;
        let ca = colony_quic::ClusterCa::from_pem(&record.cert_pem, &record.key_pem)
            .map_err(|e| Status::internal(format!("cluster CA: {e}")))?;
        let kind = match request.kind.as_str() {
            "" => JoinKind::Executor,
            kind => kind.parse().map_err(Status::invalid_argument)?,
        };
        let token = colony_quic::Token::generate(&ca);
        let expires_unix_ms = colony_process::unix_ms() + ttl.as_millis() as u64;
        self.propose(Command::CreateJoinToken {
            secret_hash: token.secret_hash(),
            expires_unix_ms,
            kind,
        })
        .await?;
        Ok(pb::CreateJoinTokenResponse { token: token.to_string(), expires_unix_ms })
    }

    pub(super) async fn list_executors_here(
        &self,
        _caller: Caller,
        _request: pb::ListExecutorsRequest,
    ) -> Result<pb::ListExecutorsResponse, Status> {
        let state = self.node.state();
        let executors = state.machine.executors().map(|e| self.executor_view(e)).collect();
        Ok(pb::ListExecutorsResponse {
            executors,
            applied_index: state.last_applied.map_or(0, |l| l.index),
        })
    }

    pub(super) async fn drain_executor_here(
        &self,
        _caller: Caller,
        request: pb::DrainExecutorRequest,
    ) -> Result<pb::DrainExecutorResponse, Status> {
        let deadline = Duration::from_millis(request.deadline_ms);
        if deadline > DRAIN_DEADLINE_MAX {
            return Err(Status::invalid_argument(format!(
                "the drain deadline may be at most {}",
                humanize(DRAIN_DEADLINE_MAX)
            )));
        }
        let id = ExecutorId(request.id);
        let deadline_unix_ms = colony_process::unix_ms() + deadline.as_millis() as u64;
        self.propose(Command::DrainExecutor { id, deadline_unix_ms }).await?;
        self.node.wake_scheduler();
        let state = self.node.state();
        let executor = state
            .machine
            .get_executor(id)
            .ok_or_else(|| Status::not_found(format!("executor {id} does not exist")))?;
        Ok(pb::DrainExecutorResponse { executor: Some(self.executor_view(executor)) })
    }
}

impl AdminService {
    pub(super) async fn undrain_executor_here(
        &self,
        _caller: Caller,
        request: pb::UndrainExecutorRequest,
    ) -> Result<pb::UndrainExecutorResponse, Status> {
        let id = ExecutorId(request.id);
        self.propose(Command::UndrainExecutor { id }).await?;
        self.node.wake_scheduler();
        let state = self.node.state();
        let executor = state
            .machine
            .get_executor(id)
            .ok_or_else(|| Status::not_found(format!("executor {id} does not exist")))?;
        Ok(pb::UndrainExecutorResponse { executor: Some(self.executor_view(executor)) })
    }
}

fn humanize(duration: Duration) -> String {
    format!("{}h", duration.as_secs() / 3600)
}

impl AdminService {
    async fn reachable(&self, addr: &str) -> bool {
        let Ok(mut client) = self.node.peers().admin(addr) else { return false };
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, client.cluster_info(pb::ClusterInfoRequest {}))
                .await,
            Ok(Ok(_))
        )
    }

    fn executor_view(&self, executor: &colony_core::Executor) -> pb::Executor {
        let age = self.node.sessions().heartbeat_age(executor.id).map(|age| age.as_millis() as u64);
        executor_to_proto(executor, age)
    }
}

fn membership_failed(error: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Status {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            Status::unavailable("leadership changed; retry")
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(p),
        )) => Status::unavailable(format!("another membership change is in progress; retry ({p})")),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Status::failed_precondition(e.to_string())
        }
        RaftError::Fatal(f) => Status::unavailable(format!("raft stopped: {f}")),
    }
}
