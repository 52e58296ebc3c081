//! A user-space link-fault proxy: the chaos suite's only way to add delay, jitter, duplication
//! and reordering to a link, because the test kernel has no `tc netem`.
//!
//! The suite runs it as a child process inside a network namespace under a dedicated group id,
//! and its nftables rules exclude that group from the redirects, so the proxy's own upstream
//! traffic is never redirected back into it and it needs no socket marks. Each [`Link`] listens
//! on one address and forwards to one upstream: TCP connection by connection, UDP datagram by
//! datagram with one upstream socket per client address. Every random choice comes from
//! [`ProxyConfig::seed`], so the same seed and the same arrival sequence give the same choices.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;

mod lane;
mod tcp;
#[cfg(test)]
mod testing;
mod udp;

/// Largest delay plus jitter accepted, which keeps every deadline far from `Instant` overflow.
const DELAY_MAX: Duration = Duration::from_secs(3600);

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
    Tcp { listener: TcpListener, upstream: SocketAddr },
    Udp { socket: UdpSocket, upstream: SocketAddr },
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
                let socket =
                    UdpSocket::bind(listen).await.with_context(|| format!("bind udp {listen}"))?;
                let local_addr = socket.local_addr()?;
                (Listener::Udp { socket, upstream }, local_addr)
            }
        };
        listeners.push(listener);
        local_addrs.push(local_addr);
    }
    Ok(Bound { listeners, local_addrs, faults: config.faults, seed: config.seed })
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
                    links.spawn(tcp::serve_tcp(listener, upstream, self.faults, seed))
                }
                Listener::Udp { socket, upstream } => {
                    links.spawn(udp::serve_udp(socket, upstream, self.faults, seed))
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
    let (protocol, addrs) =
        spec.split_once(':').with_context(|| format!("link {spec:?}: {syntax}"))?;
    if protocol != "tcp" && protocol != "udp" {
        bail!("link {spec:?}: unknown protocol {protocol:?}; {syntax}");
    }
    let (listen, upstream) =
        addrs.split_once('=').with_context(|| format!("link {spec:?}: {syntax}"))?;
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
            self.delay.checked_add(self.jitter).is_some_and(|most| most <= DELAY_MAX),
            "delay {:?} plus jitter {:?} is more than {DELAY_MAX:?}",
            self.delay,
            self.jitter
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::LOCAL;
    use super::*;

    #[tokio::test]
    async fn bind_rejects_bad_configs() {
        let link = Link::Tcp { listen: LOCAL, upstream: LOCAL };
        let bad = [
            (vec![], Faults::default(), "no links"),
            (vec![link], Faults { duplicate: 1.5, ..Faults::default() }, "duplicate probability"),
            (
                vec![link],
                Faults { duplicate: f64::NAN, ..Faults::default() },
                "duplicate probability",
            ),
            (vec![link], Faults { delay: Duration::MAX, ..Faults::default() }, "plus jitter"),
        ];
        for (links, faults, expected) in bad {
            let config = ProxyConfig { links, faults, seed: 0 };
            let error = bind(&config).await.err().map(|error| error.to_string());
            assert!(
                error.as_deref().is_some_and(|error| error.contains(expected)),
                "{config:?}: expected an error about {expected:?}, got {error:?}"
            );
        }
    }

    #[test]
    fn parse_link_reads_good_specs() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("test address");
        assert_eq!(
            parse_link("tcp:127.0.0.1:17001=10.77.0.12:7000").expect("tcp spec"),
            Link::Tcp { listen: addr("127.0.0.1:17001"), upstream: addr("10.77.0.12:7000") }
        );
        assert_eq!(
            parse_link("udp:0.0.0.0:7000=[fd00::2]:7000").expect("udp spec"),
            Link::Udp { listen: addr("0.0.0.0:7000"), upstream: addr("[fd00::2]:7000") }
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
            ("udp:127.0.0.1:1=localhost:2", "upstream address \"localhost:2\""),
            ("tcp:127.0.0.1:1=127.0.0.1:2=127.0.0.1:3", "upstream address"),
            ("TCP:127.0.0.1:1=127.0.0.1:2", "unknown protocol"),
        ];
        for (spec, expected) in bad {
            let error = parse_link(spec).err().map(|error| format!("{error:#}"));
            assert!(
                error.as_deref().is_some_and(|error| error.contains(expected)),
                "{spec:?}: expected an error containing {expected:?}, got {error:?}"
            );
        }
    }
}
