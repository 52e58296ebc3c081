//! The operator's gRPC client: one lazy channel per endpoint, failing over between them.
//!
//! Any server accepts any request, so the client never needs to know who leads. A transport
//! error or `Unavailable` (no leader right now, server down) moves on to the next endpoint, with
//! bounded exponential backoff after each full sweep, until the command's `--timeout` is spent.
//! Every other status is the answer and is returned at once.

use anyhow::{anyhow, Context as _, Result};
use colony_proto::pb::admin_client::AdminClient;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// How long to wait for a TCP connection to one server before trying the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest one attempt may take, so a hung server cannot use up the whole `--timeout`.
const ATTEMPT_TIMEOUT_MAX: Duration = Duration::from_secs(5);
/// Backoff after a sweep in which no server answered: starts here, doubles, stops growing at max.
const BACKOFF_INITIAL: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Checks one `HOST:PORT` (IPv6 hosts in brackets) and returns it trimmed.
pub fn parse_endpoint(text: &str) -> Result<String, String> {
    let text = text.trim();
    let (host, port) = text.rsplit_once(':').ok_or_else(|| format!("{text:?} is not HOST:PORT"))?;
    if host.is_empty() || host.contains('/') {
        return Err(format!("{text:?} is not HOST:PORT"));
    }
    port.parse::<u16>().map_err(|_| format!("{text:?} has no valid port (HOST:PORT, port 1-65535)"))?;
    Ok(text.to_owned())
}

/// A channel to one server that connects on first use and reconnects when needed.
pub fn lazy_channel(addr: &str) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("invalid endpoint {addr:?}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    Ok(endpoint.connect_lazy())
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

/// A retriable status with the innermost cause of a local transport error ("Connection refused").
fn transport_message(status: &Status) -> String {
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(status);
    let mut innermost = None;
    while let Some(error) = cause {
        innermost = Some(error);
        cause = error.source();
    }
    match innermost {
        Some(error) if status.message() != error.to_string() => format!("{}: {error}", status.message()),
        _ => status.message().to_owned(),
    }
}

/// The user-facing text of a status a server answered with.
pub fn status_message(status: &Status) -> String {
    match status.code() {
        // The caller's mistakes: the server's one-line message says it all.
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::AlreadyExists => status.message().to_owned(),
        code if status.message().is_empty() => format!("{} ({code:?})", code.description()),
        code => format!("{} ({code:?})", status.message()),
    }
}

/// A client over a list of servers.
pub struct Client {
    servers: Vec<(String, AdminClient<Channel>)>,
    timeout: Duration,
    /// The server that answered last; tried first next time.
    preferred: usize,
}

impl Client {
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Client> {
        if endpoints.is_empty() {
            return Err(anyhow!("no endpoint given (--endpoint or COLONY_ENDPOINT)"));
        }
        let servers = endpoints
            .iter()
            .map(|addr| Ok((addr.clone(), AdminClient::new(lazy_channel(addr)?))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Client { servers, timeout, preferred: 0 })
    }

    /// The address of the server that answered last.
    pub fn last_server(&self) -> &str {
        &self.servers[self.preferred].0
    }

    /// Runs `rpc` against the servers until one answers, failing over on transport errors and
    /// `Unavailable`. `what` names the operation in the error when none answers in time.
    pub async fn call<T, F, Fut>(&mut self, what: &str, mut rpc: F) -> Result<T>
    where
        F: FnMut(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = BACKOFF_INITIAL;
        let mut last_error = String::from("no attempt made");
        let count = self.servers.len();
        'sweeps: loop {
            for step in 0..count {
                let index = (self.preferred + step) % count;
                let now = Instant::now();
                if now >= deadline {
                    break 'sweeps;
                }
                let (addr, client) = &self.servers[index];
                let attempt = ATTEMPT_TIMEOUT_MAX.min(deadline - now);
                match tokio::time::timeout(attempt, rpc(client.clone())).await {
                    Ok(Ok(response)) => {
                        self.preferred = index;
                        return Ok(response.into_inner());
                    }
                    Ok(Err(status)) if is_retriable(&status) => last_error = format!("{addr}: {}", transport_message(&status)),
                    Ok(Err(status)) => {
                        self.preferred = index;
                        return Err(anyhow!(status_message(&status)));
                    }
                    Err(_) => last_error = format!("{addr}: no answer within {}", humantime::format_duration(attempt)),
                }
            }
            let now = Instant::now();
            if now + backoff >= deadline {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        let tried: Vec<&str> = self.servers.iter().map(|(addr, _)| addr.as_str()).collect();
        Err(anyhow!(
            "{what}: no server could answer within {} (tried {}; last error: {last_error})",
            humantime::format_duration(self.timeout),
            tried.join(", ")
        ))
    }
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
    }

    #[tokio::test]
    async fn gives_up_naming_what_it_tried() {
        // Port 1 on loopback refuses connections, so every attempt is a transport error.
        let mut client = match Client::new(&["127.0.0.1:1".to_owned()], Duration::from_millis(300)) {
            Ok(client) => client,
            Err(e) => panic!("{e:#}"),
        };
        let result = client
            .call("list tasks", |mut c| async move { c.list_tasks(colony_proto::pb::ListTasksRequest::default()).await })
            .await;
        let message = result.err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(message.contains("list tasks: no server could answer within 300ms"), "{message}");
        assert!(message.contains("127.0.0.1:1"), "{message}");
    }
}
