//! TLS on a gRPC port: the acceptor that picks a configuration by the name a client asks for
//! (the Raft name requires a server certificate) and records who connected, for tonic's
//! `serve_with_incoming`. The servers use it, and so do tests that stand up a fake service.
//!
//! Handshakes run concurrently (a slow or silent client cannot hold up the others), each within
//! [`HANDSHAKE_TIMEOUT`], at most [`HANDSHAKES_MAX`] at once.

use colony_quic::{CertRole, GrpcServerTls, RAFT_SERVER_NAME};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKES_MAX: usize = 256;
/// Finished handshakes waiting for the HTTP/2 server to take them.
const ACCEPTED_BUFFER: usize = 64;

/// How a connection arrived, as every request on it sees it (`Request::extensions`).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// The role the client certificate names, if one was presented (verified by the handshake).
    pub peer: Option<CertRole>,
    /// Whether the client asked for the Raft name (and so presented a server certificate).
    pub raft: bool,
}

/// One accepted TLS connection.
pub struct Conn {
    stream: TlsStream<TcpStream>,
    info: ConnInfo,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections, completes TLS handshakes concurrently and yields the connections
/// that finished one, for `serve_with_incoming`.
pub fn accept(
    listener: TcpListener,
    tls: GrpcServerTls,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_BUFFER);
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES_MAX));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
            let (tcp, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: wait a moment rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (tx, tls) = (tx.clone(), tls.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tcp, remote, &tls)).await {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, "TLS handshake refused: {e}"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn handshake(tcp: TcpStream, remote: SocketAddr, tls: &GrpcServerTls) -> io::Result<Conn> {
    tcp.set_nodelay(true)?;
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
    let raft = start.client_hello().server_name() == Some(RAFT_SERVER_NAME);
    let config = if raft { tls.raft.clone() } else { tls.api.clone() };
    let stream = start.into_stream(config).await?;
    let peer = stream.get_ref().1.peer_certificates().and_then(colony_quic::peer_role);
    Ok(Conn { stream, info: ConnInfo { remote: Some(remote), peer, raft } })
}
