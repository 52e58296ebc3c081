//! UDP links: every client address gets its own socket connected upstream, and each direction of
//! that mapping is a lane of datagrams that may be duplicated and, with `reorder`, leave at their
//! own release times.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use super::lane::{sleep_until_some, Lane};
use super::Faults;

/// Largest UDP payload.
const UDP_DATAGRAM_BYTES_MAX: usize = 65_535;
/// Client mappings per UDP link; datagrams from further clients are dropped.
const UDP_CLIENTS_MAX: usize = 1024;
/// Datagrams held per direction of a client mapping, and datagrams waiting for the mapping to
/// take them; further ones are dropped.
const UDP_QUEUE_DATAGRAMS_MAX: usize = 1024;
/// A client mapping without traffic in either direction for this long is removed.
const UDP_CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

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
        let copies = if self.draw_duplicate() { 2 } else { 1 };
        self.hold(arrived, Datagram { bytes, copies });
    }
}

/// A datagram from a client with the time it arrived, on its way to the client's mapping.
type Arrival = (Instant, Vec<u8>);

/// Receives datagrams on `socket` and hands each to its client's mapping, creating one (with
/// its own socket to `upstream`) for a new client, until receiving fails.
pub(super) async fn serve_udp(
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
    use std::collections::BTreeSet;

    use super::*;
    use crate::proxy::testing::{delayed, start, within, LOCAL};
    use crate::proxy::Link;

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
    async fn udp_duplicate_sends_every_datagram_twice() {
        let faults = Faults { duplicate: 1.0, ..Faults::default() };
        let proxy = start(Link::Udp { listen: LOCAL, upstream: udp_echo().await }, faults, 5).await;
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
        assert!(copies.keys().all(|&number| number < 20), "unknown datagrams: {copies:?}");
    }

    /// Sends 200 numbered datagrams back to back through a jittery proxy and returns the echoes
    /// in arrival order, checking that none was lost.
    async fn echo_200_with_jitter(reorder: bool) -> Vec<u32> {
        let faults = Faults { reorder, ..delayed(10, 50) };
        let proxy = start(Link::Udp { listen: LOCAL, upstream: udp_echo().await }, faults, 6).await;
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
        let faults = Faults { reorder: true, ..delayed(5, 5) };
        let proxy = start(Link::Udp { listen: LOCAL, upstream: udp_echo().await }, faults, 7).await;
        let clients = [udp_client(proxy).await, udp_client(proxy).await];
        for number in 0..10u32 {
            for (base, client) in [0, 1000].into_iter().zip(&clients) {
                client.send(&(base + number).to_be_bytes()).await.expect("send");
            }
        }
        for (base, client) in [0, 1000].into_iter().zip(&clients) {
            let received = within("own replies", receive_numbers(client, 10)).await;
            let distinct: BTreeSet<u32> = received.into_iter().collect();
            assert_eq!(distinct, (base..base + 10).collect(), "client {base} got others' replies");
        }
    }
}
