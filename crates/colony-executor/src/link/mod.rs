//! The executor link's main loop: find the leader (following redirects, backing off between
//! rounds), say Hello, then heartbeat, start what is assigned, obey kills and report how attempts
//! went. Unacknowledged reports stay queued in order and are re-sent on every new session;
//! attempts keep running while the link is down. One loop owns all of this state and is driven
//! by a closed set of events.

use crate::attempt::{Attempt, AttemptResult, KillSignal, Outcome};
use crate::builtin;
use crate::dial::{self, describe, Backoff, RoundEnd, Step, Stream};
use crate::health::{self, HealthChange, PortLease, Ports};
use crate::journal::Journal;
use crate::local::LocalApi;
use crate::metrics::Metrics;
use crate::runner::{self, ProcessRun};
use crate::sandbox::Sandbox;
use crate::sim::{self, SimEvent};
use crate::step_io::StepIo;
use colony_core::{ExecutorId, FencingToken, Resources, RunSpec, TaskId, TaskSpec};
use colony_proto::pb;
use colony_quic::FRAME_BYTES_MAX;
use opentelemetry::global::BoxedSpan;
use opentelemetry::trace::{Span as _, SpanKind, Tracer as _};
use opentelemetry::KeyValue;
use quinn::{ClientConfig, Connection, Endpoint, RecvStream, SendStream};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument as _;

/// Attempts running at once; an assignment beyond this fails at once rather than overcommit
/// the host (the scheduler's capacity accounting should never get here).
const ATTEMPTS_RUNNING_MAX: usize = 4096;
/// Reports awaiting acknowledgement; past this the oldest is dropped (the leader's
/// reconciliation then finds the attempt missing and retries the task).
const REPORTS_PENDING_MAX: usize = 65_536;
/// Finished attempts remembered so a repeated `Assign` for one does not run it again.
const FINISHED_REMEMBERED_MAX: usize = 4096;
/// Server messages read ahead of the loop.
const SERVER_MESSAGES_QUEUE_MAX: usize = 256;
/// Time one message may take to write before the connection counts as broken.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds on the server's heartbeat interval, so a zero or absurd value cannot spin or starve.
const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(50);
const HEARTBEAT_INTERVAL_MAX: Duration = Duration::from_secs(60);
/// At shutdown: time for reports to be acknowledged.
const REPORT_FLUSH_MAX: Duration = Duration::from_secs(2);
/// The most of a failed health check's reason sent to the leader.
const HEALTH_MESSAGE_BYTES_MAX: usize = 1024;
/// At shutdown: time beyond the SIGTERM grace for killed processes to be reaped.
const ATTEMPT_REAP_MAX: Duration = Duration::from_secs(1);

/// Why the link gave up for good.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the cluster does not know this executor (it was removed, or its identity is from another cluster): {0}")]
    UnknownExecutor(String),
}

/// True for a `LinkError` that means the cluster does not know this executor: final.
fn is_unknown_executor(error: &pb::LinkError) -> bool {
    error.code() == pb::LinkErrorCode::UnknownExecutor
}

/// What this executor says about itself in `Hello`.
pub(crate) struct Profile {
    pub executor_id: ExecutorId,
    pub name: String,
    pub capacity: Resources,
    pub labels: BTreeMap<String, String>,
    pub capabilities: BTreeSet<String>,
}

/// How assigned attempts are carried out.
#[derive(Clone)]
pub(crate) enum Launcher {
    /// For real: processes, in `sandbox`, each with its local endpoint, and built-in handlers.
    Run { sandbox: Arc<Sandbox>, local: Option<LocalApi> },
    /// For the benchmarks: note the assignment, hold the resources as long as `behaviour` says,
    /// succeed with the peak memory it says.
    Simulate {
        behaviour: sim::Behaviour,
        capacity: Resources,
        events: mpsc::UnboundedSender<SimEvent>,
    },
}

impl Launcher {
    async fn run(
        self,
        attempt: &Attempt,
        spec: &TaskSpec,
        io: &StepIo,
        port: Option<u16>,
        kill: KillSignal,
    ) -> AttemptResult {
        let timeout = spec.timeout_ms.map(Duration::from_millis);
        match (self, &spec.run) {
            (Launcher::Run { sandbox, local }, RunSpec::Process { program, args, env }) => {
                let run = ProcessRun {
                    attempt,
                    program,
                    args,
                    env,
                    timeout,
                    memory_bytes: spec.resources.memory_bytes,
                    cpu_millis: spec.resources.cpu_millis,
                    gpus: spec.resources.gpus,
                    sandbox: &sandbox,
                    io,
                    port,
                    local: local.as_ref().map(|api| (api, spec.namespace.as_str())),
                };
                runner::run(run, kill).await
            }
            (Launcher::Run { .. }, RunSpec::Builtin { .. }) if !io.declared.is_empty() => {
                AttemptResult::failed("a built-in handler writes no outputs; run a program for a step that declares outputs")
            }
            (Launcher::Run { .. }, RunSpec::Builtin { handler, input }) => {
                builtin::run(handler, input, timeout, kill).await
            }
            (Launcher::Simulate { behaviour, capacity, events }, _) => {
                let run = behaviour(spec, &capacity);
                sim::hold(attempt.task_id, &spec.name, run, &io.declared, &events, kill).await
            }
        }
    }
}

/// Everything the link needs.
pub(crate) struct Link {
    pub servers: Vec<String>,
    pub profile: Profile,
    pub launcher: Launcher,
    pub metrics: Arc<Metrics>,
    /// Attempts started here, on disk; `None` for simulated executors, which run nothing.
    pub journal: Option<Journal>,
    /// The ports leased to agent instances.
    pub ports: Arc<Ports>,
    /// The host agent instances are registered at; `None`: the address this executor reaches
    /// the leader from.
    pub advertise_host: Option<String>,
}

/// An attempt that ended, as its task tells the loop.
struct AttemptEnded {
    task: TaskId,
    token: FencingToken,
    result: AttemptResult,
}

/// What an attempt's task tells the loop.
enum FromAttempt {
    Ended(AttemptEnded),
    /// An agent instance's health changed.
    Health(HealthChange),
}

/// What drives a session.
enum Event {
    Server(Box<pb::ServerMessage>),
    ServerGone(String),
    Attempt(FromAttempt),
    HeartbeatDue,
    Shutdown,
}

/// How a session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
    Fatal(String),
}

/// An attempt this executor started and has not seen end.
struct Running {
    resources: Resources,
    /// `None` once a kill was requested: the attempt is superseded and will not be reported.
    kill: Option<oneshot::Sender<()>>,
    /// The attempt's `run` span, when its task is traced (a child of the leader's assignment).
    trace: Option<BoxedSpan>,
}

impl Running {
    fn is_live(&self) -> bool {
        self.kill.is_some()
    }

    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            // The attempt may have ended already; then there is nothing to stop.
            let _ = kill.send(());
        }
    }
}

/// An agent instance's port and health check.
struct Instance {
    lease: Option<PortLease>,
    check: Option<colony_core::HealthCheck>,
    target: health::Target,
}

/// A report not yet acknowledged; `sent_at` is `None` until sent on the current session.
struct Pending {
    report: pb::StatusReport,
    sent_at: Option<Instant>,
}

/// A welcomed connection to the leader.
struct Session {
    conn: Connection,
    send: SendStream,
    inbox: mpsc::Receiver<Result<pb::ServerMessage, String>>,
    reader: tokio::task::JoinHandle<()>,
    heartbeat: tokio::time::Interval,
}

impl Session {
    fn start(stream: Stream, heartbeat_interval_ms: u64) -> Session {
        let interval = Duration::from_millis(heartbeat_interval_ms)
            .clamp(HEARTBEAT_INTERVAL_MIN, HEARTBEAT_INTERVAL_MAX);
        let mut heartbeat = tokio::time::interval_at(Instant::now() + interval, interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (inbox_tx, inbox) = mpsc::channel(SERVER_MESSAGES_QUEUE_MAX);
        let Stream { conn, send, recv } = stream;
        let reader = tokio::spawn(read_server(recv, inbox_tx));
        Session { conn, send, inbox, reader, heartbeat }
    }

    async fn send(&mut self, body: pb::executor_message::Body) -> Result<(), SessionEnd> {
        let message = pb::ExecutorMessage { body: Some(body) };
        match tokio::time::timeout(
            WRITE_TIMEOUT,
            colony_quic::write_frame(&mut self.send, &message),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SessionEnd::Lost(describe(&e))),
            Err(_) => Err(SessionEnd::Lost(format!("a write took longer than {WRITE_TIMEOUT:?}"))),
        }
    }

    fn close(&self, code: colony_quic::CloseCode, reason: &str) {
        code.close(&self.conn, reason);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads the control stream into the loop's inbox; a read is not cancel-safe, so it lives in its
/// own task. Ends after passing on the first error (a malformed message included).
async fn read_server(mut recv: RecvStream, inbox: mpsc::Sender<Result<pb::ServerMessage, String>>) {
    loop {
        let item =
            match colony_quic::read_frame::<pb::ServerMessage>(&mut recv, FRAME_BYTES_MAX).await {
                Ok(Some(message)) => Ok(message),
                Ok(None) => Err("the server closed the control stream".to_owned()),
                Err(e) => Err(describe(&e)),
            };
        let last = item.is_err();
        if inbox.send(item).await.is_err() || last {
            return;
        }
    }
}

/// Connects to `addr` and says Hello; a Welcome makes a session.
async fn connect(
    endpoint: &Endpoint,
    client: &ClientConfig,
    addr: &str,
    hello: &pb::Hello,
    metrics: &Metrics,
) -> Step<Session> {
    let mut stream = match dial::open(endpoint, client, addr).await {
        Ok(stream) => stream,
        Err(e) => {
            metrics.quic_errors.inc();
            return Step::Failed(describe(&e));
        }
    };
    let (step, why) = match dial::request(
        &mut stream,
        pb::executor_message::Body::Hello(hello.clone()),
    )
    .await
    {
        Ok(pb::server_message::Body::Welcome(welcome)) => {
            return Step::Done(Session::start(stream, welcome.heartbeat_interval_ms))
        }
        Ok(pb::server_message::Body::Redirect(redirect)) if redirect.leader_address.is_empty() => {
            (Step::NoLeader, "no leader")
        }
        Ok(pb::server_message::Body::Redirect(redirect)) => {
            (Step::Redirect(redirect.leader_address), "redirected")
        }
        Ok(pb::server_message::Body::Error(error)) if is_unknown_executor(&error) => {
            (Step::Fatal(error.message), "unknown executor")
        }
        Ok(pb::server_message::Body::Error(error)) => {
            (Step::Failed(format!("refused: {}", error.message)), "refused")
        }
        Ok(_) => {
            metrics.quic_errors.inc();
            (Step::Failed("the server answered Hello with something other than Welcome, Redirect or LinkError".to_owned()), "protocol error")
        }
        Err(e) => {
            metrics.quic_errors.inc();
            (Step::Failed(describe(&e)), "no answer")
        }
    };
    stream.close(why);
    step
}

/// The loop's state: attempts, reports, counters.
struct State {
    profile: Profile,
    launcher: Launcher,
    journal: Option<Journal>,
    metrics: Arc<Metrics>,
    running: BTreeMap<(TaskId, FencingToken), Running>,
    finished: BTreeSet<(TaskId, FencingToken)>,
    finished_order: VecDeque<(TaskId, FencingToken)>,
    pending: VecDeque<Pending>,
    next_report_id: u64,
    heartbeat_seq: u64,
    attempts_tx: mpsc::Sender<FromAttempt>,
    draining: bool,
    ports: Arc<Ports>,
    advertise_host: Option<String>,
    /// The host instances are registered at, as the current session found it.
    host: String,
}

impl Link {
    /// Runs until `shutdown` resolves (then stops gracefully) or the cluster disowns this
    /// executor.
    pub(crate) async fn run(
        self,
        endpoint: &Endpoint,
        client: &ClientConfig,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), LinkError> {
        // Every running attempt ends once; health changes come at most once a check interval,
        // and wait their turn when the loop is behind.
        let (attempts_tx, mut attempts_rx) = mpsc::channel(ATTEMPTS_RUNNING_MAX);
        let metrics = self.metrics.clone();
        let mut state = State {
            profile: self.profile,
            launcher: self.launcher,
            journal: self.journal,
            metrics: self.metrics,
            running: BTreeMap::new(),
            finished: BTreeSet::new(),
            finished_order: VecDeque::new(),
            pending: VecDeque::new(),
            next_report_id: 1,
            heartbeat_seq: 0,
            attempts_tx,
            draining: false,
            ports: self.ports,
            host: self.advertise_host.clone().unwrap_or_else(|| "127.0.0.1".to_owned()),
            advertise_host: self.advertise_host,
        };
        let mut shutdown = pin!(shutdown);
        let mut backoff = Backoff::new();
        let mut leader: Option<String> = None;
        let mut announced: Option<String> = None;
        let mut sessions: u64 = 0;
        loop {
            // The last leader first: after a dropped connection it is the likeliest to answer.
            let candidates: Vec<String> = leader
                .iter()
                .chain(self.servers.iter().filter(|s| Some(*s) != leader.as_ref()))
                .cloned()
                .collect();
            let hello = state.hello();
            let (hello, counters) = (&hello, &*metrics);
            let round = dial::round(&candidates, |addr| async move {
                connect(endpoint, client, &addr, hello, counters).await
            });
            let Some(end) =
                state.while_disconnected(round, &mut attempts_rx, shutdown.as_mut()).await
            else {
                state.drain(None, &mut attempts_rx).await;
                return Ok(());
            };
            match end {
                RoundEnd::Done(mut session, addr) => {
                    backoff.reset();
                    announced = None;
                    if sessions > 0 {
                        metrics.reconnects.inc();
                    }
                    sessions += 1;
                    tracing::info!(leader = %addr, running = state.live_count(), "connected to the leader");
                    metrics.set_connected(true);
                    let end = state.serve(&mut session, &mut attempts_rx, shutdown.as_mut()).await;
                    metrics.set_connected(false);
                    match end {
                        SessionEnd::Shutdown => {
                            state.drain(Some(session), &mut attempts_rx).await;
                            return Ok(());
                        }
                        SessionEnd::Fatal(message) => {
                            session.close(colony_quic::CloseCode::Ok, "unknown executor");
                            state.drain(None, &mut attempts_rx).await;
                            return Err(LinkError::UnknownExecutor(message));
                        }
                        SessionEnd::Lost(reason) => {
                            metrics.quic_errors.inc();
                            session.close(colony_quic::CloseCode::Ok, "session lost");
                            state.disconnected();
                            tracing::warn!(leader = %addr, %reason, running = state.live_count(), "lost the leader; attempts keep running while reconnecting");
                            leader = Some(addr);
                        }
                    }
                }
                RoundEnd::Fatal(message) => {
                    state.drain(None, &mut attempts_rx).await;
                    return Err(LinkError::UnknownExecutor(message));
                }
                RoundEnd::Exhausted(reason) => {
                    leader = None;
                    if announced.as_ref() != Some(&reason) {
                        tracing::warn!(%reason, "no leader reachable; retrying with backoff");
                        announced = Some(reason);
                    } else {
                        tracing::debug!(%reason, "no leader reachable");
                    }
                }
            }
            let pause = tokio::time::sleep(backoff.next_delay());
            if state.while_disconnected(pause, &mut attempts_rx, shutdown.as_mut()).await.is_none()
            {
                state.drain(None, &mut attempts_rx).await;
                return Ok(());
            }
        }
    }
}

impl State {
    /// Awaits `work` while recording attempts that end meanwhile; `None` if shutdown came first.
    async fn while_disconnected<F: Future>(
        &mut self,
        work: F,
        attempts_rx: &mut mpsc::Receiver<FromAttempt>,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> Option<F::Output> {
        let mut work = pin!(work);
        loop {
            tokio::select! {
                output = &mut work => return Some(output),
                () = &mut shutdown => return None,
                Some(from) = attempts_rx.recv() => self.on_attempt(from),
            }
        }
    }

    /// Serves one welcomed session until it ends.
    async fn serve(
        &mut self,
        session: &mut Session,
        attempts_rx: &mut mpsc::Receiver<FromAttempt>,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> SessionEnd {
        self.host = match (&self.advertise_host, session.conn.local_ip()) {
            (Some(host), _) => host.clone(),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => self.host.clone(),
        };
        if let Err(end) = self.flush(session).await {
            return end;
        }
        loop {
            let event = tokio::select! {
                () = &mut shutdown => Event::Shutdown,
                message = session.inbox.recv() => match message {
                    Some(Ok(message)) => Event::Server(Box::new(message)),
                    Some(Err(reason)) => Event::ServerGone(reason),
                    None => Event::ServerGone("the reader stopped".to_owned()),
                },
                Some(from) = attempts_rx.recv() => Event::Attempt(from),
                _ = session.heartbeat.tick() => Event::HeartbeatDue,
            };
            let step = match event {
                Event::Shutdown => return SessionEnd::Shutdown,
                Event::ServerGone(reason) => return SessionEnd::Lost(reason),
                Event::Server(message) => self.on_server(*message, session).await,
                Event::Attempt(from) => {
                    self.on_attempt(from);
                    self.flush(session).await
                }
                Event::HeartbeatDue => self.heartbeat(session).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    async fn on_server(
        &mut self,
        message: pb::ServerMessage,
        session: &mut Session,
    ) -> Result<(), SessionEnd> {
        use pb::server_message::Body;
        match message.body {
            Some(Body::Assign(assign)) => {
                self.on_assign(assign);
                self.flush(session).await
            }
            Some(Body::Kill(kill)) => {
                self.on_kill(kill);
                Ok(())
            }
            Some(Body::ReportAck(ack)) => {
                self.on_ack(ack);
                Ok(())
            }
            Some(Body::Error(error)) if is_unknown_executor(&error) => {
                Err(SessionEnd::Fatal(error.message))
            }
            Some(Body::Error(error)) => {
                Err(SessionEnd::Lost(format!("the server ended the session: {}", error.message)))
            }
            Some(Body::Welcome(_) | Body::Redirect(_) | Body::JoinAccepted(_)) => {
                Err(SessionEnd::Lost(
                    "the server sent a handshake message in an established session".to_owned(),
                ))
            }
            None => Err(SessionEnd::Lost("the server sent an empty message".to_owned())),
        }
    }

    fn on_assign(&mut self, assign: pb::Assign) {
        let task = TaskId(assign.task_id);
        let token = FencingToken(assign.fencing_token);
        if self.draining {
            tracing::debug!(%task, %token, "assignment refused: shutting down");
            return;
        }
        if self.running.contains_key(&(task, token)) || self.finished.contains(&(task, token)) {
            tracing::debug!(%task, %token, "assignment already known");
            return;
        }
        // A newer token for the task supersedes any older attempt of it still running here.
        for running in
            self.running.range_mut((task, FencingToken(0))..(task, token)).map(|(_, r)| r)
        {
            running.kill();
        }
        let attempt = Attempt {
            task_id: task,
            attempt: assign.attempt,
            fencing_token: token,
            executor_id: self.profile.executor_id,
        };
        self.queue_report(task, token, pb::status_report::Status::Started(pb::Started {}));
        if self.journal.as_ref().is_some_and(|j| j.started_before_restart((task, token))) {
            return self.refuse(&attempt, "this executor restarted while the attempt was starting or running; an attempt never starts twice".to_owned());
        }
        let io = StepIo {
            inputs: assign.inputs.into_iter().collect(),
            declared: assign.outputs.into_iter().collect(),
        };
        let spec = match assign.spec.map(TaskSpec::try_from) {
            Some(Ok(spec)) => spec,
            Some(Err(e)) => return self.refuse(&attempt, format!("invalid task spec: {e}")),
            None => return self.refuse(&attempt, "the assignment carries no task spec".to_owned()),
        };
        if self.running.len() >= ATTEMPTS_RUNNING_MAX {
            return self.refuse(
                &attempt,
                format!("the executor already runs {ATTEMPTS_RUNNING_MAX} attempts"),
            );
        }
        let instance = match assign.agent {
            None => None,
            Some(agent) => match self.instance(&attempt, &agent) {
                Ok(instance) => Some(instance),
                Err(message) => return self.refuse(&attempt, message),
            },
        };
        if let Some(Err(e)) = self.journal.as_mut().map(|j| j.record((task, token))) {
            return self
                .refuse(&attempt, format!("cannot record the attempt before starting it: {e}"));
        }
        tracing::info!(%task, attempt = attempt.attempt, %token, name = %spec.name, "starting attempt");
        let (kill_tx, kill_rx) = oneshot::channel();
        let trace = run_span(&assign.traceparent, &attempt, &spec.name);
        self.running.insert(
            (task, token),
            Running { resources: spec.resources.clone(), kill: Some(kill_tx), trace },
        );
        let launcher = self.launcher.clone();
        let attempts_tx = self.attempts_tx.clone();
        // Everything logged while the attempt runs carries its task, attempt and token.
        let span =
            tracing::info_span!("attempt", task_id = %task, attempt = attempt.attempt, %token);
        tokio::spawn(
            async move {
                let port = instance.as_ref().and_then(|i| i.lease.as_ref()).map(|l| l.port);
                let run = launcher.run(&attempt, &spec, &io, port, kill_rx);
                let result = match instance {
                    None => run.await,
                    Some(instance) => {
                        let mut run = pin!(run);
                        let (changes_tx, mut changes_rx) = mpsc::unbounded_channel();
                        let mut watch =
                            pin!(health::watch(instance.check, instance.target, changes_tx));
                        loop {
                            tokio::select! {
                                result = &mut run => break result,
                                () = &mut watch => break run.await,
                                Some(change) = changes_rx.recv() => {
                                    // The loop is gone only when the executor stops.
                                    let _ = attempts_tx.send(FromAttempt::Health(change)).await;
                                }
                            }
                        }
                        // The port is given back here, once the instance has ended.
                    }
                };
                // Only a stopped executor has no receiver, and then nobody is left to tell.
                let _ = attempts_tx
                    .send(FromAttempt::Ended(AttemptEnded {
                        task: attempt.task_id,
                        token: attempt.fencing_token,
                        result,
                    }))
                    .await;
            }
            .instrument(span),
        );
        self.update_gauges();
    }

    /// What an agent instance gets besides its run: a leased port and its health check's target.
    fn instance(&self, attempt: &Attempt, agent: &pb::AgentRun) -> Result<Instance, String> {
        let check = match agent.health.clone().map(colony_core::HealthCheck::try_from) {
            None => None,
            Some(Ok(check)) => Some(check),
            Some(Err(e)) => return Err(format!("invalid health check: {e}")),
        };
        let lease = match agent.port {
            false => None,
            true => Some(self.ports.lease().ok_or_else(|| {
                "no port of this executor's range is free for the instance".to_owned()
            })?),
        };
        let port = lease.as_ref().map(|l| l.port);
        let (dir, run_as) = match &self.launcher {
            Launcher::Run { sandbox, .. } => {
                (runner::work_dir(&sandbox.work_root, attempt), sandbox.run_as.clone())
            }
            Launcher::Simulate { .. } => (std::env::temp_dir(), None),
        };
        let target = health::Target {
            task: attempt.task_id,
            token: attempt.fencing_token,
            address: health::address(&self.host, port),
            port,
            dir,
            run_as,
        };
        Ok(Instance { lease, check, target })
    }

    /// Reports an assignment that cannot run as failed at once.
    fn refuse(&mut self, attempt: &Attempt, message: String) {
        tracing::warn!(task = %attempt.task_id, token = %attempt.fencing_token, %message, "assignment failed before starting");
        self.metrics.attempt_ended(Outcome::Failed);
        self.remember_finished((attempt.task_id, attempt.fencing_token));
        if let Some(finished) = AttemptResult::failed(message).finished() {
            self.queue_report(
                attempt.task_id,
                attempt.fencing_token,
                pb::status_report::Status::Finished(finished),
            );
        }
    }

    fn on_kill(&mut self, kill: pb::Kill) {
        let task = TaskId(kill.task_id);
        let token = FencingToken(kill.fencing_token);
        match self.running.get_mut(&(task, token)) {
            Some(running) if running.is_live() => {
                tracing::info!(%task, %token, reason = %kill.reason, "killing attempt");
                running.kill();
                self.update_gauges();
            }
            _ => tracing::debug!(%task, %token, "kill for an attempt not running here"),
        }
    }

    fn on_ack(&mut self, ack: pb::ReportAck) {
        let Some(index) = self.pending.iter().position(|p| p.report.report_id == ack.report_id)
        else {
            tracing::debug!(report_id = ack.report_id, "acknowledgement for an unknown report");
            return;
        };
        if let Some(pending) = self.pending.remove(index) {
            if let Some(sent_at) = pending.sent_at {
                self.metrics.observe_report_round_trip(sent_at.elapsed());
            }
            if !ack.error.is_empty() {
                // Expected for reports on attempts the leader has since superseded.
                tracing::info!(task = pending.report.task_id, token = pending.report.fencing_token, error = %ack.error, "the leader rejected a report; dropped");
            }
        }
        self.metrics.reports_pending.set(saturating_i64(self.pending.len()));
    }

    fn on_attempt(&mut self, from: FromAttempt) {
        match from {
            FromAttempt::Ended(ended) => self.on_attempt_ended(ended),
            FromAttempt::Health(change) => self.on_health(change),
        }
    }

    /// Reports an instance's health while its attempt is live (a superseded one has nothing to
    /// say).
    fn on_health(&mut self, change: HealthChange) {
        let live = self.running.get(&(change.task, change.token)).is_some_and(|r| r.is_live());
        if !live {
            return;
        }
        tracing::info!(task = %change.task, token = %change.token, healthy = change.healthy, address = %change.address, message = %change.message, "instance health changed");
        self.queue_report(
            change.task,
            change.token,
            pb::status_report::Status::Health(pb::Health {
                healthy: change.healthy,
                address: change.address,
                message: crate::attempt::truncated(&change.message, HEALTH_MESSAGE_BYTES_MAX),
            }),
        );
    }

    fn on_attempt_ended(&mut self, ended: AttemptEnded) {
        let key = (ended.task, ended.token);
        let Some(mut running) = self.running.remove(&key) else { return };
        self.update_gauges();
        let live = running.is_live();
        let traceparent = match running.trace.take() {
            Some(mut span) => {
                let outcome = if live { ended.result.outcome.label() } else { "killed" };
                span.set_attribute(KeyValue::new("colony.attempt.outcome", outcome));
                if outcome != "succeeded" {
                    span.set_status(opentelemetry::trace::Status::error(outcome));
                }
                span.end();
                colony_process::trace::traceparent(span.span_context())
            }
            None => String::new(),
        };
        if !live {
            self.metrics.attempt_ended(Outcome::Killed);
            tracing::debug!(task = %ended.task, token = %ended.token, "killed attempt ended");
            return;
        }
        let result = ended.result;
        self.metrics.attempt_ended(result.outcome);
        tracing::info!(task = %ended.task, token = %ended.token, outcome = result.outcome.label(), message = %result.message, "attempt ended");
        if let Some(finished) = result.finished() {
            self.remember_finished(key);
            self.queue_report(
                ended.task,
                ended.token,
                pb::status_report::Status::Finished(finished),
            );
            if let Some(pending) = self.pending.back_mut() {
                pending.report.traceparent = traceparent;
            }
        }
    }

    fn remember_finished(&mut self, key: (TaskId, FencingToken)) {
        if self.finished.insert(key) {
            self.finished_order.push_back(key);
        }
        while self.finished_order.len() > FINISHED_REMEMBERED_MAX {
            if let Some(old) = self.finished_order.pop_front() {
                self.finished.remove(&old);
            }
        }
    }

    fn queue_report(
        &mut self,
        task: TaskId,
        token: FencingToken,
        status: pb::status_report::Status,
    ) {
        if self.pending.len() >= REPORTS_PENDING_MAX {
            if let Some(dropped) = self.pending.pop_front() {
                tracing::warn!(
                    task = dropped.report.task_id,
                    "too many unacknowledged reports; dropped the oldest"
                );
            }
        }
        let report_id = self.next_report_id;
        self.next_report_id += 1;
        let report = pb::StatusReport {
            report_id,
            task_id: task.0,
            fencing_token: token.0,
            status: Some(status),
            traceparent: String::new(),
        };
        self.pending.push_back(Pending { report, sent_at: None });
        self.metrics.reports_pending.set(saturating_i64(self.pending.len()));
    }

    /// Sends, in order, every report not yet sent on this session.
    async fn flush(&mut self, session: &mut Session) -> Result<(), SessionEnd> {
        for pending in self.pending.iter_mut().filter(|p| p.sent_at.is_none()) {
            session.send(pb::executor_message::Body::Report(pending.report.clone())).await?;
            pending.sent_at = Some(Instant::now());
        }
        Ok(())
    }

    async fn heartbeat(&mut self, session: &mut Session) -> Result<(), SessionEnd> {
        self.heartbeat_seq += 1;
        let heartbeat = pb::Heartbeat { seq: self.heartbeat_seq, running: self.running_list() };
        session.send(pb::executor_message::Body::Heartbeat(heartbeat)).await?;
        self.metrics.heartbeats.inc();
        Ok(())
    }

    /// The attempts the leader should consider running here: live ones, and finished ones whose
    /// `Finished` report is not acknowledged yet (until it commits the leader still holds them
    /// as running, and must neither re-send nor reclaim them).
    fn running_list(&self) -> Vec<pb::RunningTask> {
        let live = self.running.iter().filter(|(_, r)| r.is_live()).map(|(key, _)| *key);
        let unreported = self
            .pending
            .iter()
            .filter(|p| matches!(p.report.status, Some(pb::status_report::Status::Finished(_))))
            .map(|p| (TaskId(p.report.task_id), FencingToken(p.report.fencing_token)));
        let all: BTreeSet<(TaskId, FencingToken)> = live.chain(unreported).collect();
        all.into_iter()
            .map(|(task, token)| pb::RunningTask { task_id: task.0, fencing_token: token.0 })
            .collect()
    }

    fn hello(&self) -> pb::Hello {
        let profile = &self.profile;
        pb::Hello {
            executor_id: profile.executor_id.0,
            name: profile.name.clone(),
            capacity: Some((&profile.capacity).into()),
            labels: profile.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            capabilities: profile.capabilities.iter().cloned().collect(),
            running: self.running_list(),
        }
    }

    fn live_count(&self) -> usize {
        self.running.values().filter(|r| r.is_live()).count()
    }

    fn update_gauges(&self) {
        let mut allocated = Resources::default();
        for running in self.running.values().filter(|r| r.is_live()) {
            allocated.cpu_millis =
                allocated.cpu_millis.saturating_add(running.resources.cpu_millis);
            allocated.memory_bytes =
                allocated.memory_bytes.saturating_add(running.resources.memory_bytes);
            allocated.gpus = allocated.gpus.saturating_add(running.resources.gpus);
        }
        self.metrics.set_allocated(&allocated);
        self.metrics.running_tasks.set(saturating_i64(self.live_count()));
    }

    /// The session is gone: every unacknowledged report goes out again on the next one.
    fn disconnected(&mut self) {
        for pending in &mut self.pending {
            pending.sent_at = None;
        }
    }

    /// Graceful stop: refuse new work, kill running attempts (they are not reported: the
    /// leader reschedules them once this executor is gone), give outstanding reports up to
    /// `REPORT_FLUSH_MAX` to be acknowledged, and close the connection with code 0.
    async fn drain(
        &mut self,
        session: Option<Session>,
        attempts_rx: &mut mpsc::Receiver<FromAttempt>,
    ) {
        self.draining = true;
        // Attempts that ended before the stop are reported, not mistaken for killed ones.
        while let Ok(from) = attempts_rx.try_recv() {
            self.on_attempt(from);
        }
        if self.live_count() > 0 {
            tracing::info!(running = self.live_count(), "stopping: killing running attempts");
        }
        for running in self.running.values_mut() {
            running.kill();
        }
        self.update_gauges();
        let deadline = Instant::now() + runner::TERM_GRACE + ATTEMPT_REAP_MAX;
        while !self.running.is_empty() {
            tokio::select! {
                Some(from) = attempts_rx.recv() => self.on_attempt(from),
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(left = self.running.len(), "attempts still ending at shutdown; leaving them to be killed on exit");
                    break;
                }
            }
        }
        let Some(mut session) = session else { return };
        let deadline = Instant::now() + REPORT_FLUSH_MAX;
        let flushed = tokio::time::timeout_at(deadline, self.flush(&mut session)).await;
        if matches!(flushed, Ok(Ok(()))) {
            while !self.pending.is_empty() {
                tokio::select! {
                    message = session.inbox.recv() => match message {
                        Some(Ok(pb::ServerMessage { body: Some(pb::server_message::Body::ReportAck(ack)) })) => self.on_ack(ack),
                        // Assignments and kills no longer matter: nothing new starts, everything is stopped.
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        if !self.pending.is_empty() {
            tracing::warn!(reports = self.pending.len(), "stopping with unacknowledged reports");
        }
        // The leader declares this executor down at once rather than after its heartbeat
        // timeout, so nothing more is placed here.
        session.close(colony_quic::CloseCode::Stopping, "executor shutting down");
    }
}

fn saturating_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The `run` span of an attempt whose assignment carries a trace context; none otherwise, or when
/// this executor exports no traces.
fn run_span(traceparent: &str, attempt: &Attempt, name: &str) -> Option<BoxedSpan> {
    if !colony_process::trace::enabled() {
        return None;
    }
    let parent = colony_process::trace::parse_traceparent(traceparent)?;
    let tracer = colony_process::trace::tracer();
    let span = tracer
        .span_builder("run")
        .with_kind(SpanKind::Consumer)
        .with_attributes([
            KeyValue::new("colony.task.id", attempt.task_id.0 as i64),
            KeyValue::new("colony.task.name", name.to_owned()),
            KeyValue::new("colony.task.attempt", i64::from(attempt.attempt)),
            KeyValue::new("colony.fencing_token", attempt.fencing_token.0 as i64),
            KeyValue::new("colony.executor.id", attempt.executor_id.0 as i64),
        ])
        .start_with_context(&tracer, &colony_process::trace::parent(&parent));
    Some(span)
}

#[cfg(test)]
mod tests;
