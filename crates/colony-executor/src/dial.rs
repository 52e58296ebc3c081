//! Reaching a server: name resolution, the QUIC connection and its control stream, the first
//! request and its answer, rounds over the server list that follow redirects, and the backoff
//! between rounds. Shared by joining and by the session loop.

use colony_proto::pb;
use colony_quic::FRAME_BYTES_MAX;
use quinn::{ClientConfig, Connection, Endpoint, RecvStream, SendStream};
use rand::Rng;
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// Time to resolve, handshake and open the control stream with one server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a server has to answer the first message (`Join` or `Hello`); a join waits for a Raft
/// commit, so this is generous.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Redirects followed within one round, so two servers pointing at each other cannot loop.
const REDIRECTS_PER_ROUND_MAX: u32 = 4;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Why one server could not be reached or did not answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error("cannot resolve {addr}")]
    Resolve {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} resolves to no IPv4 address")]
    NoAddress { addr: String },
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Frame(#[from] colony_quic::FrameError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the server closed the stream without answering")]
    Closed,
    #[error("the server sent an empty message")]
    Empty,
}

/// An error and its sources on one line, for logs and for reasons carried as text.
pub(crate) fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// An open connection and its control stream.
pub(crate) struct Stream {
    pub conn: Connection,
    pub send: SendStream,
    pub recv: RecvStream,
}

impl Stream {
    /// Closes the connection deliberately (code 0), telling the server why.
    pub(crate) fn close(&self, reason: &str) {
        colony_quic::CloseCode::Ok.close(&self.conn, reason);
    }
}

/// Resolves `addr` (`host:port`) to an IPv4 address, the family of our endpoints.
async fn resolve(addr: &str) -> Result<SocketAddr, DialError> {
    let mut found = tokio::net::lookup_host(addr)
        .await
        .map_err(|source| DialError::Resolve { addr: addr.to_owned(), source })?;
    found.find(SocketAddr::is_ipv4).ok_or_else(|| DialError::NoAddress { addr: addr.to_owned() })
}

/// Connects to `addr` and opens the control stream.
pub(crate) async fn open(
    endpoint: &Endpoint,
    config: &ClientConfig,
    addr: &str,
) -> Result<Stream, DialError> {
    let connect = async {
        let target = resolve(addr).await?;
        let conn = endpoint.connect_with(config.clone(), target, colony_quic::SERVER_NAME)?.await?;
        let (send, recv) = conn.open_bi().await?;
        Ok(Stream { conn, send, recv })
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| DialError::Timeout(CONNECT_TIMEOUT))?
}

/// Sends the first message on the control stream and reads the server's answer.
pub(crate) async fn request(
    stream: &mut Stream,
    message: pb::executor_message::Body,
) -> Result<pb::server_message::Body, DialError> {
    let exchange = async {
        colony_quic::write_frame(&mut stream.send, &pb::ExecutorMessage { body: Some(message) })
            .await?;
        let answer: Option<pb::ServerMessage> =
            colony_quic::read_frame(&mut stream.recv, FRAME_BYTES_MAX).await?;
        answer.ok_or(DialError::Closed)?.body.ok_or(DialError::Empty)
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| DialError::Timeout(ANSWER_TIMEOUT))?
}

/// What trying one server came to.
pub(crate) enum Step<T> {
    Done(T),
    /// Another server leads; try it next.
    Redirect(String),
    /// The cluster has no leader yet: end the round and back off.
    NoLeader,
    /// This server failed; try the next.
    Failed(String),
    /// Retrying cannot help.
    Fatal(String),
}

/// How a round over the servers ended.
pub(crate) enum RoundEnd<T> {
    /// `T` came from the server at this address.
    Done(T, String),
    Fatal(String),
    /// No server gave an answer; the most recent reason.
    Exhausted(String),
}

/// Tries `candidates` in order, following redirects at once, until one succeeds.
/// `attempt` takes the address by value: a closure over a borrowed one would make the whole
/// future `Send` only for one lifetime, and so unspawnable.
pub(crate) async fn round<T, F, Fut>(candidates: &[String], mut attempt: F) -> RoundEnd<T>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Step<T>>,
{
    let mut queue: VecDeque<String> = candidates.iter().cloned().collect();
    let mut redirects = 0;
    let mut last = "no servers to try".to_owned();
    while let Some(addr) = queue.pop_front() {
        match attempt(addr.clone()).await {
            Step::Done(value) => return RoundEnd::Done(value, addr),
            Step::Redirect(to) if redirects < REDIRECTS_PER_ROUND_MAX => {
                redirects += 1;
                tracing::debug!(from = %addr, to = %to, "redirected to the leader");
                queue.push_front(to);
            }
            Step::Redirect(to) => {
                last = format!("{addr}: redirected to {to}, one redirect too many")
            }
            Step::NoLeader => {
                return RoundEnd::Exhausted(format!("{addr}: the cluster has no leader yet"))
            }
            Step::Failed(reason) => last = format!("{addr}: {reason}"),
            Step::Fatal(reason) => return RoundEnd::Fatal(reason),
        }
    }
    RoundEnd::Exhausted(last)
}

/// Exponential backoff with jitter between rounds: 100 ms doubling to 5 s.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }

    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// The delay before the next round: uniformly random in the upper half of the current step,
    /// so many executors restarted together do not reconnect in lockstep.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(BACKOFF_MAX);
        rand::thread_rng().gen_range(step / 2..=step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= BACKOFF_MIN / 2 && delays[0] <= BACKOFF_MIN);
        assert!(delays.iter().all(|d| *d <= BACKOFF_MAX));
        assert!(delays[9] >= BACKOFF_MAX / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= BACKOFF_MIN);
    }

    #[tokio::test]
    async fn rounds_follow_redirects_and_stop_at_no_leader() {
        let servers = vec!["a".to_owned(), "b".to_owned()];
        let mut tried = Vec::new();
        let end = round(&servers, |addr: String| {
            tried.push(addr.clone());
            let step = match addr.as_str() {
                "a" => Step::Failed("down".into()),
                "b" => Step::Redirect("c".into()),
                _ => Step::Done(7),
            };
            std::future::ready(step)
        })
        .await;
        assert!(matches!(end, RoundEnd::Done(7, ref at) if at == "c"));
        assert_eq!(tried, ["a", "b", "c"]);

        let end = round(&servers, |_| std::future::ready(Step::<()>::NoLeader)).await;
        assert!(matches!(end, RoundEnd::Exhausted(ref why) if why.contains("no leader")));
        let end = round(&servers, |addr| std::future::ready(Step::<()>::Redirect(addr))).await;
        assert!(
            matches!(end, RoundEnd::Exhausted(ref why) if why.contains("one redirect too many"))
        );
    }
}
