//! The one path every admin RPC takes: who is calling (the hook authentication and authorization
//! plug into), where it is served (forwarded once to the leader, or here after a read barrier),
//! and under which deadline.

use super::AdminService;
use crate::proposer::ProposeError;
use colony_core::CommandError;
use colony_proto::pb::admin_client::AdminClient;
use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::ServerState;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Set on a request one server forwards to another, so it is never forwarded twice.
const FORWARDED: &str = "x-colony-forwarded";
/// The longest any RPC is served or forwarded; a client's shorter `grpc-timeout` wins.
const DEADLINE_MAX: Duration = Duration::from_secs(15);
/// Joins wait for a new server to catch up, which may take this long.
pub const JOIN_DEADLINE_MAX: Duration = Duration::from_secs(150);

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
}

impl Rpc {
    pub const fn new(name: &'static str, serve: Serve) -> Rpc {
        Rpc { name, serve, deadline_max: DEADLINE_MAX }
    }
}

/// Who is calling. The security issue adds the verified token and role here; `caller` is where
/// they are read and checked for every RPC.
#[derive(Clone, Debug)]
pub struct Caller {
    pub peer: Option<SocketAddr>,
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
        F: FnOnce(AdminClient<Channel>, Request<Req>) -> FFut,
        FFut: Future<Output = Result<Response<Resp>, Status>>,
        L: FnOnce(Caller, Req) -> LFut,
        LFut: Future<Output = Result<Resp, Status>>,
    {
        let (caller, deadline) = admit(&rpc, &request)?;
        let here = match rpc.serve {
            Serve::Here | Serve::Read { stale: true } => true,
            Serve::Leader | Serve::Read { stale: false } => self.leads(&request)?,
        };
        if !here {
            return self.forward(request, deadline, forward).await;
        }
        let barrier = rpc.serve == Serve::Read { stale: false };
        within(&rpc, deadline, async {
            if barrier {
                self.read_barrier().await?;
            }
            local(caller, request.into_inner()).await
        })
        .await
    }

    /// Serves an RPC that is always answered where it arrives (`Serve::Here`).
    pub(super) async fn serve_here<Req, Resp, L, LFut>(
        &self,
        rpc: Rpc,
        request: Request<Req>,
        local: L,
    ) -> Result<Response<Resp>, Status>
    where
        L: FnOnce(Caller, Req) -> LFut,
        LFut: Future<Output = Result<Resp, Status>>,
    {
        debug_assert_eq!(rpc.serve, Serve::Here, "{} is routed with serve_here", rpc.name);
        let (caller, deadline) = admit(&rpc, &request)?;
        within(&rpc, deadline, local(caller, request.into_inner())).await
    }

    /// Whether this server leads; `Unavailable` when it cannot say who does or the request was
    /// already forwarded once.
    fn leads<T>(&self, request: &Request<T>) -> Result<bool, Status> {
        let metrics = self.node.raft().metrics();
        let metrics = metrics.borrow();
        if metrics.state == ServerState::Leader {
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
        forwarded
            .metadata_mut()
            .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
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

    /// Waits until this leader has confirmed its leadership with a quorum and applied everything
    /// committed before the read arrived.
    async fn read_barrier(&self) -> Result<(), Status> {
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

/// Who calls `rpc`, and the deadline it is served under. Authentication and authorization go
/// here, for every RPC.
fn admit<T>(rpc: &Rpc, request: &Request<T>) -> Result<(Caller, Duration), Status> {
    let caller = Caller { peer: request.remote_addr() };
    tracing::trace!(rpc = rpc.name, peer = ?caller.peer, "admin request");
    let deadline = client_deadline(request).map_or(rpc.deadline_max, |d| d.min(rpc.deadline_max));
    Ok((caller, deadline))
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
        | CommandError::UnknownModel(_) => Status::not_found(error.to_string()),
        CommandError::IdempotencyConflict { .. } => Status::already_exists(error.to_string()),
        CommandError::DependencyEnded { .. }
        | CommandError::AlreadyFinished { .. }
        | CommandError::ExecutorState { .. }
        | CommandError::CapacityBelowAllocated { .. }
        | CommandError::CaExists
        | CommandError::StaleReport { .. } => Status::failed_precondition(error.to_string()),
        CommandError::InvalidSpec(_)
        | CommandError::UnknownDependency(_)
        | CommandError::DeadlinePassed { .. }
        | CommandError::BatchTooLarge { .. }
        | CommandError::TooLong { .. }
        | CommandError::InvalidModel(_) => Status::invalid_argument(error.to_string()),
        CommandError::TooMany { .. } => Status::resource_exhausted(error.to_string()),
        CommandError::InvalidJoinToken => Status::permission_denied(error.to_string()),
        CommandError::AdmissionRaced { .. } => Status::aborted(error.to_string()),
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
