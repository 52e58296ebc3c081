//! End-to-end tests over real quinn endpoints on loopback: handshakes, pinning, mutual TLS and
//! framing, with no mocks.

use std::future::IntoFuture;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use quinn::{Connection, Endpoint, RecvStream, SendStream};

use crate::{
    cert_fingerprint, client_endpoint, join_client_config, mutual_client_config, new_key_and_csr,
    peer_cert_fingerprint, read_frame, server_config, write_frame, ClusterCa, FrameError,
    FRAME_BYTES_MAX, SERVER_NAME,
};

/// Every network step finishes in well under this on loopback; a hang fails instead of stalling.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, future: impl IntoFuture<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, future).await.with_context(|| format!("timed out: {what}"))
}

fn server(ca: &ClusterCa) -> anyhow::Result<(Endpoint, SocketAddr)> {
    let config = server_config(ca, &ca.issue_server_cert()?)?;
    let endpoint = Endpoint::server(config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    let addr = endpoint.local_addr()?;
    Ok((endpoint, addr))
}

/// Accepts one connection in the background and reports how its handshake ended.
fn accept_one(
    endpoint: &Endpoint,
) -> tokio::task::JoinHandle<anyhow::Result<Result<Connection, quinn::ConnectionError>>> {
    let endpoint = endpoint.clone();
    tokio::spawn(async move {
        let incoming = within("accept", endpoint.accept()).await?.context("endpoint closed")?;
        within("server handshake", incoming).await
    })
}

async fn connect(
    addr: SocketAddr,
    config: quinn::ClientConfig,
) -> anyhow::Result<Result<Connection, quinn::ConnectionError>> {
    let endpoint = client_endpoint()?;
    let connecting = endpoint.connect_with(config, addr, SERVER_NAME)?;
    within("client handshake", connecting).await
}

/// A joined connection and one bidirectional stream, client send half to server receive half.
struct StreamPair {
    _client: Connection,
    _server: Connection,
    send: SendStream,
    recv: RecvStream,
    // The server's endpoint must outlive the connections it carries.
    _endpoint: Endpoint,
}

/// Opens a stream and sends `raw` on it (so the server sees the stream), then finishes it.
async fn stream_with(raw: &[u8]) -> anyhow::Result<StreamPair> {
    let ca = ClusterCa::generate("frames")?;
    let (endpoint, addr) = server(&ca)?;
    let accepted = accept_one(&endpoint);
    let client = connect(addr, join_client_config(ca.fingerprint())?).await??;
    let server = accepted.await???;
    let (mut send, _) = client.open_bi().await?;
    send.write_all(raw).await?;
    send.finish()?;
    let (_, recv) = within("accept_bi", server.accept_bi()).await??;
    Ok(StreamPair { _client: client, _server: server, send, recv, _endpoint: endpoint })
}

#[tokio::test]
async fn join_with_right_pin_carries_frames_both_ways() -> anyhow::Result<()> {
    let ca = ClusterCa::generate("join")?;
    let (endpoint, addr) = server(&ca)?;
    let accepted = accept_one(&endpoint);
    let client = connect(addr, join_client_config(ca.fingerprint())?).await??;
    let server = accepted.await???;
    ensure!(peer_cert_fingerprint(&server).is_none(), "a joining executor has no certificate");

    let echo = tokio::spawn(async move {
        let (mut send, mut recv) = within("accept_bi", server.accept_bi()).await??;
        let request: String =
            read_frame(&mut recv, FRAME_BYTES_MAX).await?.context("no request")?;
        write_frame(&mut send, &format!("{request} back")).await?;
        send.finish()?;
        ensure!(read_frame::<String>(&mut recv, FRAME_BYTES_MAX).await?.is_none());
        within("client close", server.closed()).await?;
        anyhow::Ok(request)
    });

    let (mut send, mut recv) = client.open_bi().await?;
    write_frame(&mut send, &"hello".to_owned()).await?;
    send.finish()?;
    let reply: Option<String> = within("reply", read_frame(&mut recv, FRAME_BYTES_MAX)).await??;
    ensure!(reply.as_deref() == Some("hello back"), "reply {reply:?}");
    let end: Option<String> = read_frame(&mut recv, FRAME_BYTES_MAX).await?;
    ensure!(end.is_none(), "expected a clean end, got {end:?}");
    client.close(0u32.into(), b"done");
    ensure!(echo.await?? == "hello");
    Ok(())
}

#[tokio::test]
async fn wrong_pin_fails_the_handshake() -> anyhow::Result<()> {
    let ca = ClusterCa::generate("pinned")?;
    let other = ClusterCa::generate("other")?;
    let (endpoint, addr) = server(&ca)?;
    for pin in [other.fingerprint(), [0u8; 32]] {
        let accepted = accept_one(&endpoint);
        let client = connect(addr, join_client_config(pin)?).await?;
        ensure!(client.is_err(), "the client accepted a server outside its pin");
        ensure!(accepted.await??.is_err(), "the server finished a refused handshake");
    }
    Ok(())
}

#[tokio::test]
async fn pinned_ca_in_the_chain_does_not_vouch_for_a_foreign_leaf() -> anyhow::Result<()> {
    // An impostor can copy the public CA certificate into its chain, but its leaf is signed by
    // a CA of its own, so it must fail verification against the pinned CA.
    let ca = ClusterCa::generate("pinned")?;
    let impostor = ClusterCa::generate("impostor")?;
    let config = server_config(&ca, &impostor.issue_server_cert()?)?;
    let endpoint = Endpoint::server(config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    let accepted = accept_one(&endpoint);
    let client = connect(endpoint.local_addr()?, join_client_config(ca.fingerprint())?).await?;
    ensure!(client.is_err(), "the client accepted a leaf its pinned CA never signed");
    ensure!(accepted.await??.is_err());
    Ok(())
}

#[tokio::test]
async fn mutual_tls_identifies_the_executor() -> anyhow::Result<()> {
    let ca = ClusterCa::generate("mutual")?;
    let (endpoint, addr) = server(&ca)?;
    let (key_pem, csr_pem) = new_key_and_csr()?;
    let cert_pem = ca.sign_executor_csr(&csr_pem, 7)?;
    let accepted = accept_one(&endpoint);
    let client = connect(addr, mutual_client_config(ca.cert_pem(), &cert_pem, &key_pem)?).await??;
    let server = accepted.await???;
    ensure!(peer_cert_fingerprint(&server) == Some(cert_fingerprint(&cert_pem)?));
    ensure!(peer_cert_fingerprint(&client).is_some(), "the client sees the server's leaf");
    Ok(())
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() -> anyhow::Result<()> {
    let ca = ClusterCa::generate("mutual")?;
    let rogue = ClusterCa::generate("rogue")?;
    let (endpoint, addr) = server(&ca)?;
    let (key_pem, csr_pem) = new_key_and_csr()?;
    let cert_pem = rogue.sign_executor_csr(&csr_pem, 7)?;
    let accepted = accept_one(&endpoint);
    let client = connect(addr, mutual_client_config(ca.cert_pem(), &cert_pem, &key_pem)?).await?;
    ensure!(accepted.await??.is_err(), "the server accepted a foreign client certificate");
    // In TLS 1.3 the client may finish its side before the server refuses it; then the
    // connection must close rather than carry anything.
    if let Ok(client) = client {
        let reason = within("client sees the close", client.closed()).await?;
        ensure!(!matches!(reason, quinn::ConnectionError::LocallyClosed), "closed for {reason:?}");
    }
    Ok(())
}

#[tokio::test]
async fn read_frame_refuses_a_length_over_the_max() -> anyhow::Result<()> {
    let too_long = u32::try_from(FRAME_BYTES_MAX + 1)?.to_be_bytes();
    let mut pair = stream_with(&too_long).await?;
    match read_frame::<String>(&mut pair.recv, FRAME_BYTES_MAX).await {
        Err(FrameError::TooLarge { len, max }) => {
            ensure!(len == FRAME_BYTES_MAX + 1 && max == FRAME_BYTES_MAX);
        }
        other => bail!("expected TooLarge, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn write_frame_refuses_a_message_over_the_max() -> anyhow::Result<()> {
    let mut pair = stream_with(b"").await?;
    let huge = "x".repeat(FRAME_BYTES_MAX);
    match write_frame(&mut pair.send, &huge).await {
        Err(FrameError::TooLarge { max, .. }) => ensure!(max == FRAME_BYTES_MAX),
        other => bail!("expected TooLarge, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn read_frame_reports_truncation() -> anyhow::Result<()> {
    let mut body_cut = 10u32.to_be_bytes().to_vec();
    body_cut.extend_from_slice(b"abc");
    for raw in [body_cut, vec![0, 0]] {
        let mut pair = stream_with(&raw).await?;
        let result = read_frame::<String>(&mut pair.recv, FRAME_BYTES_MAX).await;
        ensure!(matches!(result, Err(FrameError::Truncated)), "{raw:?} gave {result:?}");
    }
    Ok(())
}

#[tokio::test]
async fn read_frame_reports_bytes_that_are_not_the_message() -> anyhow::Result<()> {
    // Field 1, length-delimited, claims 5 bytes but the frame holds only 1.
    let mut raw = 3u32.to_be_bytes().to_vec();
    raw.extend_from_slice(&[0x0a, 0x05, b'a']);
    let mut pair = stream_with(&raw).await?;
    let result = read_frame::<String>(&mut pair.recv, FRAME_BYTES_MAX).await;
    ensure!(matches!(result, Err(FrameError::Malformed(_))), "got {result:?}");
    Ok(())
}
