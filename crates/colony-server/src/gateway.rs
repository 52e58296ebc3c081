//! The executor gateway: QUIC (mutual TLS) on the server's port number over UDP. Joins are
//! admitted here, executors register and heartbeat here, assignments and kills go out and
//! status reports come in here. Only the leader keeps sessions; other servers redirect.
//!
//! Liveness lives in `Sessions`, in the leader's memory: a heartbeat never touches Raft. What
//! does (admission, registration, reports) goes through the proposer like any other command.

use crate::node::Node;
use crate::proposer::ProposeError;
use crate::sessions::Link as SessionLink;
use colony_core::leader::{check_hello, Hello, HelloRefusal, SessionId};
use colony_core::{Command, ExecutorId, FencingToken, Outcome, TaskId};
use colony_proto::convert::executor_spec_from_hello;
use colony_proto::link::{report_command, running_attempts};
use colony_proto::pb::{
    self, executor_message::Body as In, server_message::Body as Out, LinkErrorCode,
};
use colony_quic::{CloseCode, ClusterCa, FrameError, Token};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument as _;

/// Messages queued to one executor; a session this far behind is closed, not buffered.
const OUTBOX_MESSAGES_MAX: usize = 4096;
/// Reports from one executor being committed at once.
const REPORTS_IN_FLIGHT_MAX: usize = 256;
/// How long a new connection has to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves executors once the cluster CA exists (the bootstrap leader creates it; every other
/// server finds it in the replicated state).
pub async fn start(node: Arc<Node>, addr: SocketAddr) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut changes = node.raft().metrics();
    let ca = loop {
        let record = node.state().machine.ca().cloned();
        if let Some(record) = record {
            break ClusterCa::from_pem(&record.cert_pem, &record.key_pem)
                .context("the replicated cluster CA is unreadable")?;
        }
        changes.changed().await.context("raft stopped before the cluster CA was created")?;
    };
    run(node, addr, ca).await
}

/// Serves executors on `addr` (UDP) until the process ends.
async fn run(node: Arc<Node>, addr: SocketAddr, ca: ClusterCa) -> anyhow::Result<()> {
    let server_cert = ca.issue_server_cert()?;
    let config = colony_quic::server_config(&ca, &server_cert)?;
    let endpoint = quinn::Endpoint::server(config, addr)?;
    tracing::info!(%addr, "executor gateway listening (QUIC)");
    let ca = Arc::new(ca);
    let admission = Arc::new(tokio::sync::Mutex::new(()));
    let mut serial = 0u64;
    while let Some(incoming) = endpoint.accept().await {
        serial += 1;
        let (node, ca, admission) = (node.clone(), ca.clone(), admission.clone());
        let this_serial = serial;
        tokio::spawn(async move {
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(e) => {
                    node.metrics().quic_errors.with_label_values(&["handshake"]).inc();
                    tracing::debug!("executor handshake failed: {e}");
                    return;
                }
            };
            node.metrics().quic_connections.inc();
            let result = serve_connection(
                &node,
                &ca,
                &admission,
                connection.clone(),
                SessionId(this_serial),
            )
            .await;
            node.metrics().quic_connections.dec();
            if let Err(why) = result {
                node.metrics().quic_errors.with_label_values(&["protocol"]).inc();
                tracing::info!(remote = %connection.remote_address(), "executor connection dropped: {why}");
                CloseCode::PeerFault.close(&connection, &why);
            }
        });
    }
    Ok(())
}

type Link = (quinn::SendStream, quinn::RecvStream);

async fn reply(link: &mut Link, body: Out) -> Result<(), String> {
    colony_quic::write_frame(&mut link.0, &pb::ServerMessage { body: Some(body) })
        .await
        .map_err(|e| format!("cannot write: {e}"))
}

/// Answers with a `LinkError` and lets it arrive before the connection is dropped: a close
/// overtakes stream data, and the executor needs the message to know the refusal is final.
async fn refuse(link: &mut Link, code: LinkErrorCode, message: String) -> Result<(), String> {
    reply(link, Out::Error(pb::LinkError { message: message.clone(), code: code.into() })).await?;
    finish(link, Duration::from_secs(1)).await;
    Err(message)
}

/// Ends our side of the stream and waits (up to `within`) until the peer has read it: a
/// connection closed at once could overtake the last message.
async fn finish(link: &mut Link, within: Duration) {
    let _ = link.0.finish();
    let _ = tokio::time::timeout(within, link.0.stopped()).await;
}

async fn read(recv: &mut quinn::RecvStream) -> Result<Option<pb::ExecutorMessage>, String> {
    colony_quic::read_frame(recv, colony_quic::FRAME_BYTES_MAX).await.map_err(|e| match e {
        FrameError::TooLarge { .. } | FrameError::Malformed(_) | FrameError::Truncated => {
            format!("malformed message: {e}")
        }
        other => format!("read failed: {other}"),
    })
}

/// Where executors should go instead, when this server does not lead.
fn redirect(node: &Node) -> Option<Out> {
    let metrics = node.raft().metrics();
    let metrics = metrics.borrow();
    if metrics.state == openraft::ServerState::Leader {
        return None;
    }
    let leader_address = metrics
        .current_leader
        .and_then(|leader| {
            metrics.membership_config.membership().get_node(&leader).map(|n| n.addr.clone())
        })
        .unwrap_or_default();
    Some(Out::Redirect(pb::Redirect { leader_address }))
}

async fn serve_connection(
    node: &Arc<Node>,
    ca: &ClusterCa,
    admission: &tokio::sync::Mutex<()>,
    connection: quinn::Connection,
    session: SessionId,
) -> Result<(), String> {
    let accepted = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, connection.accept_bi()).await;
    let mut link: Link = match accepted {
        Ok(Ok(link)) => link,
        Ok(Err(_)) => return Ok(()),
        Err(_) => return Err("no stream opened in time".to_owned()),
    };
    let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, read(&mut link.1))
        .await
        .map_err(|_| "no first message in time".to_owned())??;
    let Some(first) = first else { return Ok(()) };
    if let Some(redirect) = redirect(node) {
        reply(&mut link, redirect).await?;
        finish(&mut link, Duration::from_secs(1)).await;
        CloseCode::GoingAway.close(&connection, "not the leader");
        return Ok(());
    }
    match first.body {
        Some(In::Join(join)) => {
            let answer = match admit(node, ca, admission, &join).await {
                Ok(accepted) => Out::JoinAccepted(accepted),
                Err((code, message)) => Out::Error(pb::LinkError { message, code: code.into() }),
            };
            reply(&mut link, answer).await?;
            finish(&mut link, Duration::from_secs(2)).await;
            CloseCode::Ok.close(&connection, "joined");
            Ok(())
        }
        Some(In::Hello(hello)) => {
            // Everything logged for this session carries the executor's id.
            let span = tracing::info_span!("executor", executor_id = hello.executor_id);
            serve_executor(node, connection, link, hello, session).instrument(span).await
        }
        _ => Err("the first message must be Join or Hello".to_owned()),
    }
}

/// Admits an executor holding a valid join token and signs its certificate.
async fn admit(
    node: &Node,
    ca: &ClusterCa,
    admission: &tokio::sync::Mutex<()>,
    join: &pb::Join,
) -> Result<pb::JoinAccepted, (LinkErrorCode, String)> {
    let invalid_token = |message: String| (LinkErrorCode::InvalidToken, message);
    let token: Token =
        join.token.parse().map_err(|e| invalid_token(format!("invalid join token: {e}")))?;
    if token.ca_fingerprint != ca.fingerprint() {
        return Err(invalid_token("the join token was issued by another cluster".to_owned()));
    }
    let secret_hash = token.secret_hash();
    if !node.state().machine.join_token_valid(&secret_hash, colony_core::JoinKind::Executor) {
        return Err(invalid_token(
            "the join token is unknown, has expired, or is not an executor token".to_owned(),
        ));
    }
    // One admission at a time: the certificate names the id the command will allocate.
    let _guard = admission.lock().await;
    let expected_id = node.state().machine.next_executor_id();
    let cert_pem = ca.sign_executor_csr(&join.csr_pem, expected_id.0).map_err(|e| {
        (LinkErrorCode::InvalidRequest, format!("invalid certificate request: {e}"))
    })?;
    let cert_fingerprint = colony_quic::cert_fingerprint(&cert_pem).map_err(|e| {
        (LinkErrorCode::InvalidRequest, format!("cannot fingerprint the certificate: {e}"))
    })?;
    let command = Command::AdmitExecutor {
        secret_hash,
        expected_id,
        name: join.name.clone(),
        cert_fingerprint,
    };
    match node.propose(command).await {
        Ok(Outcome::Admitted { id }) => {
            tracing::info!(executor_id = %id, name = %join.name, "executor admitted");
            Ok(pb::JoinAccepted { executor_id: id.0, cert_pem, ca_pem: ca.cert_pem().to_owned() })
        }
        Ok(other) => Err((LinkErrorCode::Unspecified, format!("unexpected outcome {other:?}"))),
        Err(ProposeError::Rejected(e)) => Err((LinkErrorCode::Rejected, e.to_string())),
        Err(e) => Err((LinkErrorCode::Unspecified, e.to_string())),
    }
}

/// A registered executor's session: heartbeats, reports, and what the leader sends it.
async fn serve_executor(
    node: &Arc<Node>,
    connection: quinn::Connection,
    mut link: Link,
    hello: pb::Hello,
    session: SessionId,
) -> Result<(), String> {
    let id = ExecutorId(hello.executor_id);
    let fingerprint = colony_quic::peer_cert_fingerprint(&connection)
        .ok_or("Hello requires a client certificate; join first")?;
    let checked = {
        let state = node.state();
        check_hello(&state.machine, id, &fingerprint, executor_spec_from_hello(&hello))
    };
    if checked.is_ok() {
        // Heard now: the registration commits (and the detector watches it) before the session
        // opens.
        node.sessions().hello(id);
    }
    match checked {
        Ok(Hello::AlreadyUp) => {}
        Ok(Hello::Register(command)) => match node.propose(command).await {
            Ok(_) => tracing::info!(executor_id = %id, "executor registered"),
            Err(ProposeError::Rejected(e)) => {
                return refuse(&mut link, LinkErrorCode::Rejected, e.to_string()).await
            }
            Err(e) => {
                CloseCode::GoingAway.close(&connection, "leadership changed");
                return Err(format!("registration not committed: {e}"));
            }
        },
        Err(refusal @ HelloRefusal::UnknownExecutor(_)) => {
            return refuse(&mut link, LinkErrorCode::UnknownExecutor, refusal.to_string()).await
        }
        Err(refusal @ HelloRefusal::InvalidSpec(_)) => {
            return refuse(&mut link, LinkErrorCode::InvalidRequest, refusal.to_string()).await
        }
        Err(refusal @ HelloRefusal::WrongCertificate(_)) => return Err(refusal.to_string()),
    }
    let (limits, workflow_limits) = {
        let state = node.state();
        (state.machine.limits().clone(), state.machine.workflow_limits().clone())
    };

    let (outbox, mut outgoing) = mpsc::channel(OUTBOX_MESSAGES_MAX);
    // The more executors, the less often each heartbeats, so the leader takes a bounded rate.
    let interval = node
        .sessions()
        .welcome_interval(&node.state().machine, node.config().executor_heartbeat_interval);
    let interval_ms = interval.as_millis() as u64;
    reply(&mut link, Out::Welcome(pb::Welcome { heartbeat_interval_ms: interval_ms })).await?;
    let effects = {
        let state = node.state();
        let session_link = SessionLink { session, outbox, connection: connection.clone() };
        node.sessions().open(&state.machine, id, session_link, &running_attempts(&hello.running))
    };
    node.perform(effects).await;

    // Reading and writing run apart: a frame read is not cancel-safe (it cannot sit in a
    // `select!`), and a writer blocked on flow control must never stop the reader, or the two
    // sides can each wait for the other to read.
    let (mut send, recv) = link;
    let mut reader = tokio::spawn(read_executor(node.clone(), id, recv, limits, workflow_limits));
    let result = loop {
        tokio::select! {
            message = outgoing.recv() => {
                let Some(message) = message else { break Ok(()) };
                if let Err(e) = colony_quic::write_frame(&mut send, &message).await {
                    break Err(format!("cannot write: {e}"));
                }
            }
            read = &mut reader => break read.unwrap_or_else(|e| Err(format!("reader failed: {e}"))),
        }
    };
    reader.abort();
    if CloseCode::Stopping.closed_by_peer_with(&connection) {
        let effects = node.sessions().stopped(&node.state().machine, id, session);
        node.perform(effects).await;
        return Ok(());
    }
    node.sessions().closed(id, session);
    result
}

/// Handles what an executor sends: heartbeats (liveness, reconciliation) and reports (each
/// proposed on its own task; at most `REPORTS_IN_FLIGHT_MAX` at once, then reading waits).
async fn read_executor(
    node: Arc<Node>,
    id: ExecutorId,
    mut recv: quinn::RecvStream,
    limits: colony_core::Limits,
    workflow_limits: colony_core::WorkflowLimits,
) -> Result<(), String> {
    let reports = Arc::new(Semaphore::new(REPORTS_IN_FLIGHT_MAX));
    loop {
        let Some(message) = read(&mut recv).await? else { return Ok(()) };
        match message.body {
            Some(In::Heartbeat(heartbeat)) => {
                let effects = {
                    let state = node.state();
                    node.sessions().heartbeat(
                        &state.machine,
                        id,
                        &running_attempts(&heartbeat.running),
                    )
                };
                node.perform(effects).await;
            }
            Some(In::Report(report)) => {
                // Liveness: a heartbeat queued behind a burst of reports arrives late.
                node.sessions().heard(id);
                // A report the server cannot take is answered as refused, once: the executor
                // drops it and the session goes on.
                let command = match report_command(id, &report, &limits, &workflow_limits) {
                    Ok(command) => command,
                    Err(e) => {
                        let error = format!("report {} refused: {e}", report.report_id);
                        tracing::info!(executor_id = %id, "{error}");
                        node.metrics().reports_refused.inc();
                        let ack = pb::ReportAck { report_id: report.report_id, error };
                        node.sessions().send(id, Out::ReportAck(ack));
                        continue;
                    }
                };
                let Ok(permit) = reports.clone().acquire_owned().await else { return Ok(()) };
                let node = node.clone();
                let span = tracing::info_span!("report", executor_id = %id, task_id = report.task_id, token = report.fencing_token);
                let (task, token) = (TaskId(report.task_id), FencingToken(report.fencing_token));
                let finished =
                    matches!(report.status, Some(pb::status_report::Status::Finished(_)));
                let mut traced = crate::traces::report(&report.traceparent, task, token);
                tokio::spawn(
                    async move {
                        let started = Instant::now();
                        let error = match node.propose(command).await {
                            Ok(_) => String::new(),
                            Err(ProposeError::Rejected(e)) => e.to_string(),
                            // Unknown outcome: no ack, so the executor resends after reconnecting.
                            Err(_) => return,
                        };
                        if let Some(mut traced) = traced.take() {
                            if !error.is_empty() {
                                traced.fail(error.clone());
                            }
                            traced.end();
                        }
                        if finished {
                            node.sessions().traces().ended(task);
                        }
                        node.metrics()
                            .agent_communication_seconds
                            .with_label_values(&["leader", "executor"])
                            .observe(started.elapsed().as_secs_f64());
                        if !error.is_empty() {
                            tracing::info!("report refused: {error}");
                            node.metrics().reports_refused.inc();
                        }
                        node.sessions().send(
                            id,
                            Out::ReportAck(pb::ReportAck { report_id: report.report_id, error }),
                        );
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            _ => return Err("expected Heartbeat or StatusReport".to_owned()),
        }
    }
}
