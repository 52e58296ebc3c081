//! The one path every admin RPC takes: who is calling and whether they may (authentication and
//! authorization), where it is served (forwarded once to the leader, or here after a read
//! barrier), under which deadline, and the audit line it leaves.

use super::auth::{authenticate, Caller, Refused, CALLER, REQUEST_ID, SOURCE, TRACEPARENT};
use super::targets::Target;
use super::AdminService;
use crate::audit::{now_rfc3339, Record};
use crate::proposer::ProposeError;
use crate::tls::ConnInfo;
use colony_client::Channel;
use colony_core::{CommandError, MessageError, Permission};
use colony_proto::pb;
use colony_proto::pb::admin_client::AdminClient;
use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::ServerState;
use std::future::Future;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// Set on a request one server forwards to another, so it is never forwarded twice.
const FORWARDED: &str = "x-colony-forwarded";
/// The longest any RPC is served or forwarded; a client's shorter `grpc-timeout` wins.
const DEADLINE_MAX: Duration = Duration::from_secs(15);
/// Joins wait for a new server to catch up, which may take this long.
pub const JOIN_DEADLINE_MAX: Duration = Duration::from_secs(150);
/// The longest a follower waits to learn a token it does not know (read-your-token).
const TOKEN_CATCH_UP_MAX: Duration = Duration::from_secs(2);

/// Where an RPC is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serve {
    /// On the leader; a follower forwards it: writes.
    Leader,
    /// A read: on the leader after confirming leadership (linearizable), unless `stale`, when
    /// this server's applied state answers.
    Read { stale: bool },
    /// Where it arrives: cluster status and identity, digests, the finished-task feed.
    Here,
}

/// One admin RPC, as the routing path sees it.
#[derive(Clone, Copy, Debug)]
pub struct Rpc {
    pub name: &'static str,
    pub serve: Serve,
    pub deadline_max: Duration,
    /// What the caller needs; `None` for the two anonymous RPCs (BootstrapAcl, Enroll), which
    /// carry their own proof. A task permission is checked here for the role and by the handler
    /// for the task's namespace.
    pub permission: Option<Permission>,
}

impl Rpc {
    pub const fn new(name: &'static str, serve: Serve, permission: Permission) -> Rpc {
        Rpc { name, serve, deadline_max: DEADLINE_MAX, permission: Some(permission) }
    }

    pub const fn anonymous(name: &'static str, serve: Serve) -> Rpc {
        Rpc { name, serve, deadline_max: DEADLINE_MAX, permission: None }
    }
}

impl AdminService {
    /// Serves `request` for `rpc`: forwards it to the leader with `forward`, or answers it here
    /// with `local`, within the deadline.
    pub(super) async fn serve<Req, Resp, F, FFut, L, LFut>(
        &self,
        rpc: Rpc,
        request: Request<Req>,
        forward: F,
        local: L,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Target,
        F: FnOnce(AdminClient<Channel>, Request<Req>) -> FFut,
        FFut: Future<Output = Result<Response<Resp>, Status>>,
        L: FnOnce(Caller, Req) -> LFut,
        LFut: Future<Output = Result<Resp, Status>>,
    {
        let started = Instant::now();
        let (caller, deadline) = match self.admit(&rpc, &request).await {
            Ok(admitted) => admitted,
            Err((caller, status)) => {
                self.audit(&rpc, &request, caller.as_ref(), Err(&status), started);
                return Err(status);
            }
        };
        let here = match rpc.serve {
            Serve::Here | Serve::Read { stale: true } => Ok(true),
            Serve::Leader | Serve::Read { stale: false } => self.leads(&request),
        };
        let (namespace, target) = (request.get_ref().namespace(), request.get_ref().target());
        let result = match here {
            Err(status) => Err(status),
            Ok(false) => {
                let result = self.forward(&caller, request, deadline, forward).await;
                // The leader served it and wrote its line (with this caller's source); only a
                // forwarding that failed here is this server's to record.
                if result.as_ref().err().is_none_or(|s| s.code() != tonic::Code::Unavailable) {
                    return result;
                }
                result
            }
            Ok(true) => {
                let barrier = rpc.serve == Serve::Read { stale: false };
                within(&rpc, deadline, async {
                    if barrier {
                        self.read_barrier().await?;
                    }
                    local(caller.clone(), request.into_inner()).await
                })
                .await
            }
        };
        let fields = (namespace, target);
        self.audit_fields(&rpc, fields, Some(&caller), result.as_ref().map(|_| ()), started);
        result
    }

    /// Serves an RPC that is always answered where it arrives (`Serve::Here`).
    pub(super) async fn serve_here<Req, Resp, L, LFut>(
        &self,
        rpc: Rpc,
        request: Request<Req>,
        local: L,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Target,
        L: FnOnce(Caller, Req) -> LFut,
        LFut: Future<Output = Result<Resp, Status>>,
    {
        debug_assert_eq!(rpc.serve, Serve::Here, "{} is routed with serve_here", rpc.name);
        let started = Instant::now();
        let (caller, deadline) = match self.admit(&rpc, &request).await {
            Ok(admitted) => admitted,
            Err((caller, status)) => {
                self.audit(&rpc, &request, caller.as_ref(), Err(&status), started);
                return Err(status);
            }
        };
        let fields = (request.get_ref().namespace(), request.get_ref().target());
        let result = within(&rpc, deadline, local(caller.clone(), request.into_inner())).await;
        self.audit_fields(&rpc, fields, Some(&caller), result.as_ref().map(|_| ()), started);
        result
    }

    /// Who calls `rpc`, whether they may, and the deadline it is served under; on a refusal, the
    /// caller when known, for the audit line.
    async fn admit<T>(
        &self,
        rpc: &Rpc,
        request: &Request<T>,
    ) -> Result<(Caller, Duration), (Option<Caller>, Status)> {
        let conn = request.extensions().get::<ConnInfo>();
        let caller = match authenticate(&self.node, conn, request.metadata()) {
            Ok(caller) => caller,
            // A token just created on the leader may not be applied here yet: learn how far the
            // leader has committed, apply that far, and look again.
            Err(Refused::UnknownToken) if !self.is_leader() => {
                self.catch_up_with_leader().await;
                authenticate(&self.node, conn, request.metadata())
                    .map_err(|refused| (None, refused.into()))?
            }
            Err(refused) => return Err((None, refused.into())),
        };
        if let Some(permission) = rpc.permission {
            let checked = match permission.namespaced() {
                // The handler checks the namespace; here, only that the role can do it at all.
                true => caller.require_role(permission),
                false => caller.require(permission, None),
            };
            if let Err(status) = checked {
                return Err((Some(caller), status));
            }
        }
        tracing::trace!(rpc = rpc.name, peer = ?caller.peer, "admin request");
        let deadline =
            client_deadline(request).map_or(rpc.deadline_max, |d| d.min(rpc.deadline_max));
        Ok((caller, deadline))
    }

    fn audit<T: Target>(
        &self,
        rpc: &Rpc,
        request: &Request<T>,
        caller: Option<&Caller>,
        result: Result<(), &Status>,
        started: Instant,
    ) {
        let fields = (request.get_ref().namespace(), request.get_ref().target());
        let peer = request.extensions().get::<ConnInfo>().and_then(|c| c.remote);
        let anonymous;
        let caller = match caller {
            Some(caller) => caller,
            None => {
                anonymous = Caller {
                    peer,
                    principal: super::auth::Principal::Anonymous,
                    request_id: super::auth::new_request_id(),
                    forwarded: false,
                    traceparent: None,
                };
                &anonymous
            }
        };
        self.audit_fields(rpc, fields, Some(caller), result, started);
    }

    /// Writes the request's audit line, before the request is answered.
    fn audit_fields(
        &self,
        rpc: &Rpc,
        (namespace, target): (Option<String>, Option<String>),
        caller: Option<&Caller>,
        result: Result<(), &Status>,
        started: Instant,
    ) {
        let (outcome, code) = match result {
            Ok(()) => ("ok", None),
            Err(status) => match status.code() {
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                    ("denied", Some(format!("{:?}", status.code())))
                }
                code => ("error", Some(format!("{code:?}"))),
            },
        };
        let record = Record {
            time: now_rfc3339(),
            request_id: caller.map(|c| c.request_id.clone()).unwrap_or_default(),
            node: self.node.id(),
            rpc: rpc.name.to_owned(),
            outcome: outcome.to_owned(),
            code,
            accessor: caller.and_then(|c| c.accessor().map(str::to_owned)),
            role: caller.and_then(|c| c.grant().map(|g| g.role.to_string())),
            certificate: caller.and_then(Caller::certificate),
            namespace: namespace.map(bounded),
            target: target.map(bounded),
            source: caller.and_then(|c| c.peer.map(|p| p.to_string())),
            forwarded: caller.is_some_and(|c| c.forwarded),
            duration_ms: (started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
        };
        // Written before the request is answered.
        self.node.audit().record(&record);
    }

    pub(super) fn is_leader(&self) -> bool {
        self.node.raft().metrics().borrow().state == ServerState::Leader
    }

    /// Whether this server leads; `Unavailable` when it cannot say who does or the request was
    /// already forwarded once.
    fn leads<T>(&self, request: &Request<T>) -> Result<bool, Status> {
        if self.is_leader() {
            return Ok(true);
        }
        if request.metadata().contains_key(FORWARDED) {
            return Err(Status::unavailable("this server is no longer the leader; retry"));
        }
        Ok(false)
    }

    fn leader_client(&self) -> Result<AdminClient<Channel>, Status> {
        let leader_addr = {
            let metrics = self.node.raft().metrics();
            let metrics = metrics.borrow();
            let leader = metrics.current_leader.ok_or_else(|| {
                Status::unavailable("no leader is elected right now; retry shortly")
            })?;
            let node =
                metrics.membership_config.membership().get_node(&leader).ok_or_else(|| {
                    Status::unavailable(format!(
                        "leader {leader} is not in this server's membership view; retry"
                    ))
                })?;
            node.addr.clone()
        };
        self.node.peers().admin(&leader_addr).map_err(|e| Status::internal(e.to_string()))
    }

    async fn forward<Req, Resp, F, Fut>(
        &self,
        caller: &Caller,
        request: Request<Req>,
        deadline: Duration,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(AdminClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let client = self.leader_client()?;
        let mut forwarded = Request::new(request.into_inner());
        let metadata = forwarded.metadata_mut();
        metadata.insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
        // Both are plain ASCII the server made (an accessor is hex, a holder `learner-3`).
        if let Ok(value) = caller.forwarded_as().parse() {
            metadata.insert(CALLER, value);
        }
        if let Ok(value) = caller.request_id.parse() {
            metadata.insert(REQUEST_ID, value);
        }
        if let Some(Ok(value)) = caller.peer.map(|peer| peer.to_string().parse()) {
            metadata.insert(SOURCE, value);
        }
        if let Some(Ok(value)) = caller.traceparent.as_deref().map(str::parse) {
            metadata.insert(TRACEPARENT, value);
        }
        forwarded.set_timeout(deadline);
        let started = Instant::now();
        let answered = tokio::time::timeout(deadline, call(client, forwarded)).await;
        self.node
            .metrics()
            .agent_communication_seconds
            .with_label_values(&["server", "leader"])
            .observe(started.elapsed().as_secs_f64());
        match answered {
            Ok(Err(status))
                if matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled) =>
            {
                Err(Status::unavailable(format!(
                    "forwarding to the leader failed: {}",
                    status.message()
                )))
            }
            Ok(result) => result,
            Err(_) => {
                Err(Status::unavailable("the leader did not answer in time; outcome unknown"))
            }
        }
    }

    /// Waits (at most [`TOKEN_CATCH_UP_MAX`]) until this follower has applied everything the
    /// leader had committed when asked. Best effort: when the leader cannot be asked, the caller
    /// is judged on what this server has.
    async fn catch_up_with_leader(&self) {
        let caught_up = async {
            let mut leader = self.leader_client().ok()?;
            let info = leader.cluster_info(pb::ClusterInfoRequest {}).await.ok()?.into_inner();
            let wait = self.node.raft().wait(Some(TOKEN_CATCH_UP_MAX));
            wait.applied_index_at_least(Some(info.commit_index), "a token's creation").await.ok()
        };
        if tokio::time::timeout(TOKEN_CATCH_UP_MAX, caught_up).await.ok().flatten().is_none() {
            tracing::debug!("could not catch up with the leader to look a token up again");
        }
    }

    /// Waits until this leader has confirmed its leadership with a quorum and applied everything
    /// committed before the read arrived.
    pub(super) async fn read_barrier(&self) -> Result<(), Status> {
        self.node.raft().ensure_linearizable().await.map(|_| ()).map_err(|e| match e {
            RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)) => {
                Status::unavailable("leadership changed during the read; retry")
            }
            RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
                Status::unavailable(format!("leader cannot reach a quorum: {q}"))
            }
            RaftError::Fatal(f) => Status::unavailable(format!("raft stopped: {f}")),
        })
    }
}

/// What a request names, cut to a bound: an audit line never grows with a client's input (the
/// request is refused by its own checks, but its line is written either way).
fn bounded(mut text: String) -> String {
    const AUDIT_FIELD_BYTES_MAX: usize = 256;
    if text.len() > AUDIT_FIELD_BYTES_MAX {
        let mut end = AUDIT_FIELD_BYTES_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

async fn within<Resp>(
    rpc: &Rpc,
    deadline: Duration,
    served: impl Future<Output = Result<Resp, Status>>,
) -> Result<Response<Resp>, Status> {
    match tokio::time::timeout(deadline, served).await {
        Ok(result) => result.map(Response::new),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "{} did not finish within {deadline:?}",
            rpc.name
        ))),
    }
}

/// The client's deadline from its `grpc-timeout` header (`<digits><unit>`, units H M S m u n).
fn client_deadline<T>(request: &Request<T>) -> Option<Duration> {
    parse_grpc_timeout(request.metadata().get("grpc-timeout")?.to_str().ok()?)
}

fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    // The spec allows at most 8 digits, so the value fits a u64 in every unit.
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC status for a command the state machine refused.
pub fn rejected(error: CommandError) -> Status {
    match error {
        CommandError::UnknownTask(_)
        | CommandError::UnknownExecutor(_)
        | CommandError::UnknownModel(_)
        | CommandError::UnknownWorkflow(_) => Status::not_found(error.to_string()),
        CommandError::IdempotencyConflict { .. } => Status::already_exists(error.to_string()),
        CommandError::DependencyEnded { .. }
        | CommandError::AlreadyFinished { .. }
        | CommandError::ExecutorState { .. }
        | CommandError::CapacityBelowAllocated { .. }
        | CommandError::CaExists
        | CommandError::StaleReport { .. }
        | CommandError::WorkflowFinished { .. }
        | CommandError::WorkflowRunning(_) => Status::failed_precondition(error.to_string()),
        CommandError::InvalidSpec(_)
        | CommandError::UnknownDependency(_)
        | CommandError::DeadlinePassed { .. }
        | CommandError::BatchTooLarge { .. }
        | CommandError::TooLong { .. }
        | CommandError::InvalidModel(_)
        | CommandError::InvalidWorkflow(_) => Status::invalid_argument(error.to_string()),
        CommandError::TooMany { .. } => Status::resource_exhausted(error.to_string()),
        CommandError::InvalidJoinToken { .. } => Status::permission_denied(error.to_string()),
        CommandError::AclAlreadyBootstrapped => Status::failed_precondition(error.to_string()),
        CommandError::UnknownAccessor(_) => Status::not_found(error.to_string()),
        CommandError::AclTokenExists => Status::already_exists(error.to_string()),
        CommandError::AdmissionRaced { .. } => Status::aborted(error.to_string()),
        CommandError::InvalidAgent(_) => Status::invalid_argument(error.to_string()),
        CommandError::UnknownAgent(_) => Status::not_found(error.to_string()),
        CommandError::StaleAttempt { .. } | CommandError::NotForAttempts(_) => {
            Status::permission_denied(error.to_string())
        }
        CommandError::Message(e) => match e {
            MessageError::Invalid { .. } | MessageError::TooLong { .. } => {
                Status::invalid_argument(e.to_string())
            }
            MessageError::TopicFull { .. }
            | MessageError::StoreFull { .. }
            | MessageError::TooManyTopics { .. }
            | MessageError::TooManyConsumers { .. } => Status::resource_exhausted(e.to_string()),
            MessageError::UnknownTopic(_) => Status::not_found(e.to_string()),
            MessageError::KeyConflict { .. } => Status::already_exists(e.to_string()),
        },
    }
}

pub fn propose_failed(error: ProposeError) -> Status {
    match error {
        ProposeError::Rejected(e) => rejected(e),
        ProposeError::NotLeader => {
            Status::unavailable("leadership changed while the request was in flight; retry")
        }
        ProposeError::Raft(e) => Status::unavailable(format!("outcome unknown: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_fields_are_bounded_on_a_character_boundary() {
        assert_eq!(bounded("short".to_owned()), "short");
        let long = bounded("é".repeat(300));
        assert!(long.len() <= 256 + '…'.len_utf8() && long.ends_with('…'), "{}", long.len());
    }

    #[test]
    fn grpc_timeouts_parse_and_bad_ones_are_ignored() {
        assert_eq!(parse_grpc_timeout("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "10", "10x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
