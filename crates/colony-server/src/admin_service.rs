//! The operator API. Any server answers: writes and linearizable reads run on the leader (a
//! follower forwards them once), stale reads and cluster status run where they arrive.

use crate::metrics::Metrics;
use crate::node::{unix_ms, Node};
use crate::proposer::ProposeError;
use colony_core::{Command, CommandError, ExecutorId, Outcome, TaskFilter, TaskId, TaskSpec};
use colony_proto::convert::{executor_to_proto, model_metrics_from_proto, model_to_proto, task_state_from_proto};
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
/// Finished tasks sent per read of the state while following the feed.
const WATCH_BATCH_MAX: usize = 256;
/// Messages buffered towards one watcher; a slow watcher makes the feed wait, not grow.
const WATCH_BUFFER_MAX: usize = 1024;
/// How often a caught-up watch looks for newly finished tasks.
const WATCH_POLL: Duration = Duration::from_millis(200);

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
        CommandError::UnknownModel(_) => Status::not_found(error.to_string()),
        CommandError::InvalidModel(_) => Status::invalid_argument(error.to_string()),
    }
}

fn propose_failed(error: ProposeError) -> Status {
    match error {
        ProposeError::Rejected(e) => rejected(e),
        ProposeError::NotLeader => Status::unavailable("leadership changed while the request was in flight; retry"),
        ProposeError::Raft(e) => Status::unavailable(format!("outcome unknown: {e}")),
    }
}

impl AdminService {
    /// Whether a read is served from this server's applied state without asking the leader:
    /// when the client asked for a stale read, or always under `--unsafe-stale-reads`.
    fn serve_locally(&self, consistency: &Option<ReadConsistency>) -> bool {
        self.node.config.unsafe_stale_reads || consistency.as_ref().is_some_and(|c| c.stale)
    }
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

/// Streams finished tasks to one watcher from its applied state until the watcher goes away.
async fn follow_finished(node: Arc<Node>, mut after_seq: u64, tx: tokio::sync::mpsc::Sender<Result<pb::FinishedTask, Status>>) {
    loop {
        let batch: Vec<pb::FinishedTask> = {
            let state = node.state();
            state
                .machine
                .finished_after(after_seq)
                .take(WATCH_BATCH_MAX)
                .map(|(seq, task)| pb::FinishedTask {
                    seq,
                    task: Some(task.into()),
                    executor: task.executor.and_then(|e| state.machine.get_executor(e)).map(|e| executor_to_proto(e, None)),
                })
                .collect()
        };
        if batch.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(WATCH_POLL) => {}
                _ = tx.closed() => return,
            }
            continue;
        }
        for item in batch {
            after_seq = item.seq;
            if tx.send(Ok(item)).await.is_err() {
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    type WatchFinishedTasksStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::FinishedTask, Status>> + Send>>;

    async fn watch_finished_tasks(&self, request: Request<pb::WatchFinishedTasksRequest>) -> Result<Response<Self::WatchFinishedTasksStream>, Status> {
        let after_seq = request.into_inner().after_seq;
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER_MAX);
        tokio::spawn(follow_finished(self.node.clone(), after_seq, tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn publish_model(&self, request: Request<pb::PublishModelRequest>) -> Result<Response<pb::PublishModelResponse>, Status> {
        if let Route::Leader(client) = self.route(&request)? {
            return forward(&self.node.metrics, client, request, |mut c, r| async move { c.publish_model(r).await }).await;
        }
        let request = request.into_inner();
        let token: colony_quic::JoinToken = request.token.parse().map_err(|e| Status::unauthenticated(format!("invalid token: {e}")))?;
        if !self.node.state().machine.join_token_valid(&token.secret_hash()) {
            return Err(Status::permission_denied("the token is unknown or has expired"));
        }
        let model = request.model.ok_or_else(|| Status::invalid_argument("missing model"))?;
        let metrics = model.metrics.as_ref().map(model_metrics_from_proto).ok_or_else(|| Status::invalid_argument("missing model metrics"))?;
        // The scheduler must be able to use what is published: decode and check it here, so a
        // bad model is refused at the door and never reaches the registry.
        colony_model::Predictor::from_model(&model.feature_schema, &model.weights).map_err(|e| Status::invalid_argument(format!("invalid model: {e}")))?;
        let command = Command::PublishModel { device: model.device, feature_schema: model.feature_schema, weights: model.weights, metrics };
        match self.propose(command).await? {
            Outcome::ModelPublished { version } => {
                tracing::info!(%version, "model published");
                Ok(Response::new(pb::PublishModelResponse { version: version.0 }))
            }
            other => Err(Status::internal(format!("publish produced {other:?}"))),
        }
    }

    async fn list_models(&self, request: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        if let Route::Leader(client) = self.route(&request)? {
            return forward(&self.node.metrics, client, request, |mut c, r| async move { c.list_models(r).await }).await;
        }
        self.read_barrier().await?;
        let state = self.node.state();
        let current = state.machine.current_model().map(|m| m.version);
        let models = state.machine.models().map(|m| model_to_proto(m, Some(m.version) == current, false)).collect();
        Ok(Response::new(pb::ListModelsResponse { models, current: current.map(|v| v.0) }))
    }

    async fn get_model(&self, request: Request<pb::GetModelRequest>) -> Result<Response<pb::GetModelResponse>, Status> {
        if let Route::Leader(client) = self.route(&request)? {
            return forward(&self.node.metrics, client, request, |mut c, r| async move { c.get_model(r).await }).await;
        }
        self.read_barrier().await?;
        let version = colony_core::ModelVersion(request.into_inner().version);
        let state = self.node.state();
        let model = state.machine.model(version).ok_or_else(|| Status::not_found(format!("model version {version} does not exist")))?;
        let current = state.machine.current_model().is_some_and(|m| m.version == version);
        Ok(Response::new(pb::GetModelResponse { model: Some(model_to_proto(model, current, true)) }))
    }

    async fn rollback_model(&self, request: Request<pb::RollbackModelRequest>) -> Result<Response<pb::RollbackModelResponse>, Status> {
        if let Route::Leader(client) = self.route(&request)? {
            return forward(&self.node.metrics, client, request, |mut c, r| async move { c.rollback_model(r).await }).await;
        }
        let version = colony_core::ModelVersion(request.into_inner().version);
        self.propose(Command::RollbackModel { version }).await?;
        tracing::info!(%version, "model rolled back");
        let state = self.node.state();
        let model = state.machine.model(version).ok_or_else(|| Status::not_found(format!("model version {version} does not exist")))?;
        Ok(Response::new(pb::RollbackModelResponse { model: Some(model_to_proto(model, true, false)) }))
    }

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
        if !self.serve_locally(&request.get_ref().consistency) {
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
        if !self.serve_locally(&request.get_ref().consistency) {
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
            Outcome::Cancelled { task, cascaded } => {
                let ended: Vec<TaskId> = std::iter::once(task.id).chain(cascaded.iter().copied()).collect();
                self.node.sessions.kill_superseded(&self.node, &ended, "cancelled");
                Ok(Response::new(pb::CancelTaskResponse {
                task: Some((&task).into()),
                    cascaded: cascaded.into_iter().map(|id| id.0).collect(),
                }))
            }
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

    async fn state_digest(&self, _request: Request<pb::StateDigestRequest>) -> Result<Response<pb::StateDigestResponse>, Status> {
        use sha2::Digest as _;
        let (applied_index, encoded, task_count) = {
            let state = self.node.state();
            let encoded = colony_store::codec::encode(&state.machine).map_err(|e| Status::internal(format!("cannot encode the state: {e}")))?;
            (state.last_applied.map_or(0, |l| l.index), encoded, state.machine.task_count() as u64)
        };
        let sha256 = hex::encode(sha2::Sha256::digest(&encoded));
        Ok(Response::new(pb::StateDigestResponse { node_id: self.node.id, applied_index, sha256, task_count }))
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
        if !self.serve_locally(&request.get_ref().consistency) {
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
