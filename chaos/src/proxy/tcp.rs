//! TCP links: every accepted connection gets its own connection upstream, and each direction is
//! read in chunks that wait in an ordered lane, so jitter delays a stream but never reorders it.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, Instant};

use super::lane::{sleep_until_some, Lane};
use super::Faults;

/// Bytes read from a TCP stream at once; each read is one delayed chunk.
const TCP_CHUNK_BYTES_MAX: usize = 64 * 1024;
/// Bytes held per TCP direction; reading stops while this many wait for release.
const TCP_QUEUE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Open connections per TCP link; a connection accepted beyond it is closed at once.
const TCP_CONNECTIONS_MAX: usize = 1024;
/// Time allowed to connect upstream before the accepted connection is closed.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `listener` and forwards each to `upstream` in its own task, until
/// accepting fails.
pub(super) async fn serve_tcp(
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
            pipe(server_read, client_write, Lane::new(faults, true, down_seed)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::{delayed, ms, start, within, LOCAL};
    use crate::proxy::Link;

    async fn tcp_echo() -> SocketAddr {
        let listener = TcpListener::bind(LOCAL).await.expect("bind the echo server");
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

    #[tokio::test]
    async fn tcp_stream_arrives_intact_and_in_order() {
        let upstream = tcp_echo().await;
        let proxy = start(Link::Tcp { listen: LOCAL, upstream }, delayed(50, 30), 1).await;
        let stream = within("connection", TcpStream::connect(proxy)).await.expect("connect");
        let (mut read, mut write) = stream.into_split();
        let mut rng = StdRng::seed_from_u64(7);
        let writes: Vec<Vec<u8>> =
            (0..200).map(|_| (0..rng.gen_range(1..=2000)).map(|_| rng.gen()).collect()).collect();
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
        within("end of the echo", read.read_to_end(&mut received)).await.expect("read the echo");
        within("writer", writer).await.expect("writer task").expect("write");
        assert_eq!(received.len(), sent.len(), "echoed length");
        let first_difference = received.iter().zip(&sent).position(|(a, b)| a != b);
        assert_eq!(first_difference, None, "echo differs from what was sent");
    }

    #[tokio::test]
    async fn tcp_round_trip_pays_the_delay_each_way() {
        let faults = delayed(50, 30);
        let upstream = tcp_echo().await;
        let proxy = start(Link::Tcp { listen: LOCAL, upstream }, faults, 2).await;
        let mut stream = within("connection", TcpStream::connect(proxy)).await.expect("connect");
        let started = Instant::now();
        stream.write_all(b"ping").await.expect("write");
        let mut reply = [0; 4];
        within("echo", stream.read_exact(&mut reply)).await.expect("read");
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
        let proxy = start(Link::Tcp { listen: LOCAL, upstream }, delayed(20, 10), 3).await;
        let mut stream = within("connection", TcpStream::connect(proxy)).await.expect("connect");
        stream.write_all(b"hello").await.expect("write");
        stream.shutdown().await.expect("shut down the write half");
        let mut reply = String::new();
        within("reply and EOF", stream.read_to_string(&mut reply)).await.expect("read the reply");
        assert_eq!(reply, "got 5 bytes after EOF");
        within("upstream", server).await.expect("upstream task").expect("upstream I/O");
    }

    #[tokio::test]
    async fn tcp_refused_upstream_closes_the_client_and_the_proxy_lives_on() {
        let refusing = {
            let listener = TcpListener::bind(LOCAL).await.expect("bind");
            listener.local_addr().expect("address")
        };
        let proxy =
            start(Link::Tcp { listen: LOCAL, upstream: refusing }, Faults::default(), 4).await;
        // The second connection closing proves the proxy accepted and handled it after the first.
        for attempt in ["first", "second"] {
            let mut stream =
                within("connection", TcpStream::connect(proxy)).await.expect("connect");
            let mut buf = [0; 1];
            let read = within("close", stream.read(&mut buf)).await;
            assert!(
                read.as_ref().map_or(true, |&n| n == 0),
                "{attempt} connection read {read:?} instead of closing"
            );
        }
    }
}
