//! The executor gateway: QUIC (mutual TLS) on the server's port number over UDP. Joins are
//! admitted here, executors register and heartbeat here, assignments and kills go out and
//! status reports come in here. Only the leader keeps sessions; other servers redirect.
//!
//! Liveness lives in `Sessions`, in the leader's memory: a heartbeat never touches Raft. What
//! does (admission, registration, reports) goes through the proposer like any other command.

use crate::node::Node;
use crate::proposer::ProposeError;
use colony_core::{AttemptOutcome, AttemptResult, AttemptStatus, Command, ExecutorId, ExecutorState, FencingToken, Outcome, TaskId, TaskState};
use colony_proto::convert::executor_spec_from_hello;
use colony_proto::pb::{self, executor_message::Body as In, server_message::Body as Out};
use colony_quic::{ClusterCa, FrameError, JoinToken};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument as _;

/// Messages queued to one executor; a session this far behind is closed, not buffered.
const OUTBOX_MESSAGES_MAX: usize = 4096;
/// Reports from one executor being committed at once.
const REPORTS_IN_FLIGHT_MAX: usize = 256;
/// How long a new connection has to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// An assignment the executor has not acknowledged by listing it is sent again after this long.
const ASSIGN_RESEND_AFTER: Duration = Duration::from_secs(2);
/// Application close codes: 0 is a normal close, 1 the peer's fault, 2 a redirect or shutdown.
const CLOSE_OK: u32 = 0;
const CLOSE_PEER_FAULT: u32 = 1;
const CLOSE_GOING_AWAY: u32 = 2;

/// Connected executors, on the leader.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<HashMap<ExecutorId, Session>>,
}

struct Session {
    outbox: mpsc::Sender<pb::ServerMessage>,
    connection: quinn::Connection,
    last_heartbeat: Instant,
    /// Assignments sent and not yet seen in a heartbeat, with when they were sent.
    sent: HashMap<TaskId, (FencingToken, Instant)>,
    /// Distinguishes this session from a newer one for the same executor.
    serial: u64,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ExecutorId, Session>> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// When the leader last heard from each connected executor.
    pub fn last_heartbeats(&self) -> HashMap<ExecutorId, Instant> {
        self.lock().iter().map(|(&id, s)| (id, s.last_heartbeat)).collect()
    }

    pub fn heartbeat_age(&self, id: ExecutorId) -> Option<Duration> {
        self.lock().get(&id).map(|s| s.last_heartbeat.elapsed())
    }

    pub fn connected(&self) -> usize {
        self.lock().len()
    }

    /// Queues a message; a session whose outbox is full is too far behind and is closed.
    fn send(&self, id: ExecutorId, message: Out) -> bool {
        send_locked(&mut self.lock(), id, message)
    }

    /// Sends each committed assignment to its executor, if connected, and notes when.
    pub fn assign(&self, node: &Node, assignments: &[colony_core::Assignment]) {
        let now = Instant::now();
        let messages: Vec<(&colony_core::Assignment, Out)> = {
            let state = node.state();
            assignments.iter().filter_map(|a| Some((a, assign_message(state.machine.get_task(a.task)?, a.attempt, a.token)))).collect()
        };
        let mut sessions = self.lock();
        for (assignment, message) in messages {
            if send_locked(&mut sessions, assignment.executor, message) {
                if let Some(session) = sessions.get_mut(&assignment.executor) {
                    session.sent.insert(assignment.task, (assignment.token, now));
                }
            }
        }
    }

    pub fn close(&self, id: ExecutorId, why: &str) {
        if let Some(session) = self.lock().remove(&id) {
            session.connection.close(CLOSE_GOING_AWAY.into(), why.as_bytes());
        }
    }

    /// Tells executors at once to kill attempts that just stopped being current (cancelled,
    /// preempted, evicted at a drain deadline), instead of waiting for their next heartbeat.
    pub fn kill_superseded(&self, node: &Node, tasks: &[TaskId], reason: &str) {
        let kills: Vec<(ExecutorId, Out)> = {
            let state = node.state();
            tasks
                .iter()
                .filter_map(|id| state.machine.get_task(*id))
                .filter(|t| !matches!(t.state, TaskState::Assigned | TaskState::Running))
                .filter_map(|t| {
                    let (executor, token) = (t.executor?, t.fencing_token?);
                    Some((executor, Out::Kill(pb::Kill { task_id: t.id.0, fencing_token: token.0, reason: reason.to_owned() })))
                })
                .collect()
        };
        for (executor, kill) in kills {
            self.send(executor, kill);
        }
    }

    /// Closes every session: this server stopped leading, and executors must find the new leader.
    pub fn close_all(&self, why: &str) {
        for (_, session) in self.lock().drain() {
            session.connection.close(CLOSE_GOING_AWAY.into(), why.as_bytes());
        }
    }

    fn remove_if_current(&self, id: ExecutorId, serial: u64) {
        let mut sessions = self.lock();
        if sessions.get(&id).is_some_and(|s| s.serial == serial) {
            sessions.remove(&id);
        }
    }
}

/// Queues `message` for executor `id` under the sessions lock the caller holds; a session whose
/// outbox is full is too far behind and is closed.
fn send_locked(sessions: &mut HashMap<ExecutorId, Session>, id: ExecutorId, message: Out) -> bool {
    let Some(session) = sessions.get(&id) else { return false };
    if session.outbox.try_send(pb::ServerMessage { body: Some(message) }).is_ok() {
        return true;
    }
    session.connection.close(CLOSE_GOING_AWAY.into(), b"outbox full");
    sessions.remove(&id);
    false
}

fn assign_message(task: &colony_core::Task, attempt: u32, token: FencingToken) -> Out {
    Out::Assign(pb::Assign { task_id: task.id.0, attempt, fencing_token: token.0, spec: Some((&task.spec).into()) })
}

/// Serves executors on `addr` (UDP) until the process ends.
pub async fn run(node: Arc<Node>, addr: SocketAddr, ca: ClusterCa) -> anyhow::Result<()> {
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
                    node.metrics.quic_errors.with_label_values(&["handshake"]).inc();
                    tracing::debug!("executor handshake failed: {e}");
                    return;
                }
            };
            node.metrics.quic_connections.inc();
            let result = serve_connection(&node, &ca, &admission, connection.clone(), this_serial).await;
            node.metrics.quic_connections.dec();
            if let Err(why) = result {
                node.metrics.quic_errors.with_label_values(&["protocol"]).inc();
                tracing::info!(remote = %connection.remote_address(), "executor connection dropped: {why}");
                connection.close(CLOSE_PEER_FAULT.into(), why.as_bytes());
            }
        });
    }
    Ok(())
}

type Link = (quinn::SendStream, quinn::RecvStream);

async fn reply(link: &mut Link, body: Out) -> Result<(), String> {
    colony_quic::write_frame(&mut link.0, &pb::ServerMessage { body: Some(body) }).await.map_err(|e| format!("cannot write: {e}"))
}

/// Answers with a `LinkError` and lets it arrive before the connection is dropped: a close
/// overtakes stream data, and the executor needs the message to know the refusal is final.
async fn refuse(link: &mut Link, message: String) -> Result<(), String> {
    reply(link, Out::Error(pb::LinkError { message: message.clone() })).await?;
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
        FrameError::TooLarge { .. } | FrameError::Malformed(_) | FrameError::Truncated => format!("malformed message: {e}"),
        other => format!("read failed: {other}"),
    })
}

/// Where executors should go instead, when this server does not lead.
fn redirect(node: &Node) -> Option<Out> {
    let metrics = node.raft.metrics();
    let metrics = metrics.borrow();
    if metrics.state == openraft::ServerState::Leader {
        return None;
    }
    let leader_address = metrics
        .current_leader
        .and_then(|leader| metrics.membership_config.membership().get_node(&leader).map(|n| n.addr.clone()))
        .unwrap_or_default();
    Some(Out::Redirect(pb::Redirect { leader_address }))
}

async fn serve_connection(
    node: &Arc<Node>,
    ca: &ClusterCa,
    admission: &tokio::sync::Mutex<()>,
    connection: quinn::Connection,
    serial: u64,
) -> Result<(), String> {
    let accepted = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, connection.accept_bi()).await;
    let mut link: Link = match accepted {
        Ok(Ok(link)) => link,
        Ok(Err(_)) => return Ok(()),
        Err(_) => return Err("no stream opened in time".to_owned()),
    };
    let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, read(&mut link.1)).await.map_err(|_| "no first message in time".to_owned())??;
    let Some(first) = first else { return Ok(()) };
    if let Some(redirect) = redirect(node) {
        reply(&mut link, redirect).await?;
        finish(&mut link, Duration::from_secs(1)).await;
        connection.close(CLOSE_GOING_AWAY.into(), b"not the leader");
        return Ok(());
    }
    match first.body {
        Some(In::Join(join)) => {
            let answer = match admit(node, ca, admission, &join).await {
                Ok(accepted) => Out::JoinAccepted(accepted),
                Err(message) => Out::Error(pb::LinkError { message }),
            };
            reply(&mut link, answer).await?;
            finish(&mut link, Duration::from_secs(2)).await;
            connection.close(CLOSE_OK.into(), b"joined");
            Ok(())
        }
        Some(In::Hello(hello)) => {
            // Everything logged for this session carries the executor's id.
            let span = tracing::info_span!("executor", executor_id = hello.executor_id);
            serve_executor(node, connection, link, hello, serial).instrument(span).await
        }
        _ => Err("the first message must be Join or Hello".to_owned()),
    }
}

/// Admits an executor holding a valid join token and signs its certificate.
async fn admit(node: &Node, ca: &ClusterCa, admission: &tokio::sync::Mutex<()>, join: &pb::Join) -> Result<pb::JoinAccepted, String> {
    let token: JoinToken = join.token.parse().map_err(|e| format!("invalid join token: {e}"))?;
    if token.ca_fingerprint != ca.fingerprint() {
        return Err("the join token was issued by another cluster".to_owned());
    }
    let secret_hash = token.secret_hash();
    if !node.state().machine.join_token_valid(&secret_hash) {
        return Err("the join token is unknown or has expired".to_owned());
    }
    // One admission at a time: the certificate names the id the command will allocate.
    let _guard = admission.lock().await;
    let expected_id = node.state().machine.next_executor_id();
    let cert_pem = ca.sign_executor_csr(&join.csr_pem, expected_id.0).map_err(|e| format!("invalid certificate request: {e}"))?;
    let cert_fingerprint = colony_quic::cert_fingerprint(&cert_pem).map_err(|e| format!("cannot fingerprint the certificate: {e}"))?;
    let command = Command::AdmitExecutor { secret_hash, expected_id, name: join.name.clone(), cert_fingerprint };
    match node.proposer.propose(command).await {
        Ok(Outcome::Admitted { id }) => {
            tracing::info!(executor_id = %id, name = %join.name, "executor admitted");
            Ok(pb::JoinAccepted { executor_id: id.0, cert_pem, ca_pem: ca.cert_pem().to_owned() })
        }
        Ok(other) => Err(format!("unexpected outcome {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A registered executor's session: heartbeats, reports, and what the leader sends it.
async fn serve_executor(node: &Arc<Node>, connection: quinn::Connection, mut link: Link, hello: pb::Hello, serial: u64) -> Result<(), String> {
    let id = ExecutorId(hello.executor_id);
    let fingerprint = colony_quic::peer_cert_fingerprint(&connection).ok_or("Hello requires a client certificate; join first")?;
    let (known, state) = {
        let state = node.state();
        let executor = state.machine.get_executor(id);
        (executor.map(|e| e.cert_fingerprint == fingerprint), executor.map(|e| e.state))
    };
    match known {
        None => return refuse(&mut link, format!("executor {id} is unknown to this cluster")).await,
        Some(false) => return Err(format!("the certificate presented is not executor {id}'s")),
        Some(true) => {}
    }
    let spec = executor_spec_from_hello(&hello);
    let limits = node.state().machine.limits().clone();
    if let Err(e) = spec.validate(&limits) {
        return refuse(&mut link, format!("invalid registration: {e}")).await;
    }
    let unchanged = state == Some(ExecutorState::Up) && node.state().machine.get_executor(id).is_some_and(|e| e.spec == spec);
    if !unchanged {
        match node.proposer.propose(Command::RegisterExecutor { id, spec }).await {
            Ok(_) => tracing::info!(executor_id = %id, "executor registered"),
            Err(ProposeError::Rejected(e)) => return refuse(&mut link, e.to_string()).await,
            Err(e) => {
                connection.close(CLOSE_GOING_AWAY.into(), b"leadership changed");
                return Err(format!("registration not committed: {e}"));
            }
        }
    }

    let (outbox, mut outgoing) = mpsc::channel(OUTBOX_MESSAGES_MAX);
    let previous = node.sessions.lock().insert(
        id,
        Session { outbox, connection: connection.clone(), last_heartbeat: Instant::now(), sent: HashMap::new(), serial },
    );
    if let Some(previous) = previous {
        previous.connection.close(CLOSE_GOING_AWAY.into(), b"replaced by a newer connection");
    }
    let interval_ms = node.config.executor_heartbeat_interval.as_millis() as u64;
    reply(&mut link, Out::Welcome(pb::Welcome { heartbeat_interval_ms: interval_ms })).await?;
    node.scheduler_wake.notify_one();
    lose_forgotten_attempts(node, id, &hello.running).await;
    reconcile(node, id, &hello.running);

    // Reading and writing run apart: a frame read is not cancel-safe (it cannot sit in a
    // `select!`), and a writer blocked on flow control must never stop the reader, or the two
    // sides can each wait for the other to read.
    let (mut send, recv) = link;
    let mut reader = tokio::spawn(read_executor(node.clone(), id, recv, limits));
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
    node.sessions.remove_if_current(id, serial);
    result
}

/// Handles what an executor sends: heartbeats (liveness, reconciliation) and reports (each
/// proposed on its own task; at most `REPORTS_IN_FLIGHT_MAX` at once, then reading waits).
async fn read_executor(node: Arc<Node>, id: ExecutorId, mut recv: quinn::RecvStream, limits: colony_core::Limits) -> Result<(), String> {
    let reports = Arc::new(Semaphore::new(REPORTS_IN_FLIGHT_MAX));
    loop {
        let Some(message) = read(&mut recv).await? else { return Ok(()) };
        match message.body {
            Some(In::Heartbeat(heartbeat)) => {
                if let Some(session) = node.sessions.lock().get_mut(&id) {
                    session.last_heartbeat = Instant::now();
                }
                reconcile(&node, id, &heartbeat.running);
            }
            Some(In::Report(report)) => {
                let command = report_command(id, &report, &limits)?;
                let Ok(permit) = reports.clone().acquire_owned().await else { return Ok(()) };
                let node = node.clone();
                let span = tracing::info_span!("report", executor_id = %id, task_id = report.task_id, token = report.fencing_token);
                tokio::spawn(async move {
                    let started = Instant::now();
                    let error = match node.proposer.propose(command).await {
                        Ok(_) => String::new(),
                        Err(ProposeError::Rejected(e)) => e.to_string(),
                        // Unknown outcome: no ack, so the executor resends after reconnecting.
                        Err(_) => return,
                    };
                    node.metrics.agent_communication_seconds.with_label_values(&["leader", "executor"]).observe(started.elapsed().as_secs_f64());
                    node.scheduler_wake.notify_one();
                    if !error.is_empty() {
                        tracing::info!("report refused: {error}");
                    }
                    node.sessions.send(id, Out::ReportAck(pb::ReportAck { report_id: report.report_id, error }));
                    drop(permit);
                }.instrument(span));
            }
            _ => return Err("expected Heartbeat or StatusReport".to_owned()),
        }
    }
}

/// Turns a report into a command, refusing what no honest executor sends.
fn report_command(id: ExecutorId, report: &pb::StatusReport, limits: &colony_core::Limits) -> Result<Command, String> {
    let status = match &report.status {
        Some(pb::status_report::Status::Started(_)) => AttemptStatus::Started,
        Some(pb::status_report::Status::Finished(finished)) => {
            let outcome = match pb::AttemptOutcome::try_from(finished.outcome) {
                Ok(pb::AttemptOutcome::Succeeded) => AttemptOutcome::Succeeded,
                Ok(pb::AttemptOutcome::Failed) => AttemptOutcome::Failed,
                Ok(pb::AttemptOutcome::TimedOut) => AttemptOutcome::TimedOut,
                _ => return Err(format!("report {} has no valid outcome", report.report_id)),
            };
            for (what, text, max) in [
                ("stdout tail", &finished.stdout_tail, limits.output_tail_bytes_max),
                ("stderr tail", &finished.stderr_tail, limits.output_tail_bytes_max),
                ("message", &finished.message, limits.message_bytes_max),
            ] {
                if text.len() > max {
                    return Err(format!("report {}: {what} is {} bytes; the limit is {max}", report.report_id, text.len()));
                }
            }
            AttemptStatus::Finished(AttemptResult {
                outcome,
                exit_code: finished.exit_code,
                stdout_tail: finished.stdout_tail.clone(),
                stderr_tail: finished.stderr_tail.clone(),
                message: finished.message.clone(),
                peak_memory_bytes: finished.peak_memory_bytes,
            })
        }
        None => return Err(format!("report {} has no status", report.report_id)),
    };
    Ok(Command::Report { executor: id, task: TaskId(report.task_id), token: FencingToken(report.fencing_token), status })
}

/// Compares what an executor runs with what the cluster says it holds: sends the assignments it
/// lacks (again, after a while) and kills attempts that are no longer current.
fn reconcile(node: &Node, id: ExecutorId, running: &[pb::RunningTask]) {
    let reported: BTreeMap<TaskId, FencingToken> = running.iter().map(|r| (TaskId(r.task_id), FencingToken(r.fencing_token))).collect();
    let state = node.state();
    let Some(executor) = state.machine.get_executor(id) else { return };
    let mut sessions = node.sessions.lock();
    let Some(session) = sessions.get_mut(&id) else { return };
    let now = Instant::now();
    // What was sent is settled once the executor lists it, or once it no longer holds the task.
    session.sent.retain(|task, _| !reported.contains_key(task) && executor.tasks.contains(task));
    let mut messages = Vec::new();
    for task_id in &executor.tasks {
        let Some(task) = state.machine.get_task(*task_id) else { continue };
        let (Some(token), TaskState::Assigned) = (task.fencing_token, task.state) else { continue };
        if reported.get(task_id) == Some(&token) {
            continue;
        }
        let recently = session.sent.get(task_id).is_some_and(|(t, at)| *t == token && now.duration_since(*at) < ASSIGN_RESEND_AFTER);
        if !recently {
            messages.push(assign_message(task, task.attempt, token));
            session.sent.insert(*task_id, (token, now));
        }
    }
    for (task_id, token) in &reported {
        let current = executor.tasks.contains(task_id) && state.machine.get_task(*task_id).and_then(|t| t.fencing_token) == Some(*token);
        if !current {
            messages.push(Out::Kill(pb::Kill { task_id: task_id.0, fencing_token: token.0, reason: "the attempt is no longer current".to_owned() }));
        }
    }
    for message in messages {
        if !send_locked(&mut sessions, id, message) {
            return;
        }
    }
}

/// On a new connection: attempts the cluster thinks are running there but the executor does
/// not list were lost (the executor restarted); they fail over to a retry.
async fn lose_forgotten_attempts(node: &Node, id: ExecutorId, running: &[pb::RunningTask]) {
    let listed: BTreeSet<u64> = running.iter().map(|r| r.task_id).collect();
    let lost: Vec<(TaskId, FencingToken)> = {
        let state = node.state();
        let Some(executor) = state.machine.get_executor(id) else { return };
        executor
            .tasks
            .iter()
            .filter_map(|t| state.machine.get_task(*t))
            .filter(|t| t.state == TaskState::Running && !listed.contains(&t.id.0))
            .filter_map(|t| t.fencing_token.map(|token| (t.id, token)))
            .collect()
    };
    for (task, token) in lost {
        let status = AttemptStatus::Finished(AttemptResult {
            outcome: AttemptOutcome::Failed,
            exit_code: None,
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            message: format!("attempt lost: executor {id} reconnected without it (restarted)"),
            peak_memory_bytes: None,
        });
        if let Err(e) = node.proposer.propose(Command::Report { executor: id, task, token, status }).await {
            tracing::debug!(task_id = %task, "could not mark a forgotten attempt failed: {e}");
        }
    }
}
