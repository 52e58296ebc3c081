//! Who is calling: a bearer token (an ACL token, looked up in this server's applied state), a
//! client certificate from the cluster CA, or, for a request another server forwarded, the
//! caller that server authenticated.

use crate::node::Node;
use crate::tls::ConnInfo;
use colony_core::{Command, ExecutorId, FencingToken, Grant, Permission, Role, TaskId, TaskState};
use colony_quic::{CertRole, Token};
use std::net::SocketAddr;
use tonic::metadata::MetadataMap;
use tonic::Status;

/// Set by a forwarding server: who it authenticated (trusted only from a server certificate).
pub const CALLER: &str = "x-colony-caller";
/// Set by a forwarding server: the request id it gave the request.
pub const REQUEST_ID: &str = "x-colony-request-id";
/// Set by a forwarding server: the address the request came from.
pub const SOURCE: &str = "x-colony-source";
/// Set by an executor calling for one of its attempts (its local socket): `TASK.TOKEN`. Trusted
/// only on a connection with that executor's certificate, and only while the attempt is current.
pub const ATTEMPT: &str = "x-colony-attempt";
/// The W3C trace context of a call (`traceparent`), carried on when it is forwarded.
pub const TRACEPARENT: &str = "traceparent";
const BEARER: &str = "Bearer ";
/// The longest `authorization` value read: a token is 138 characters.
const AUTHORIZATION_BYTES_MAX: usize = 512;

/// Who a request is from.
#[derive(Clone, Debug)]
pub enum Principal {
    Anonymous,
    Token {
        accessor: String,
        grant: Grant,
    },
    Certificate {
        holder: CertRole,
        grant: Grant,
    },
    /// A task's attempt, through its executor: a submitter in the task's namespace, whose
    /// messaging commands are fenced by its token (see `Command::AsAttempt`).
    Attempt {
        executor: u64,
        task: TaskId,
        token: FencingToken,
        grant: Grant,
    },
}

/// Who is calling, from where, under which request id.
#[derive(Clone, Debug)]
pub struct Caller {
    pub peer: Option<SocketAddr>,
    pub principal: Principal,
    pub request_id: String,
    /// Another server authenticated the caller and forwarded the request here.
    pub forwarded: bool,
    /// The caller's W3C trace context (`traceparent` metadata), checked; a forwarded request
    /// carries it on.
    pub traceparent: Option<String>,
}

impl Caller {
    pub fn grant(&self) -> Option<&Grant> {
        match &self.principal {
            Principal::Anonymous => None,
            Principal::Token { grant, .. }
            | Principal::Certificate { grant, .. }
            | Principal::Attempt { grant, .. } => Some(grant),
        }
    }

    /// `Ok` when the caller may do `permission` (in `namespace`, for a task permission);
    /// otherwise `UNAUTHENTICATED` (no credentials) or `PERMISSION_DENIED`.
    pub fn require(&self, permission: Permission, namespace: Option<&str>) -> Result<(), Status> {
        let Some(grant) = self.grant() else {
            return Err(Status::unauthenticated(
                "this call needs credentials: an `authorization: Bearer <token>` header (colony acl bootstrap prints the first token)",
            ));
        };
        if grant.allows(permission, namespace) {
            return Ok(());
        }
        let role = grant.role;
        Err(match (permission.namespaced(), namespace) {
            (true, Some(namespace)) if role.grants(permission) => Status::permission_denied(
                format!("role {role} in these namespaces may not use namespace {namespace:?}"),
            ),
            _ => Status::permission_denied(format!("role {role} may not do this ({permission:?})")),
        })
    }

    /// Like [`Caller::require`] for a task permission, without a namespace: whether the role can
    /// do it in some namespace (the handler checks the task's).
    pub fn require_role(&self, permission: Permission) -> Result<(), Status> {
        match self.grant() {
            Some(grant) if grant.role.grants(permission) => Ok(()),
            _ => self.require(permission, None),
        }
    }

    /// Whether task environment values are shown to this caller.
    pub fn sees_secrets(&self) -> bool {
        self.grant().is_some_and(|g| g.role.sees_secrets())
    }

    /// Whether a task in `namespace` is visible to this caller's reads.
    pub fn covers(&self, namespace: &str) -> bool {
        self.grant().is_some_and(|g| g.covers(namespace))
    }

    /// How a forwarding server names this caller to the leader ([`CALLER`]).
    pub fn forwarded_as(&self) -> String {
        match &self.principal {
            Principal::Anonymous => "anonymous".to_owned(),
            Principal::Token { accessor, .. } => format!("token {accessor}"),
            Principal::Certificate { holder, .. } => format!("cert {holder}"),
            Principal::Attempt { executor, task, token, .. } => {
                format!("attempt {executor} {}.{}", task.0, token.0)
            }
        }
    }

    pub fn accessor(&self) -> Option<&str> {
        match &self.principal {
            Principal::Token { accessor, .. } => Some(accessor),
            _ => None,
        }
    }

    pub fn certificate(&self) -> Option<String> {
        match &self.principal {
            Principal::Certificate { holder, .. } => Some(holder.to_string()),
            Principal::Attempt { executor, task, token, .. } => {
                Some(format!("executor-{executor} for task {task} (token {token})"))
            }
            _ => None,
        }
    }

    /// The attempt calling, when the caller is one: its commands are wrapped to be fenced.
    pub fn attempt(&self) -> Option<(TaskId, FencingToken)> {
        match &self.principal {
            Principal::Attempt { task, token, .. } => Some((*task, *token)),
            _ => None,
        }
    }

    /// `command` as this caller may make it: an attempt's is applied only while it is current.
    pub fn fenced(&self, command: Command) -> Command {
        match self.attempt() {
            Some((task, token)) => Command::AsAttempt { task, token, command: Box::new(command) },
            None => command,
        }
    }
}

/// Why a request's credentials were not accepted.
#[derive(Debug)]
pub enum Refused {
    /// A well-formed token of this cluster that this server's applied state does not hold:
    /// revoked, never created, or created on the leader and not yet applied here.
    UnknownToken,
    Other(Status),
}

impl From<Status> for Refused {
    fn from(status: Status) -> Refused {
        Refused::Other(status)
    }
}

impl From<Refused> for Status {
    fn from(refused: Refused) -> Status {
        match refused {
            Refused::UnknownToken => Status::unauthenticated("unknown or revoked token"),
            Refused::Other(status) => status,
        }
    }
}

/// Authenticates a request that arrived on `conn` with `metadata`. Bad credentials are refused
/// (`UNAUTHENTICATED`); no credentials make an anonymous caller, refused later by every RPC
/// that needs a permission.
pub fn authenticate(
    node: &Node,
    conn: Option<&ConnInfo>,
    metadata: &MetadataMap,
) -> Result<Caller, Refused> {
    let peer = conn.and_then(|c| c.remote);
    let traceparent = metadata
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .filter(|t| colony_process::trace::parse_traceparent(t).is_some())
        .map(str::to_owned);
    let from_server = matches!(conn.and_then(|c| c.peer), Some(CertRole::Server(_)));
    if from_server {
        if let Some(forwarded) = metadata.get(CALLER).and_then(|v| v.to_str().ok()) {
            let request_id = metadata
                .get(REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .filter(|id| id.len() <= 64)
                .map_or_else(new_request_id, str::to_owned);
            let principal = forwarded_principal(node, forwarded)?;
            let source = metadata.get(SOURCE).and_then(|v| v.to_str().ok()?.parse().ok());
            let peer = source.or(peer);
            return Ok(Caller { peer, principal, request_id, forwarded: true, traceparent });
        }
    }
    if let (Some(CertRole::Executor(executor)), Some(attempt)) =
        (conn.and_then(|c| c.peer), metadata.get(ATTEMPT))
    {
        let attempt = attempt
            .to_str()
            .map_err(|_| Status::invalid_argument("the attempt header is not text"))?;
        let principal = attempt_principal(node, executor, attempt)?;
        return Ok(Caller {
            peer,
            principal,
            request_id: new_request_id(),
            forwarded: false,
            traceparent,
        });
    }
    let principal = match metadata.get("authorization") {
        Some(value) => token_principal(node, value.as_bytes())?,
        None => match conn.and_then(|c| c.peer) {
            Some(holder) => Principal::Certificate { holder, grant: certificate_grant(holder) },
            None => Principal::Anonymous,
        },
    };
    Ok(Caller { peer, principal, request_id: new_request_id(), forwarded: false, traceparent })
}

fn certificate_grant(holder: CertRole) -> Grant {
    Grant::everywhere(match holder {
        CertRole::Server(_) => Role::Server,
        CertRole::Executor(_) => Role::Executor,
        CertRole::Learner(_) => Role::Learner,
    })
}

fn token_principal(node: &Node, value: &[u8]) -> Result<Principal, Refused> {
    if value.len() > AUTHORIZATION_BYTES_MAX {
        return Err(Status::unauthenticated("the authorization header is too long").into());
    }
    let text = std::str::from_utf8(value)
        .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
    let token = text.strip_prefix(BEARER).ok_or_else(|| {
        Status::unauthenticated("the authorization header must be `Bearer <token>`")
    })?;
    let token: Token =
        token.parse().map_err(|e| Status::unauthenticated(format!("malformed token: {e}")))?;
    if token.ca_fingerprint != node.ca_fingerprint() {
        return Err(Status::unauthenticated("the token belongs to another cluster").into());
    }
    let state = node.state();
    let found =
        state.machine.acl_token_by_secret(&token.secret_hash()).ok_or(Refused::UnknownToken)?;
    if !found.live_at(colony_process::unix_ms()) {
        let expired = format!("token {} has expired", found.accessor);
        return Err(Status::unauthenticated(expired).into());
    }
    Ok(Principal::Token { accessor: found.accessor.clone(), grant: found.grant.clone() })
}

/// The caller a forwarding server names; a token is looked up again here, so a revocation this
/// server applied counts even if the forwarding server lags.
fn forwarded_principal(node: &Node, forwarded: &str) -> Result<Principal, Status> {
    let refused = || Status::unauthenticated("unknown or revoked token");
    Ok(match forwarded.split_once(' ') {
        Some(("token", accessor)) => {
            let state = node.state();
            let found = state.machine.acl_token(accessor).ok_or_else(refused)?;
            if !found.live_at(colony_process::unix_ms()) {
                return Err(Status::unauthenticated(format!("token {accessor} has expired")));
            }
            Principal::Token { accessor: found.accessor.clone(), grant: found.grant.clone() }
        }
        Some(("cert", holder)) => {
            let holder: CertRole = holder
                .parse()
                .map_err(|()| Status::invalid_argument("malformed forwarded caller"))?;
            Principal::Certificate { holder, grant: certificate_grant(holder) }
        }
        Some(("attempt", rest)) => {
            let (executor, attempt) = rest
                .split_once(' ')
                .ok_or_else(|| Status::invalid_argument("malformed forwarded caller"))?;
            let executor = executor
                .parse()
                .map_err(|_| Status::invalid_argument("malformed forwarded caller"))?;
            attempt_principal(node, executor, attempt)?
        }
        _ if forwarded == "anonymous" => Principal::Anonymous,
        _ => return Err(Status::invalid_argument("malformed forwarded caller")),
    })
}

/// The attempt `TASK.TOKEN` of `executor`, if it is that task's current attempt there (checked
/// again, at commit, for everything it writes).
fn attempt_principal(node: &Node, executor: u64, attempt: &str) -> Result<Principal, Status> {
    let malformed = || Status::invalid_argument("the attempt header must be TASK.TOKEN");
    let (task, token) = attempt.split_once('.').ok_or_else(malformed)?;
    let task = TaskId(task.parse().map_err(|_| malformed())?);
    let token = FencingToken(token.parse().map_err(|_| malformed())?);
    let state = node.state();
    let current = state.machine.get_task(task).filter(|t| {
        t.executor == Some(ExecutorId(executor))
            && t.fencing_token == Some(token)
            && matches!(t.state, TaskState::Assigned | TaskState::Running)
    });
    let Some(current) = current else {
        return Err(Status::permission_denied(format!(
            "attempt of task {task} with token {token} is not current on executor {executor}: it was superseded or has ended"
        )));
    };
    let grant = Grant {
        role: Role::Submitter,
        namespaces: Some(std::iter::once(current.spec.namespace.clone()).collect()),
    };
    Ok(Principal::Attempt { executor, task, token, grant })
}

/// A request id unique to this server's life: a random prefix drawn once, then a counter.
pub fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = PREFIX.get_or_init(rand::random::<u32>);
    format!("{prefix:08x}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}
