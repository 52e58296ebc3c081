//! The operator API. Any server answers: writes and linearizable reads run on the leader (a
//! follower forwards them once), stale reads and cluster status run where they arrive.

use crate::metrics::Metrics;
use crate::node::Node;
use crate::proposer::ProposeError;
use colony_core::{Command, CommandError, ExecutorId, Outcome, TaskFilter, TaskId, TaskSpec};
use colony_proto::convert::{executor_to_proto, task_state_from_proto};
use colony_proto::pb::admin_client::AdminClient;
use colony_proto::pb::admin_server::Admin;
use colony_proto::pb::{self, ReadConsistency};
use openraft::error::{ChangeMembershipError, CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, RaftMetrics, ServerState};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Set on a request one server forwards to another, so it is never forwarded twice.
const FORWARDED: &str = "x-colony-forwarded";
const PAGE_SIZE_DEFAULT: usize = 500;
const PAGE_SIZE_MAX: usize = 5000;
/// A page stops growing at this many encoded bytes, well under gRPC's 4 MiB message limit.
const PAGE_BYTES_MAX: usize = 2 << 20;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);
const ADDR_BYTES_MAX: usize = 255;
/// Join tokens live at most this long (a day, as kubeadm's default).
const JOIN_TOKEN_TTL_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// Drains may run at most this long before attempts are stopped.
const DRAIN_DEADLINE_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct AdminService {
    pub node: Arc<Node>,
}

/// Where a request is served.
enum Route {
    Local,
    Leader(AdminClient<Channel>),
}

fn rejected(error: CommandError) -> Status {
    match error {
        CommandError::UnknownTask(_) => Status::not_found(error.to_string()),
        CommandError::IdempotencyConflict { .. } => Status::already_exists(error.to_string()),
        CommandError::DependencyEnded { .. } | CommandError::AlreadyFinished { .. } => Status::failed_precondition(error.to_string()),
        CommandError::InvalidSpec(_)
        | CommandError::UnknownDependency(_)
        | CommandError::DeadlinePassed { .. }
        | CommandError::BatchTooLarge { .. }
        | CommandError::TooLong { .. } => Status::invalid_argument(error.to_string()),
        CommandError::UnknownExecutor(_) => Status::not_found(error.to_string()),
        CommandError::ExecutorState { .. } | CommandError::CapacityBelowAllocated { .. } | CommandError::CaExists => {
            Status::failed_precondition(error.to_string())
        }
        CommandError::TooMany { .. } => Status::resource_exhausted(error.to_string()),
        CommandError::InvalidJoinToken => Status::permission_denied(error.to_string()),
        CommandError::AdmissionRaced { .. } => Status::aborted(error.to_string()),
        CommandError::StaleReport { .. } => Status::failed_precondition(error.to_string()),
    }
}

fn propose_failed(error: ProposeError) -> Status {
    match error {
        ProposeError::Rejected(e) => rejected(e),
        ProposeError::NotLeader => Status::unavailable("leadership changed while the request was in flight; retry"),
        ProposeError::Raft(e) => Status::unavailable(format!("outcome unknown: {e}")),
    }
}

fn is_stale(consistency: &Option<ReadConsistency>) -> bool {
    consistency.as_ref().is_some_and(|c| c.stale)
}

async fn forward<Req, Resp, F, Fut>(metrics: &Metrics, client: AdminClient<Channel>, request: Request<Req>, call: F) -> Result<Response<Resp>, Status>
where
    F: FnOnce(AdminClient<Channel>, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
{
    let mut forwarded = Request::new(request.into_inner());
    forwarded.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    forwarded.set_timeout(FORWARD_TIMEOUT);
    let started = std::time::Instant::now();
    let answered = tokio::time::timeout(FORWARD_TIMEOUT, call(client, forwarded)).await;
    metrics.agent_communication_seconds.with_label_values(&["server", "leader"]).observe(started.elapsed().as_secs_f64());
    match answered {
        Ok(Err(status)) if matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled) => {
            Err(Status::unavailable(format!("forwarding to the leader failed: {}", status.message())))
        }
        Ok(result) => result,
        Err(_) => Err(Status::unavailable("the leader did not answer in time; outcome unknown")),
    }
}

impl AdminService {
    fn metrics(&self) -> RaftMetrics<u64, BasicNode> {
        self.node.raft.metrics().borrow().clone()
    }

    /// Decides whether this server serves a leader-only request or forwards it. Runs on every
    /// request, so it borrows openraft's metrics rather than cloning them.
    fn route<T>(&self, request: &Request<T>) -> Result<Route, Status> {
        let leader_addr = {
            let metrics = self.node.raft.metrics();
            let metrics = metrics.borrow();
            if metrics.state == ServerState::Leader {
                return Ok(Route::Local);
            }
            if request.metadata().contains_key(FORWARDED) {
                return Err(Status::unavailable("this server is no longer the leader; retry"));
            }
            let leader = metrics.current_leader.ok_or_else(|| Status::unavailable("no leader is elected right now; retry shortly"))?;
            let node = metrics.membership_config.membership().get_node(&leader).ok_or_else(|| {
                Status::unavailable(format!("leader {leader} is not in this server's membership view; retry"))
            })?;
            node.addr.clone()
        };
        let client = self.node.peers.admin(&leader_addr).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Route::Leader(client))
    }

    /// Waits until this leader has confirmed its leadership with a quorum and applied everything
    /// committed before the read arrived.
    async fn read_barrier(&self) -> Result<(), Status> {
        self.node.raft.ensure_linearizable().await.map(|_| ()).map_err(|e| match e {
            RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)) => Status::unavailable("leadership changed during the read; retry"),
            RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => Status::unavailable(format!("leader cannot reach a quorum: {q}")),
            RaftError::Fatal(f) => Status::unavailable(format!("raft stopped: {f}")),
        })
    }

    async fn propose(&self, command: Command) -> Result<Outcome, Status> {
        self.node.proposer.propose(command).await.map_err(propose_failed)
    }

    async fn reachable(&self, addr: &str) -> bool {
        let Ok(mut client) = self.node.peers.admin(addr) else { return false };
        matches!(tokio::time::timeout(PROBE_TIMEOUT, client.cluster_info(pb::ClusterInfoRequest {})).await, Ok(Ok(_)))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn submit_task(&self, request: Request<pb::SubmitTaskRequest>) -> Result<Response<pb::SubmitTaskResponse>, Status> {
        if let Route::Leader(client) = self.route(&request)? {
            return forward(&self.node.metrics, client, request, |mut c, r| async move { c.submit_task(r).await }).await;
        }
        let started = std::time::Instant::now();
        let spec = request.into_inner().spec.ok_or_else(|| Status::invalid_argument("missing spec"))?;
        let spec = TaskSpec::try_from(spec).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let limits = self.node.state().machine.limits().clone();
        spec.validate(&limits).map_err(|e| Status::invalid_argument(format!("invalid task: {e}")))?;
        let outcome = self.propose(Command::SubmitTask(spec)).await;
        self.node.metrics.submit_seconds.observe(started.elapsed().as_secs_f64());
        self.node.scheduler_wake.notify_one();
        match outcome? {
            Outcome::Submitted { task, existing } => Ok(Response::new(pb::SubmitTaskResponse { task: Some((&task).into()), existing })),
            other => Err(Status::internal(format!("submit produced {other:?}"))),
        }
    }

    async fn get_task(&self, request: Request<pb::GetTaskRequest>) -> Result<Response<pb::GetTaskResponse>, Status> {
        if !is_stale(&request.get_ref().consistency) {
            if let Route::Leader(client) = self.route(&request)? {
                return forward(&self.node.metrics, client, request, |mut c, r| async move { c.get_task(r).await }).await;
            }
            self.read_barrier().await?;
        }
        let id = TaskId(request.into_inner().id);
        let state = self.node.state();
        let task = state.machine.get_task(id).ok_or_else(|| Status::not_found(format!("task {id} does not exist")))?;
        let applied_index = state.last_applied.map_or(0, |l| l.index);
        Ok(Response::new(pb::GetTaskResponse { task: Some(task.into()), applied_index }))
    }

    async fn list_tasks(&self, request: Request<pb::ListTasksRequest>) -> Result<Response<pb::ListTasksResponse>, Status> {
        if !is_stale(&request.get_ref().consistency) {
            if let Route::Leader(client) = self.route(&request)? {
                return forward(&self.node.metrics, client, request, |mut c, r| async move { c.list_tasks(r).await }).await;
            }
            self.read_barrier().await?;
        }
        let request = request.into_inner();
        let state_filter = task_state_from_proto(request.state).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let limit = match request.page_size as usize {
            0 => PAGE_SIZE_DEFAULT,
            n => n.min(PAGE_SIZE_MAX),
        };
        let filter = TaskFilter { state: state_filter, after: (request.after_id > 0).then_some(TaskId(request.after_id)), limit };
        let state = self.node.state();
        let found = state.machine.list_tasks(&filter);
        let mut tasks = Vec::with_capacity(found.len());
        let mut page_bytes = 0;
        for task in &found {
            let task = pb::Task::from(task);
            page_bytes += prost::Message::encoded_len(&task);
            if page_bytes > PAGE_BYTES_MAX && !tasks.is_empty() {
                break;
            }
            tasks.push(task);
        }
        let full = tasks.len() < found.len() || tasks.len() == limit;
        let next_after_id = if full { tasks.last().map_or(0, |t| t.id) } else { 0 };
        Ok(Response::new(pb::ListTasksResponse { tasks, next_after_id, applied_index: state.last_applied.map_or(0, |l| l.index) }))
    }

    async fn cancel_task(&self, request: Request<pb::CancelTaskRequest>) -> Result<Response<pb::CancelTaskResponse>, Status> {
        if let Route::Leader(client) = self.route(&request)? {
            return forward(&self.node.metrics, client, request, |mut c, r| async move { c.cancel_task(r).await }).await;
        }
        let request = request.into_inner();
        let limits = self.node.state().machine.limits().clone();
        if request.reason.len() > limits.arg_bytes_max {
            return Err(Status::invalid_argument(format!("reason is {} bytes; the limit is {}", request.reason.len(), limits.arg_bytes_max)));
        }
        match self.propose(Command::CancelTask { id: TaskId(request.id), reason: request.reason }).await? {
            Outcome::Cancelled { task, cascaded } => Ok(Response::new(pb::CancelTaskResponse {
                task: Some((&task).into()),
                cascaded: cascaded.into_iter().map(|id| id.0).collect(),
            })),
            other => Err(Status::internal(format!("cancel produced {other:?}"))),
        }
    }

    async fn cluster_status(&self, _request: Request<pb::ClusterStatusRequest>) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let metrics = self.metrics();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let probes = membership.nodes().map(|(&id, node)| {
            let addr = node.addr.clone();
            async move {
                let reachable = id == self.node.id || self.reachable(&addr).await;
                (id, addr, reachable)
            }
        });
        let probed = futures::future::join_all(probes).await;
        let matched: BTreeMap<u64, u64> =
            metrics.replication.iter().flatten().filter_map(|(id, log_id)| log_id.map(|l| (*id, l.index))).collect();
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
        let tasks_by_state = state.machine.count_by_state().into_iter().map(|(s, n)| (s.as_str().to_owned(), n)).collect();
        let mut executors_by_state: std::collections::HashMap<String, u64> = Default::default();
        for executor in state.machine.executors() {
            *executors_by_state.entry(executor.state.as_str().to_owned()).or_default() += 1;
        }
        Ok(Response::new(pb::ClusterStatusResponse {
            cluster_id: self.node.cluster_id.clone(),
            node_id: self.node.id,
            state: format!("{:?}", metrics.state).to_lowercase(),
            leader_id: metrics.current_leader,
            term: metrics.current_term,
            commit_index: self.node.log.committed_index().unwrap_or(0),
            applied_index: metrics.last_applied.map_or(0, |l| l.index),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            snapshot_index: metrics.snapshot.map(|l| l.index),
            purged_index: metrics.purged.map(|l| l.index),
            members,
            joint: membership.get_joint_config().len() > 1,
            task_count: state.machine.task_count() as u64,
            tasks_by_state,
            rss_bytes: crate::node::rss_bytes(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            executors_by_state,
        }))
    }

    async fn cluster_info(&self, _request: Request<pb::ClusterInfoRequest>) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        let metrics = self.metrics();
        let members = metrics.membership_config.membership().nodes().map(|(&id, node)| (id, node.addr.clone())).collect();
        Ok(Response::new(pb::ClusterInfoResponse {
            cluster_id: self.node.cluster_id.clone(),
            node_id: self.node.id,
            leader_id: metrics.current_leader,
            members,
        }))
    }

    async fn join_cluster(&self, request: Request<pb::JoinClusterRequest>) -> Result<Response<pb::JoinClusterResponse>, Status> {
        if let Route::Leader(client) = self.route(&request)? {
            return forward(&self.node.metrics, client, request, |mut c, r| async move { c.join_cluster(r).await }).await;
        }
        let request = request.into_inner();
        if request.cluster_id != self.node.cluster_id {
            return Err(Status::failed_precondition(format!(
                "the joining server belongs to cluster {:?}; this is cluster {}",
                request.cluster_id, self.node.cluster_id
            )));
        }
        if request.node_id == 0 {
            return Err(Status::invalid_argument("node id 0 is reserved; use 1 or more"));
        }
        if request.addr.is_empty() || request.addr.len() > ADDR_BYTES_MAX {
            return Err(Status::invalid_argument(format!("address must be 1..={ADDR_BYTES_MAX} bytes")));
        }
        let id = request.node_id;
        let metrics = self.metrics();
        let membership = metrics.membership_config.membership();
        for (&member, node) in membership.nodes() {
            if member == id && node.addr != request.addr {
                return Err(Status::already_exists(format!("node id {id} is already a member at {}; pick another id", node.addr)));
            }
            if member != id && node.addr == request.addr {
                return Err(Status::already_exists(format!("{} is already member {member}'s address", request.addr)));
            }
        }
        let is_voter = membership.voter_ids().any(|v| v == id);
        let is_member = membership.get_node(&id).is_some();
        let reply = || Response::new(pb::JoinClusterResponse { cluster_id: self.node.cluster_id.clone(), leader_id: self.node.id });
        if is_voter {
            return Ok(reply());
        }
        if !is_member {
            tracing::info!(node_id = id, addr = %request.addr, "adding learner; waiting for it to catch up");
            let add = self.node.raft.add_learner(id, BasicNode::new(&request.addr), true);
            tokio::time::timeout(CATCH_UP_TIMEOUT, add)
                .await
                .map_err(|_| Status::deadline_exceeded(format!("node {id} did not catch up within {CATCH_UP_TIMEOUT:?}")))?
                .map_err(membership_failed)?;
        }
        tracing::info!(node_id = id, "promoting learner to voter");
        self.node.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await.map_err(membership_failed)?;
        Ok(reply())
    }

    async fn remove_node(&self, request: Request<pb::RemoveNodeRequest>) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        if let Route::Leader(client) = self.route(&request)? {
            return forward(&self.node.metrics, client, request, |mut c, r| async move { c.remove_node(r).await }).await;
        }
        let id = request.into_inner().node_id;
        let metrics = self.metrics();
        let membership = metrics.membership_config.membership();
        if membership.get_node(&id).is_none() {
            return Err(Status::not_found(format!("node {id} is not a member")));
        }
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(Status::failed_precondition(format!("node {id} is the last voter; removing it would leave no cluster")));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        tracing::info!(node_id = id, "removing node");
        let response = self.node.raft.change_membership(change, false).await.map_err(membership_failed)?;
        let voters = response.membership.map(|m| m.voter_ids().collect()).unwrap_or_default();
        Ok(Response::new(pb::RemoveNodeResponse { leader_id: self.node.id, voters }))
    }

    async fn create_join_token(&self, request: Request<pb::CreateJoinTokenRequest>) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        if let Route::Leader(client) = self.route(&request)? {
            return forward(&self.node.metrics, client, request, |mut c, r| async move { c.create_join_token(r).await }).await;
        }
        let ttl = Duration::from_millis(request.into_inner().ttl_ms);
        if ttl.is_zero() || ttl > JOIN_TOKEN_TTL_MAX {
            return Err(Status::invalid_argument(format!("ttl must be between 1ms and {}", humanize(JOIN_TOKEN_TTL_MAX))));
        }
        let record = self.node.state().machine.ca().cloned().ok_or_else(|| Status::unavailable("the cluster CA is not created yet; retry"))?;
        let ca = colony_quic::ClusterCa::from_pem(&record.cert_pem, &record.key_pem).map_err(|e| Status::internal(format!("cluster CA: {e}")))?;
        let token = colony_quic::JoinToken::generate(&ca);
        let expires_unix_ms = unix_ms() + ttl.as_millis() as u64;
        self.propose(Command::CreateJoinToken { secret_hash: token.secret_hash(), expires_unix_ms }).await?;
        Ok(Response::new(pb::CreateJoinTokenResponse { token: token.to_string(), expires_unix_ms }))
    }

    async fn list_executors(&self, request: Request<pb::ListExecutorsRequest>) -> Result<Response<pb::ListExecutorsResponse>, Status> {
        if !is_stale(&request.get_ref().consistency) {
            if let Route::Leader(client) = self.route(&request)? {
                return forward(&self.node.metrics, client, request, |mut c, r| async move { c.list_executors(r).await }).await;
            }
            self.read_barrier().await?;
        }
        let state = self.node.state();
        let executors = state.machine.executors().map(|e| self.executor_view(e)).collect();
        Ok(Response::new(pb::ListExecutorsResponse { executors, applied_index: state.last_applied.map_or(0, |l| l.index) }))
    }

    async fn drain_executor(&self, request: Request<pb::DrainExecutorRequest>) -> Result<Response<pb::DrainExecutorResponse>, Status> {
        if let Route::Leader(client) = self.route(&request)? {
            return forward(&self.node.metrics, client, request, |mut c, r| async move { c.drain_executor(r).await }).await;
        }
        let request = request.into_inner();
        let deadline = Duration::from_millis(request.deadline_ms);
        if deadline > DRAIN_DEADLINE_MAX {
            return Err(Status::invalid_argument(format!("the drain deadline may be at most {}", humanize(DRAIN_DEADLINE_MAX))));
        }
        let id = ExecutorId(request.id);
        let deadline_unix_ms = unix_ms() + deadline.as_millis() as u64;
        self.propose(Command::DrainExecutor { id, deadline_unix_ms }).await?;
        self.node.scheduler_wake.notify_one();
        let state = self.node.state();
        let executor = state.machine.get_executor(id).ok_or_else(|| Status::not_found(format!("executor {id} does not exist")))?;
        Ok(Response::new(pb::DrainExecutorResponse { executor: Some(self.executor_view(executor)) }))
    }
}

fn humanize(duration: Duration) -> String {
    format!("{}h", duration.as_secs() / 3600)
}

impl AdminService {
    fn executor_view(&self, executor: &colony_core::Executor) -> pb::Executor {
        let age = self.node.sessions.heartbeat_age(executor.id).map(|age| age.as_millis() as u64);
        executor_to_proto(executor, age)
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn membership_failed(error: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Status {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => Status::unavailable("leadership changed; retry"),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(p))) => {
            Status::unavailable(format!("another membership change is in progress; retry ({p})"))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => Status::failed_precondition(e.to_string()),
        RaftError::Fatal(f) => Status::unavailable(format!("raft stopped: {f}")),
    }
}
