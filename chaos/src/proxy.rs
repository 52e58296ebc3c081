//! A user-space link-fault proxy: the chaos suite's only way to add delay, jitter, duplication
//! and reordering to a link, because the test kernel has no `tc netem`.
//!
//! The suite runs it as a child process inside a network namespace under a dedicated group id,
//! and its nftables rules exclude that group from the redirects, so the proxy's own upstream
//! traffic is never redirected back into it and it needs no socket marks. Each [`Link`] listens
//! on one address and forwards to one upstream: TCP connection by connection, UDP datagram by
//! datagram with one upstream socket per client address. Every random choice comes from
//! [`ProxyConfig::seed`], so the same seed and the same arrival sequence give the same choices.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, Instant};

/// Largest delay plus jitter accepted, which keeps every deadline far from `Instant` overflow.
const DELAY_MAX: Duration = Duration::from_secs(3600);
/// Bytes read from a TCP stream at once; each read is one delayed chunk.
const TCP_CHUNK_BYTES_MAX: usize = 64 * 1024;
/// Bytes held per TCP direction; reading stops while this many wait for release.
const TCP_QUEUE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Open connections per TCP link; a connection accepted beyond it is closed at once.
const TCP_CONNECTIONS_MAX: usize = 1024;
/// Time allowed to connect upstream before the accepted connection is closed.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest UDP payload.
const UDP_DATAGRAM_BYTES_MAX: usize = 65_535;
/// Client mappings per UDP link; datagrams from further clients are dropped.
const UDP_CLIENTS_MAX: usize = 1024;
/// Datagrams held per direction of a client mapping, and datagrams waiting for the mapping to
/// take them; further ones are dropped.
const UDP_QUEUE_DATAGRAMS_MAX: usize = 1024;
/// A client mapping without traffic in either direction for this long is removed.
const UDP_CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Faults applied to every link of a proxy, in both directions.
///
/// A held chunk or datagram waits on tokio's millisecond timer, so each delayed hop takes up to
/// about a millisecond more than asked; with no delay and no jitter nothing waits on a timer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Added to every TCP chunk and UDP datagram before it is forwarded.
    pub delay: Duration,
    /// Upper bound of a uniformly random extra delay, drawn per chunk or datagram.
    pub jitter: Duration,
    /// UDP only: probability, within `0.0..=1.0`, that a datagram is sent twice.
    pub duplicate: f64,
    /// UDP only: release each datagram at its own deadline, so jitter reorders them; when false
    /// they leave in arrival order. TCP chunks always leave in order.
    pub reorder: bool,
}

/// One proxied link: where the proxy listens and where it forwards to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Every accepted connection gets its own connection to `upstream`.
    Tcp {
        /// Where clients connect; port 0 picks a free port.
        listen: SocketAddr,
        /// Where their traffic goes.
        upstream: SocketAddr,
    },
    /// Every client address gets its own socket connected to `upstream`.
    Udp {
        /// Where clients send; port 0 picks a free port.
        listen: SocketAddr,
        /// Where their datagrams go.
        upstream: SocketAddr,
    },
}

/// What one proxy process serves.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Served side by side; at least one.
    pub links: Vec<Link>,
    /// Applied to every link.
    pub faults: Faults,
    /// Seeds every random choice of the proxy.
    pub seed: u64,
}

/// A proxy whose listeners are bound but not yet serving; see [`bind`].
#[derive(Debug)]
pub struct Bound {
    listeners: Vec<Listener>,
    local_addrs: Vec<SocketAddr>,
    faults: Faults,
    seed: u64,
}

#[derive(Debug)]
enum Listener {
    Tcp {
        listener: TcpListener,
        upstream: SocketAddr,
    },
    Udp {
        socket: UdpSocket,
        upstream: SocketAddr,
    },
}

/// Binds every link of `config` and serves them until a listener fails, returning that error.
pub async fn run(config: ProxyConfig) -> anyhow::Result<()> {
    bind(&config).await?.run().await
}

/// Checks `config` and binds its listeners without serving them yet, so a caller can bind port 0
/// and learn the addresses from [`Bound::local_addrs`] before traffic starts.
pub async fn bind(config: &ProxyConfig) -> anyhow::Result<Bound> {
    config.faults.check()?;
    ensure!(!config.links.is_empty(), "the proxy config has no links");
    let mut listeners = Vec::with_capacity(config.links.len());
    let mut local_addrs = Vec::with_capacity(config.links.len());
    for link in &config.links {
        let (listener, local_addr) = match *link {
            Link::Tcp { listen, upstream } => {
                let listener = TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("bind tcp {listen}"))?;
                let local_addr = listener.local_addr()?;
                (Listener::Tcp { listener, upstream }, local_addr)
            }
            Link::Udp { listen, upstream } => {
                let socket = UdpSocket::bind(listen)
                    .await
                    .with_context(|| format!("bind udp {listen}"))?;
                let local_addr = socket.local_addr()?;
                (Listener::Udp { socket, upstream }, local_addr)
            }
        };
        listeners.push(listener);
        local_addrs.push(local_addr);
    }
    Ok(Bound {
        listeners,
        local_addrs,
        faults: config.faults,
        seed: config.seed,
    })
}

impl Bound {
    /// The listeners' addresses, in the order of [`ProxyConfig::links`], with port 0 resolved.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Serves every link until a listener fails, returning that error.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut links = JoinSet::new();
        for listener in self.listeners {
            let seed = rng.gen();
            match listener {
                Listener::Tcp { listener, upstream } => {
                    links.spawn(serve_tcp(listener, upstream, self.faults, seed))
                }
                Listener::Udp { socket, upstream } => {
                    links.spawn(serve_udp(socket, upstream, self.faults, seed))
                }
            };
        }
        match links.join_next().await {
            Some(joined) => match joined? {
                Ok(never) => match never {},
                Err(error) => Err(error),
            },
            None => Ok(()),
        }
    }
}

/// Parses a link as the CLI gives it, `tcp:LISTEN=UPSTREAM` or `udp:LISTEN=UPSTREAM`, both being
/// socket addresses such as `127.0.0.1:17001` or `[::1]:7000`.
pub fn parse_link(spec: &str) -> anyhow::Result<Link> {
    let syntax = "expected tcp:LISTEN=UPSTREAM or udp:LISTEN=UPSTREAM";
    let (protocol, addrs) = spec
        .split_once(':')
        .with_context(|| format!("link {spec:?}: {syntax}"))?;
    if protocol != "tcp" && protocol != "udp" {
        bail!("link {spec:?}: unknown protocol {protocol:?}; {syntax}");
    }
    let (listen, upstream) = addrs
        .split_once('=')
        .with_context(|| format!("link {spec:?}: {syntax}"))?;
    let listen: SocketAddr = listen
        .parse()
        .with_context(|| format!("link {spec:?}: listen address {listen:?} is not IP:PORT"))?;
    let upstream: SocketAddr = upstream
        .parse()
        .with_context(|| format!("link {spec:?}: upstream address {upstream:?} is not IP:PORT"))?;
    Ok(match protocol {
        "tcp" => Link::Tcp { listen, upstream },
        _ => Link::Udp { listen, upstream },
    })
}

impl Faults {
    fn check(&self) -> anyhow::Result<()> {
        ensure!(
            (0.0..=1.0).contains(&self.duplicate),
            "duplicate probability {} is not within 0..=1",
            self.duplicate
        );
        ensure!(
            self.delay
                .checked_add(self.jitter)
                .is_some_and(|most| most <= DELAY_MAX),
            "delay {:?} plus jitter {:?} is more than {DELAY_MAX:?}",
            self.delay,
            self.jitter
        );
        Ok(())
    }
}

/// One direction of a link: holds items until their release time.
#[derive(Debug)]
struct Lane<T> {
    faults: Faults,
    /// Never release an item before one that arrived earlier.
    ordered: bool,
    rng: StdRng,
    /// Keyed by release time, then arrival number, so equal times leave in arrival order.
    held: BTreeMap<(Instant, u64), T>,
    arrivals: u64,
    last_release: Option<Instant>,
}

impl<T> Lane<T> {
    fn new(faults: Faults, ordered: bool, seed: u64) -> Self {
        Lane {
            faults,
            ordered,
            rng: StdRng::seed_from_u64(seed),
            held: BTreeMap::new(),
            arrivals: 0,
            last_release: None,
        }
    }

    fn hold(&mut self, arrived: Instant, item: T) {
        let jitter = self.rng.gen_range(Duration::ZERO..=self.faults.jitter);
        let mut release = arrived + self.faults.delay + jitter;
        if let Some(last) = self.last_release.filter(|_| self.ordered) {
            release = release.max(last);
        }
        self.last_release = Some(release);
        self.held.insert((release, self.arrivals), item);
        self.arrivals += 1;
    }

    fn next_release(&self) -> Option<Instant> {
        self.held
            .first_key_value()
            .map(|(&(release, _), _)| release)
    }

    /// Takes the item with the earliest release time, whether or not that time has come.
    fn pop_next(&mut self) -> Option<T> {
        self.held.pop_first().map(|(_, item)| item)
    }

    fn len(&self) -> usize {
        self.held.len()
    }

    fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        // Tokio rounds a timer up to its next millisecond tick, which would add about a
        // millisecond to every hop of an undelayed link.
        Some(deadline) if deadline <= Instant::now() => {}
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn serve_tcp(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: Faults,
    seed: u64,
) -> anyhow::Result<Infallible> {
    let mut rng = StdRng::seed_from_u64(seed);
    let connections = Arc::new(Semaphore::new(TCP_CONNECTIONS_MAX));
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // The client gave up before we took the connection; the listener is fine.
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                ) =>
            {
                tracing::debug!(%error, "tcp accept failed");
                continue;
            }
            Err(error) => return Err(error).context(format!("accept for tcp link to {upstream}")),
        };
        let seed = rng.gen();
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, %upstream, "too many tcp connections; closing this one");
            continue;
        };
        tokio::spawn(proxy_tcp(client, peer, upstream, faults, seed, permit));
    }
}

/// Forwards one accepted connection until both directions end or one fails.
async fn proxy_tcp(
    client: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    faults: Faults,
    seed: u64,
    _permit: OwnedSemaphorePermit,
) {
    let connected = match timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect(upstream)).await {
        Ok(connected) => connected,
        Err(elapsed) => Err(elapsed.into()),
    };
    let server = match connected {
        Ok(server) => server,
        Err(error) => {
            tracing::warn!(%peer, %upstream, %error, "upstream connect failed; closing the client");
            return;
        }
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let (up_seed, down_seed) = (rng.gen(), rng.gen());
    let forwarded = async {
        // Chunks leave when the lane releases them; Nagle's algorithm would hold small ones for
        // an acknowledgement and add delay nobody asked for.
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        // The first error drops both directions, which closes both connections.
        tokio::try_join!(
            pipe(client_read, server_write, Lane::new(faults, true, up_seed)),
            pipe(
                server_read,
                client_write,
                Lane::new(faults, true, down_seed)
            ),
        )
    };
    match forwarded.await {
        Ok(_) => tracing::debug!(%peer, %upstream, "tcp connection closed"),
        Err(error) => tracing::debug!(%peer, %upstream, %error, "tcp connection failed"),
    }
}

/// Copies one direction of a TCP connection through `lane`; after EOF it releases what is held
/// and then shuts down the write half of `to`.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut lane: Lane<Vec<u8>>,
) -> io::Result<()> {
    let mut buf = vec![0; TCP_CHUNK_BYTES_MAX];
    let mut held_bytes = 0;
    let mut eof = false;
    while !(eof && lane.is_empty()) {
        let room = (TCP_QUEUE_BYTES_MAX - held_bytes).min(TCP_CHUNK_BYTES_MAX);
        // Releases first: while chunks are overdue, reading more would only grow the queue.
        tokio::select! {
            biased;
            () = sleep_until_some(lane.next_release()) => {
                if let Some(chunk) = lane.pop_next() {
                    held_bytes -= chunk.len();
                    to.write_all(&chunk).await?;
                }
            }
            read = from.read(&mut buf[..room]), if !eof && room > 0 => match read? {
                0 => eof = true,
                n => {
                    lane.hold(Instant::now(), buf[..n].to_vec());
                    held_bytes += n;
                }
            },
        }
    }
    to.shutdown().await
}

/// A datagram held in a UDP lane, with the number of times it will be sent.
#[derive(Debug)]
struct Datagram {
    bytes: Vec<u8>,
    copies: usize,
}

impl Lane<Datagram> {
    /// Holds a datagram unless the lane is full, deciding now whether it will be duplicated.
    fn hold_datagram(&mut self, arrived: Instant, bytes: Vec<u8>) {
        if self.len() >= UDP_QUEUE_DATAGRAMS_MAX {
            tracing::debug!("udp lane full; dropping a datagram");
            return;
        }
        let copies = if self.rng.gen_bool(self.faults.duplicate) {
            2
        } else {
            1
        };
        self.hold(arrived, Datagram { bytes, copies });
    }
}

/// A datagram from a client with the time it arrived, on its way to the client's mapping.
type Arrival = (Instant, Vec<u8>);

async fn serve_udp(
    socket: UdpSocket,
    upstream: SocketAddr,
    faults: Faults,
    seed: u64,
) -> anyhow::Result<Infallible> {
    let socket = Arc::new(socket);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut clients: HashMap<SocketAddr, mpsc::Sender<Arrival>> = HashMap::new();
    let mut buf = vec![0; UDP_DATAGRAM_BYTES_MAX];
    loop {
        let (n, client) = socket
            .recv_from(&mut buf)
            .await
            .with_context(|| format!("receive for udp link to {upstream}"))?;
        let arrival = (Instant::now(), buf[..n].to_vec());
        if clients.get(&client).is_none_or(|inbox| inbox.is_closed()) {
            if clients.len() >= UDP_CLIENTS_MAX {
                clients.retain(|_, inbox| !inbox.is_closed());
            }
            if clients.len() >= UDP_CLIENTS_MAX {
                tracing::debug!(%client, "too many udp clients; dropping a datagram");
                continue;
            }
            let server = match connect_udp(upstream).await {
                Ok(server) => server,
                Err(error) => {
                    tracing::warn!(%client, %upstream, %error, "upstream udp socket failed");
                    continue;
                }
            };
            let (inbox, arrivals) = mpsc::channel(UDP_QUEUE_DATAGRAMS_MAX);
            let mapping =
                proxy_udp_client(socket.clone(), client, server, arrivals, faults, rng.gen());
            tokio::spawn(mapping);
            clients.insert(client, inbox);
        }
        if let Some(inbox) = clients.get(&client) {
            if inbox.try_send(arrival).is_err() {
                tracing::debug!(%client, "udp client queue full; dropping a datagram");
            }
        }
    }
}

/// A socket for one client's traffic, bound to an ephemeral port and connected to `upstream`.
async fn connect_udp(upstream: SocketAddr) -> io::Result<UdpSocket> {
    let any: IpAddr = match upstream {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((any, 0)).await?;
    socket.connect(upstream).await?;
    Ok(socket)
}

/// Serves one client mapping: forwards the client's datagrams through `server` and the replies
/// back through the listening socket, until the mapping has been idle for
/// [`UDP_CLIENT_IDLE_TIMEOUT`].
async fn proxy_udp_client(
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    server: UdpSocket,
    mut arrivals: mpsc::Receiver<Arrival>,
    faults: Faults,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut to_server: Lane<Datagram> = Lane::new(faults, !faults.reorder, rng.gen());
    let mut to_client: Lane<Datagram> = Lane::new(faults, !faults.reorder, rng.gen());
    let mut buf = vec![0; UDP_DATAGRAM_BYTES_MAX];
    let mut idle_at = Instant::now() + UDP_CLIENT_IDLE_TIMEOUT;
    loop {
        // Unbiased, so a flood in one direction cannot starve the other.
        tokio::select! {
            () = sleep_until_some(to_server.next_release()) => {
                if let Some(datagram) = to_server.pop_next() {
                    for _ in 0..datagram.copies {
                        if let Err(error) = server.send(&datagram.bytes).await {
                            tracing::debug!(%client, %error, "udp send upstream failed");
                        }
                    }
                }
            }
            () = sleep_until_some(to_client.next_release()) => {
                if let Some(datagram) = to_client.pop_next() {
                    for _ in 0..datagram.copies {
                        if let Err(error) = listener.send_to(&datagram.bytes, client).await {
                            tracing::debug!(%client, %error, "udp send to client failed");
                        }
                    }
                }
            }
            arrival = arrivals.recv() => {
                let Some((arrived, bytes)) = arrival else { return };
                idle_at = Instant::now() + UDP_CLIENT_IDLE_TIMEOUT;
                to_server.hold_datagram(arrived, bytes);
            }
            received = server.recv(&mut buf) => match received {
                Ok(n) => {
                    let arrived = Instant::now();
                    idle_at = arrived + UDP_CLIENT_IDLE_TIMEOUT;
                    to_client.hold_datagram(arrived, buf[..n].to_vec());
                }
                // A connected socket reports the upstream's ICMP errors, such as a refused port
                // while it restarts; the mapping stays.
                Err(error) => tracing::debug!(%client, %error, "udp receive from upstream failed"),
            },
            () = sleep_until(idle_at), if to_server.is_empty() && to_client.is_empty() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};
    use std::future::Future;

    use super::*;

    /// Longest any one step of a test may take before the test fails.
    const WAIT: Duration = Duration::from_secs(10);
    const LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

    async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
        match timeout(WAIT, future).await {
            Ok(output) => output,
            Err(_) => panic!("no {what} within {WAIT:?}"),
        }
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn delayed(delay_ms: u64, jitter_ms: u64) -> Faults {
        Faults {
            delay: ms(delay_ms),
            jitter: ms(jitter_ms),
            ..Faults::default()
        }
    }

    /// Binds a proxy for `link` and serves it in the background; returns where it listens.
    async fn start(link: Link, faults: Faults, seed: u64) -> SocketAddr {
        let config = ProxyConfig {
            links: vec![link],
            faults,
            seed,
        };
        let bound = bind(&config).await.expect("bind the proxy");
        let listen = bound.local_addrs()[0];
        tokio::spawn(bound.run());
        listen
    }

    async fn tcp_echo() -> SocketAddr {
        let listener = TcpListener::bind(LOCAL)
            .await
            .expect("bind the echo server");
        let addr = listener.local_addr().expect("echo server address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                        write.shutdown().await.ok();
                    }
                });
            }
        });
        addr
    }

    async fn udp_echo() -> SocketAddr {
        let socket = UdpSocket::bind(LOCAL).await.expect("bind the echo server");
        let addr = socket.local_addr().expect("echo server address");
        tokio::spawn(async move {
            let mut buf = vec![0; UDP_DATAGRAM_BYTES_MAX];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                socket.send_to(&buf[..n], from).await.ok();
            }
        });
        addr
    }

    async fn udp_client(proxy: SocketAddr) -> UdpSocket {
        let socket = UdpSocket::bind(LOCAL).await.expect("bind a client");
        socket.connect(proxy).await.expect("connect a client");
        socket
    }

    /// Receives `count` datagrams, each a big-endian `u32`, in arrival order.
    async fn receive_numbers(socket: &UdpSocket, count: usize) -> Vec<u32> {
        let mut numbers = Vec::with_capacity(count);
        let mut buf = [0; 4];
        while numbers.len() < count {
            let n = socket.recv(&mut buf).await.expect("receive a datagram");
            assert_eq!(n, 4, "a datagram changed size");
            numbers.push(u32::from_be_bytes(buf));
        }
        numbers
    }

    #[tokio::test]
    async fn tcp_stream_arrives_intact_and_in_order() {
        let upstream = tcp_echo().await;
        let proxy = start(
            Link::Tcp {
                listen: LOCAL,
                upstream,
            },
            delayed(50, 30),
            1,
        )
        .await;
        let stream = within("connection", TcpStream::connect(proxy))
            .await
            .expect("connect");
        let (mut read, mut write) = stream.into_split();
        let mut rng = StdRng::seed_from_u64(7);
        let writes: Vec<Vec<u8>> = (0..200)
            .map(|_| (0..rng.gen_range(1..=2000)).map(|_| rng.gen()).collect())
            .collect();
        let sent = writes.concat();
        let writer = tokio::spawn(async move {
            for bytes in writes {
                write.write_all(&bytes).await?;
                // Pacing, not synchronisation: spaced writes become separate chunks, each with
                // its own jitter, which the proxy must still release in order.
                tokio::time::sleep(ms(1)).await;
            }
            write.shutdown().await
        });
        let mut received = Vec::new();
        within("end of the echo", read.read_to_end(&mut received))
            .await
            .expect("read the echo");
        within("writer", writer)
            .await
            .expect("writer task")
            .expect("write");
        assert_eq!(received.len(), sent.len(), "echoed length");
        let first_difference = received.iter().zip(&sent).position(|(a, b)| a != b);
        assert_eq!(first_difference, None, "echo differs from what was sent");
    }

    #[tokio::test]
    async fn tcp_round_trip_pays_the_delay_each_way() {
        let faults = delayed(50, 30);
        let upstream = tcp_echo().await;
        let proxy = start(
            Link::Tcp {
                listen: LOCAL,
                upstream,
            },
            faults,
            2,
        )
        .await;
        let mut stream = within("connection", TcpStream::connect(proxy))
            .await
            .expect("connect");
        let started = Instant::now();
        stream.write_all(b"ping").await.expect("write");
        let mut reply = [0; 4];
        within("echo", stream.read_exact(&mut reply))
            .await
            .expect("read");
        let round_trip = started.elapsed();
        assert_eq!(&reply, b"ping");
        let least = 2 * faults.delay;
        let most = 2 * (faults.delay + faults.jitter) + ms(250);
        assert!(
            (least..most).contains(&round_trip),
            "round trip {round_trip:?} is outside {least:?}..{most:?}"
        );
    }

    #[tokio::test]
    async fn tcp_half_close_reaches_upstream_and_its_reply_still_returns() {
        let listener = TcpListener::bind(LOCAL).await.expect("bind upstream");
        let upstream = listener.local_addr().expect("upstream address");
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await?;
            let mut request = Vec::new();
            stream.read_to_end(&mut request).await?;
            let reply = format!("got {} bytes after EOF", request.len());
            stream.write_all(reply.as_bytes()).await?;
            stream.shutdown().await
        });
        let proxy = start(
            Link::Tcp {
                listen: LOCAL,
                upstream,
            },
            delayed(20, 10),
            3,
        )
        .await;
        let mut stream = within("connection", TcpStream::connect(proxy))
            .await
            .expect("connect");
        stream.write_all(b"hello").await.expect("write");
        stream.shutdown().await.expect("shut down the write half");
        let mut reply = String::new();
        within("reply and EOF", stream.read_to_string(&mut reply))
            .await
            .expect("read the reply");
        assert_eq!(reply, "got 5 bytes after EOF");
        within("upstream", server)
            .await
            .expect("upstream task")
            .expect("upstream I/O");
    }

    #[tokio::test]
    async fn tcp_refused_upstream_closes_the_client_and_the_proxy_lives_on() {
        let refusing = {
            let listener = TcpListener::bind(LOCAL).await.expect("bind");
            listener.local_addr().expect("address")
        };
        let proxy = start(
            Link::Tcp {
                listen: LOCAL,
                upstream: refusing,
            },
            Faults::default(),
            4,
        )
        .await;
        // The second connection closing proves the proxy accepted and handled it after the first.
        for attempt in ["first", "second"] {
            let mut stream = within("connection", TcpStream::connect(proxy))
                .await
                .expect("connect");
            let mut buf = [0; 1];
            let read = within("close", stream.read(&mut buf)).await;
            assert!(
                read.as_ref().map_or(true, |&n| n == 0),
                "{attempt} connection read {read:?} instead of closing"
            );
        }
    }

    #[tokio::test]
    async fn udp_duplicate_sends_every_datagram_twice() {
        let faults = Faults {
            duplicate: 1.0,
            ..Faults::default()
        };
        let proxy = start(
            Link::Udp {
                listen: LOCAL,
                upstream: udp_echo().await,
            },
            faults,
            5,
        )
        .await;
        let client = udp_client(proxy).await;
        for number in 0..20u32 {
            client.send(&number.to_be_bytes()).await.expect("send");
        }
        let mut copies: HashMap<u32, usize> = HashMap::new();
        within("two copies of every datagram", async {
            while copies.len() < 20 || copies.values().any(|&n| n < 2) {
                for number in receive_numbers(&client, 1).await {
                    *copies.entry(number).or_default() += 1;
                }
            }
        })
        .await;
        assert!(
            copies.keys().all(|&number| number < 20),
            "unknown datagrams: {copies:?}"
        );
    }

    /// Sends 200 numbered datagrams back to back through a jittery proxy and returns the echoes
    /// in arrival order, checking that none was lost.
    async fn echo_200_with_jitter(reorder: bool) -> Vec<u32> {
        let faults = Faults {
            reorder,
            ..delayed(10, 50)
        };
        let proxy = start(
            Link::Udp {
                listen: LOCAL,
                upstream: udp_echo().await,
            },
            faults,
            6,
        )
        .await;
        let client = udp_client(proxy).await;
        for number in 0..200u32 {
            client.send(&number.to_be_bytes()).await.expect("send");
        }
        let received = within("200 echoes", receive_numbers(&client, 200)).await;
        let distinct: BTreeSet<u32> = received.iter().copied().collect();
        assert_eq!(distinct, (0..200).collect(), "lost or foreign datagrams");
        received
    }

    #[tokio::test]
    async fn udp_reorder_with_jitter_reorders_without_loss() {
        let received = echo_200_with_jitter(true).await;
        assert!(
            received.windows(2).any(|pair| pair[0] > pair[1]),
            "jitter of 50 ms over back-to-back datagrams reordered none"
        );
    }

    #[tokio::test]
    async fn udp_without_reorder_keeps_arrival_order() {
        let received = echo_200_with_jitter(false).await;
        assert_eq!(received, (0..200).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn udp_clients_get_only_their_own_replies() {
        let faults = Faults {
            reorder: true,
            ..delayed(5, 5)
        };
        let proxy = start(
            Link::Udp {
                listen: LOCAL,
                upstream: udp_echo().await,
            },
            faults,
            7,
        )
        .await;
        let clients = [udp_client(proxy).await, udp_client(proxy).await];
        for number in 0..10u32 {
            for (base, client) in [0, 1000].into_iter().zip(&clients) {
                client
                    .send(&(base + number).to_be_bytes())
                    .await
                    .expect("send");
            }
        }
        for (base, client) in [0, 1000].into_iter().zip(&clients) {
            let received = within("own replies", receive_numbers(client, 10)).await;
            let distinct: BTreeSet<u32> = received.into_iter().collect();
            assert_eq!(
                distinct,
                (base..base + 10).collect(),
                "client {base} got others' replies"
            );
        }
    }

    #[test]
    fn ordered_lane_releases_in_arrival_order_within_the_delay() {
        let faults = delayed(10, 50);
        let mut lane = Lane::new(faults, true, 8);
        let start = Instant::now();
        for i in 0..100 {
            lane.hold(start + Duration::from_micros(i * 100), i);
        }
        let mut released = Vec::new();
        while let (Some(release), Some(item)) = (lane.next_release(), lane.pop_next()) {
            assert!(
                release >= start + faults.delay,
                "item {item} released before the delay"
            );
            released.push(item);
        }
        assert_eq!(released, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn unordered_lane_reorders_and_repeats_its_choices_for_the_same_seed() {
        let releases = |seed| {
            let mut lane = Lane::new(delayed(10, 50), false, seed);
            let start = Instant::now();
            for i in 0..100 {
                lane.hold(start + Duration::from_micros(i * 100), i);
            }
            std::iter::from_fn(|| lane.pop_next()).collect::<Vec<u64>>()
        };
        let first = releases(9);
        assert_ne!(
            first,
            (0..100).collect::<Vec<_>>(),
            "jitter reordered nothing"
        );
        assert_eq!(first, releases(9), "the same seed chose differently");
    }

    #[tokio::test]
    async fn bind_rejects_bad_configs() {
        let link = Link::Tcp {
            listen: LOCAL,
            upstream: LOCAL,
        };
        let bad = [
            (vec![], Faults::default(), "no links"),
            (
                vec![link],
                Faults {
                    duplicate: 1.5,
                    ..Faults::default()
                },
                "duplicate probability",
            ),
            (
                vec![link],
                Faults {
                    duplicate: f64::NAN,
                    ..Faults::default()
                },
                "duplicate probability",
            ),
            (
                vec![link],
                Faults {
                    delay: Duration::MAX,
                    ..Faults::default()
                },
                "plus jitter",
            ),
        ];
        for (links, faults, expected) in bad {
            let config = ProxyConfig {
                links,
                faults,
                seed: 0,
            };
            let error = bind(&config).await.err().map(|error| error.to_string());
            assert!(
                error
                    .as_deref()
                    .is_some_and(|error| error.contains(expected)),
                "{config:?}: expected an error about {expected:?}, got {error:?}"
            );
        }
    }

    #[test]
    fn parse_link_reads_good_specs() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("test address");
        assert_eq!(
            parse_link("tcp:127.0.0.1:17001=10.77.0.12:7000").expect("tcp spec"),
            Link::Tcp {
                listen: addr("127.0.0.1:17001"),
                upstream: addr("10.77.0.12:7000")
            }
        );
        assert_eq!(
            parse_link("udp:0.0.0.0:7000=[fd00::2]:7000").expect("udp spec"),
            Link::Udp {
                listen: addr("0.0.0.0:7000"),
                upstream: addr("[fd00::2]:7000")
            }
        );
    }

    #[test]
    fn parse_link_explains_bad_specs() {
        let bad = [
            ("", "expected tcp:LISTEN=UPSTREAM"),
            ("tcp", "expected tcp:LISTEN=UPSTREAM"),
            ("sctp:127.0.0.1:1=127.0.0.1:2", "unknown protocol \"sctp\""),
            ("tcp:127.0.0.1:1", "expected tcp:LISTEN=UPSTREAM"),
            ("tcp:127.0.0.1=127.0.0.1:2", "listen address \"127.0.0.1\""),
            (
                "udp:127.0.0.1:1=localhost:2",
                "upstream address \"localhost:2\"",
            ),
            (
                "tcp:127.0.0.1:1=127.0.0.1:2=127.0.0.1:3",
                "upstream address",
            ),
            ("TCP:127.0.0.1:1=127.0.0.1:2", "unknown protocol"),
        ];
        for (spec, expected) in bad {
            let error = parse_link(spec).err().map(|error| format!("{error:#}"));
            assert!(
                error
                    .as_deref()
                    .is_some_and(|error| error.contains(expected)),
                "{spec:?}: expected an error containing {expected:?}, got {error:?}"
            );
        }
    }
}
