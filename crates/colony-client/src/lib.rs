//! The admin gRPC client that fails over between servers: one lazy channel per server.
//!
//! Any server accepts any request, so the client never needs to know who leads. A transport
//! error, `Unavailable` (no leader right now, server down) or an attempt that times out moves on
//! to the next server, with bounded exponential backoff after each full sweep, until the call's
//! overall timeout is spent. Every other status is the answer and is returned at once. A call is
//! therefore safe to retry only when the request is: the callers' writes carry idempotency keys.
//!
//! Every channel is TLS (rustls, TLS 1.3, ALPN `h2`) and carries the caller's credentials
//! ([`Auth`]): a token, which also pins the cluster CA, or a certificate from the cluster CA.

mod auth;
pub mod publisher;
pub mod serve;

pub use auth::{Auth, AuthError, Channel};
pub use publisher::{Publisher, PublisherConfig};

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use colony_proto::pb::admin_client::AdminClient;
use thiserror::Error;
use tokio::time::Instant;
use tonic::transport::Endpoint;
use tonic::{Code, Status};

/// tonic's own default for the largest message a client decodes.
pub const DECODING_MESSAGE_BYTES_DEFAULT: usize = 4 << 20;
/// Backoff after a sweep in which no server answered: starts here, doubles, stops growing at max.
const BACKOFF_INITIAL: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// HTTP/2 pings, sent even while no call is open, so a silently dead connection is noticed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    /// How long to wait for a ping's answer before the connection counts as dead.
    pub timeout: Duration,
}

/// What differs between the client's users. [`ClientConfig::new`] gives the CLI's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// The longest one call may take, across every server and retry.
    pub timeout: Duration,
    /// The longest one attempt may take, so a hung server cannot use up the whole `timeout`.
    pub attempt_timeout_max: Duration,
    /// How long to wait for a TCP connection to one server before trying the next.
    pub connect_timeout: Duration,
    pub keepalive: Option<Keepalive>,
    /// The largest reply the client accepts.
    pub decoding_message_bytes_max: usize,
}

impl ClientConfig {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            attempt_timeout_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            keepalive: None,
            decoding_message_bytes_max: DECODING_MESSAGE_BYTES_DEFAULT,
        }
    }
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("no endpoint given")]
    NoEndpoints,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("invalid endpoint {addr:?}")]
    Endpoint {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// A server answered with a status that is the answer, not a reason to try another server.
    #[error("{}", status_message(.status))]
    Answered { server: String, status: Box<Status> },
    /// The TLS handshake failed: the peer is not a Colony server of the cluster these
    /// credentials trust (another cluster's, or not Colony at all). Trying again cannot help.
    #[error("{server} is not a Colony server of this cluster (TLS: {cause})")]
    NotThisCluster { server: String, cause: String },
    #[error(
        "{what}: no server could answer within {} (tried {}; last error: {last_error})",
        humantime::format_duration(*.timeout),
        .tried.join(", ")
    )]
    Unanswered { what: String, timeout: Duration, tried: Vec<String>, last_error: String },
}

/// Checks one `HOST:PORT` (IPv6 hosts in brackets) and returns it trimmed.
pub fn parse_endpoint(text: &str) -> Result<String, String> {
    let text = text.trim();
    let (host, port) = text.rsplit_once(':').ok_or_else(|| format!("{text:?} is not HOST:PORT"))?;
    if host.is_empty() || host.contains('/') {
        return Err(format!("{text:?} is not HOST:PORT"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("{text:?} has no valid port (HOST:PORT, port 1-65535)"))?;
    Ok(text.to_owned())
}

/// A TLS channel to one server, with `auth`'s credentials on every call, that connects on first
/// use and reconnects when needed.
pub fn lazy_channel(
    addr: &str,
    config: &ClientConfig,
    auth: &Auth,
) -> Result<Channel, ClientError> {
    // The scheme only names the connection to hyper: `auth`'s connector does TCP and TLS.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|source| ClientError::Endpoint { addr: addr.to_owned(), source })?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true);
    let endpoint = match config.keepalive {
        Some(keepalive) => endpoint
            .http2_keep_alive_interval(keepalive.interval)
            .keep_alive_timeout(keepalive.timeout)
            .keep_alive_while_idle(true),
        None => endpoint,
    };
    Ok(auth.channel(endpoint))
}

/// Whether a status means "this server cannot answer now; another one (or a later try) may".
fn is_retriable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        // A status built on this side from an I/O or HTTP/2 failure carries its source; one that a
        // server sent does not.
        Code::Unknown => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

/// The cause of a failed TLS handshake in a locally made status, if that is what it is: rustls
/// reports protocol and certificate failures as `InvalidData` I/O errors.
pub fn tls_failure(status: &Status) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::InvalidData {
                return Some(io.to_string());
            }
        }
        cause = error.source();
    }
    None
}

/// A retriable status with the innermost cause of a local transport error ("Connection refused").
fn transport_message(status: &Status) -> String {
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(status);
    let mut innermost = None;
    while let Some(error) = cause {
        innermost = Some(error);
        cause = error.source();
    }
    match innermost {
        Some(error) if status.message() != error.to_string() => {
            format!("{}: {error}", status.message())
        }
        _ => status.message().to_owned(),
    }
}

/// The user-facing text of a status a server answered with.
pub fn status_message(status: &Status) -> String {
    match status.code() {
        // The caller's mistakes: the server's one-line message says it all.
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::AlreadyExists => {
            status.message().to_owned()
        }
        code if status.message().is_empty() => format!("{} ({code:?})", code.description()),
        code => format!("{} ({code:?})", status.message()),
    }
}

/// A client over a list of servers. Clones share which server answered last.
#[derive(Clone)]
pub struct Client {
    servers: Vec<(String, AdminClient<Channel>)>,
    config: ClientConfig,
    /// The index of the server that answered last; tried first next time.
    preferred: Arc<AtomicUsize>,
}

impl Client {
    /// A client over `endpoints` (`HOST:PORT`) with the CLI's settings and `timeout` per call.
    pub fn new(
        endpoints: &[String],
        timeout: Duration,
        auth: &Auth,
    ) -> Result<Client, ClientError> {
        Self::with_config(endpoints, ClientConfig::new(timeout), auth)
    }

    pub fn with_config(
        endpoints: &[String],
        config: ClientConfig,
        auth: &Auth,
    ) -> Result<Client, ClientError> {
        let channels = endpoints
            .iter()
            .map(|addr| Ok((addr.clone(), lazy_channel(addr, &config, auth)?)))
            .collect::<Result<Vec<_>, ClientError>>()?;
        Self::from_channels(channels, config)
    }

    /// A client over channels the caller already holds, each with the name errors give it.
    /// `config`'s connection settings were the channels' to apply; its call settings apply here.
    pub fn from_channels(
        channels: Vec<(String, Channel)>,
        config: ClientConfig,
    ) -> Result<Client, ClientError> {
        if channels.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let servers = channels
            .into_iter()
            .map(|(name, channel)| {
                let client = AdminClient::new(channel)
                    .max_decoding_message_size(config.decoding_message_bytes_max);
                (name, client)
            })
            .collect();
        Ok(Client { servers, config, preferred: Arc::new(AtomicUsize::new(0)) })
    }

    /// Every server's name and client, in the order given, for calls that are not one unary
    /// request (a stream followed across servers).
    pub fn servers(&self) -> &[(String, AdminClient<Channel>)] {
        &self.servers
    }

    /// The name of the server that answered last.
    pub fn last_server(&self) -> &str {
        &self.servers[self.preferred()].0
    }

    fn preferred(&self) -> usize {
        self.preferred.load(Ordering::Relaxed) % self.servers.len()
    }

    /// Runs `rpc` against the servers until one answers, failing over on transport errors,
    /// `Unavailable` and attempts that time out. `what` names the operation in the error when
    /// none answers in time.
    pub async fn call<T, F, Fut>(&self, what: &str, mut rpc: F) -> Result<T, ClientError>
    where
        F: FnMut(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let timeout = self.config.timeout;
        let deadline = Instant::now() + timeout;
        let mut backoff = BACKOFF_INITIAL;
        let mut last_error = String::from("no attempt made");
        let count = self.servers.len();
        let first = self.preferred();
        'sweeps: loop {
            for step in 0..count {
                let index = (first + step) % count;
                let now = Instant::now();
                if now >= deadline {
                    break 'sweeps;
                }
                let (name, client) = &self.servers[index];
                let attempt = self.config.attempt_timeout_max.min(deadline - now);
                match tokio::time::timeout(attempt, rpc(client.clone())).await {
                    Ok(Ok(response)) => {
                        self.preferred.store(index, Ordering::Relaxed);
                        return Ok(response.into_inner());
                    }
                    Ok(Err(status)) if tls_failure(&status).is_some() => {
                        return Err(ClientError::NotThisCluster {
                            server: name.clone(),
                            cause: tls_failure(&status).unwrap_or_default(),
                        });
                    }
                    Ok(Err(status)) if is_retriable(&status) => {
                        last_error = format!("{name}: {}", transport_message(&status));
                    }
                    Ok(Err(status)) => {
                        self.preferred.store(index, Ordering::Relaxed);
                        return Err(ClientError::Answered {
                            server: name.clone(),
                            status: Box::new(status),
                        });
                    }
                    Err(_) => {
                        let waited = humantime::format_duration(attempt);
                        last_error = format!("{name}: no answer within {waited}");
                    }
                }
            }
            if Instant::now() + backoff >= deadline {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        Err(ClientError::Unanswered {
            what: what.to_owned(),
            timeout,
            tried: self.servers.iter().map(|(name, _)| name.clone()).collect(),
            last_error,
        })
    }
}

/// Creates the cluster's first management token through any of `endpoints`, trusting only the CA
/// `trust` names (the bootstrap server's `DATA_DIR/tls/ca.pem`, or its fingerprint). Retries
/// while no server answers or no leader is elected, within `timeout`.
pub async fn bootstrap_acl(
    endpoints: &[String],
    trust: colony_quic::Trust,
    timeout: Duration,
) -> Result<colony_proto::pb::BootstrapAclResponse, ClientError> {
    let client = Client::new(endpoints, timeout, &Auth::anonymous(trust)?)?;
    client
        .call("bootstrap ACLs", |mut c| async move {
            c.bootstrap_acl(colony_proto::pb::BootstrapAclRequest {}).await
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(parse_endpoint(" 127.0.0.1:7101 "), Ok("127.0.0.1:7101".to_owned()));
        assert_eq!(parse_endpoint("[::1]:7101"), Ok("[::1]:7101".to_owned()));
        assert_eq!(parse_endpoint("colony-1.example:80"), Ok("colony-1.example:80".to_owned()));
        for bad in ["", "host", "host:", ":1", "host:70000", "http://host:1", "host:-1"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retriable_statuses() {
        assert!(is_retriable(&Status::unavailable("no leader")));
        assert!(!is_retriable(&Status::unknown("server said so")));
        assert!(!is_retriable(&Status::not_found("task 9 not found")));
        assert!(!is_retriable(&Status::invalid_argument("bad")));
        assert!(!is_retriable(&Status::permission_denied("bad token")));
    }

    #[test]
    fn answers_read_as_one_line() {
        let answered =
            |status| ClientError::Answered { server: "a:1".to_owned(), status: Box::new(status) };
        assert_eq!(answered(Status::not_found("task 9 not found")).to_string(), "task 9 not found");
        assert_eq!(
            answered(Status::permission_denied("bad token")).to_string(),
            "bad token (PermissionDenied)"
        );
        assert!(matches!(
            Client::from_channels(Vec::new(), ClientConfig::new(Duration::from_secs(1))),
            Err(ClientError::NoEndpoints)
        ));
    }

    #[tokio::test]
    async fn gives_up_naming_what_it_tried() {
        // Port 1 on loopback refuses connections, so every attempt is a transport error.
        let auth = Auth::pinned([7; 32]);
        let client =
            match Client::new(&["127.0.0.1:1".to_owned()], Duration::from_millis(300), &auth) {
                Ok(client) => client,
                Err(e) => panic!("{e}"),
            };
        let result = client
            .call("list tasks", |mut c| async move {
                c.list_tasks(colony_proto::pb::ListTasksRequest::default()).await
            })
            .await;
        let message = result.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("list tasks: no server could answer within 300ms"), "{message}");
        assert!(message.contains("127.0.0.1:1"), "{message}");
    }
}
