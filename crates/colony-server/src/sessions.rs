//! The executors connected to this server (only while it leads): their QUIC links beside the
//! leader component that decides what to tell them (`colony_core::leader`).
//!
//! Every input goes to the component under one lock, and the sends and closes it decides are
//! queued under the same lock, so messages to one executor leave in the order they were decided.
//! Effects that wait (proposals) and wake-ups are handed back to the caller.

use crate::traces::TaskTraces;
use colony_core::leader::{CloseReason, Effect, Leader, LeaderConfig, RunningAttempt, SessionId};
use colony_core::{ExecutorId, FencingToken, Outcome, StateMachine, TaskId};
use colony_process::trace;
use colony_proto::pb;
use colony_quic::CloseCode;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// How the server reaches one executor's session.
pub struct Link {
    pub session: SessionId,
    /// Messages queued to the session's writer; a session this far behind is closed, not buffered.
    pub outbox: mpsc::Sender<pb::ServerMessage>,
    pub connection: quinn::Connection,
}

struct Inner {
    leader: Leader,
    links: HashMap<ExecutorId, Link>,
}

/// Connected executors and the leader's decisions about them.
pub struct Sessions {
    inner: Mutex<Inner>,
    traces: TaskTraces,
}

impl Sessions {
    pub fn new(config: LeaderConfig) -> Sessions {
        let inner = Inner { leader: Leader::new(config, Instant::now()), links: HashMap::new() };
        Sessions { inner: Mutex::new(inner), traces: TaskTraces::default() }
    }

    /// The traces of the tasks this leader placed (when traces are exported).
    pub fn traces(&self) -> &TaskTraces {
        &self.traces
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// This server took office now.
    pub fn became_leader(&self) {
        self.lock().leader.became_leader(Instant::now());
    }

    /// A registered executor's new session; an older session of the same executor is closed.
    pub fn open(
        &self,
        state: &StateMachine,
        executor: ExecutorId,
        link: Link,
        running: &[RunningAttempt],
    ) -> Vec<Effect> {
        let mut inner = self.lock();
        let session = link.session;
        if let Some(previous) = inner.links.insert(executor, link) {
            CloseCode::GoingAway.close(&previous.connection, "replaced by a newer connection");
        }
        let effects =
            inner.leader.handle_connected(state, executor, session, running, Instant::now());
        perform(&mut inner, &self.traces, state, effects)
    }

    pub fn heartbeat(
        &self,
        state: &StateMachine,
        executor: ExecutorId,
        running: &[RunningAttempt],
    ) -> Vec<Effect> {
        let mut inner = self.lock();
        let effects = inner.leader.handle_heartbeat(state, executor, running, Instant::now());
        perform(&mut inner, &self.traces, state, effects)
    }

    /// The executor said Hello; its registration may be about to commit.
    pub fn hello(&self, executor: ExecutorId) {
        self.lock().leader.handle_hello(executor, Instant::now());
    }

    /// The heartbeat interval for an executor being welcomed, scaled to the fleet in `state`.
    pub fn welcome_interval(&self, state: &StateMachine, interval: Duration) -> Duration {
        self.lock().leader.welcome_interval(state, interval)
    }

    /// A message other than a heartbeat (a report) arrived: the executor is alive.
    pub fn heard(&self, executor: ExecutorId) {
        self.lock().leader.handle_heard(executor, Instant::now());
    }

    /// A command committed; `state` is the state after it.
    pub fn committed(&self, state: &StateMachine, outcome: &Outcome) -> Vec<Effect> {
        if let (true, Outcome::Placed { assigned, .. }) = (trace::enabled(), outcome) {
            for a in assigned {
                // A first attempt's placement span starts at its submission (queueing and
                // scheduling); a later one's at its commit.
                let started = state
                    .get_task(a.task)
                    .filter(|_| a.attempt == 1)
                    .map_or_else(SystemTime::now, |t| {
                        UNIX_EPOCH + Duration::from_millis(t.created_unix_ms)
                    });
                self.traces.placed(a.task, a.attempt, a.token, a.executor, started);
            }
        }
        let mut inner = self.lock();
        let effects = inner.leader.handle_committed(state, outcome, Instant::now());
        perform(&mut inner, &self.traces, state, effects)
    }

    /// The failure detector's tick: proposals to declare silent executors down.
    pub fn tick(&self, state: &StateMachine) -> Vec<Effect> {
        let mut inner = self.lock();
        let effects = inner.leader.handle_tick(state, Instant::now());
        perform(&mut inner, &self.traces, state, effects)
    }

    /// The session ended; a newer session of the same executor is left alone.
    pub fn closed(&self, executor: ExecutorId, session: SessionId) {
        let mut inner = self.lock();
        if inner.links.get(&executor).is_some_and(|l| l.session == session) {
            inner.links.remove(&executor);
        }
        inner.leader.handle_disconnected(executor, session);
    }

    /// The session ended with the executor saying it is stopping; returns what to perform.
    pub fn stopped(
        &self,
        state: &StateMachine,
        executor: ExecutorId,
        session: SessionId,
    ) -> Vec<Effect> {
        let mut inner = self.lock();
        if inner.links.get(&executor).is_some_and(|l| l.session == session) {
            inner.links.remove(&executor);
        }
        inner.leader.handle_stopped(state, executor, session)
    }

    /// Queues a message that is not a leader decision (a report's acknowledgement).
    pub fn send(&self, executor: ExecutorId, body: pb::server_message::Body) {
        let mut inner = self.lock();
        send(&mut inner, executor, body);
    }

    /// Closes every session: this server stopped leading (executors must find the new leader) or
    /// is stopping.
    pub fn close_all(&self, why: &str) {
        let mut inner = self.lock();
        for (_, link) in inner.links.drain() {
            CloseCode::GoingAway.close(&link.connection, why);
        }
        inner.leader.handle_all_closed();
        self.traces.clear();
    }

    pub fn heartbeat_age(&self, executor: ExecutorId) -> Option<Duration> {
        self.lock().leader.heartbeat_age(executor, Instant::now())
    }

    pub fn heartbeat_age_max(&self) -> Duration {
        self.lock().leader.heartbeat_age_max(Instant::now())
    }

    pub fn connected(&self) -> usize {
        self.lock().links.len()
    }
}

/// Queues the sends and closes among `effects` and returns the rest, for the caller to perform.
fn perform(
    inner: &mut Inner,
    traces: &TaskTraces,
    state: &StateMachine,
    effects: Vec<Effect>,
) -> Vec<Effect> {
    let mut rest = Vec::new();
    for effect in effects {
        match effect {
            Effect::Send { executor, message } => {
                // The component names only tasks it found in `state`, under the same lock.
                if let Some(mut body) = colony_proto::link::server_message(&message, state) {
                    if let (true, pb::server_message::Body::Assign(assign)) =
                        (trace::enabled(), &mut body)
                    {
                        assign.traceparent = traces.assignment(
                            TaskId(assign.task_id),
                            assign.attempt,
                            FencingToken(assign.fencing_token),
                        );
                    }
                    send(inner, executor, body);
                }
            }
            Effect::Close { executor, reason } => close(inner, executor, reason),
            other => rest.push(other),
        }
    }
    rest
}

fn close(inner: &mut Inner, executor: ExecutorId, reason: CloseReason) {
    if let Some(link) = inner.links.remove(&executor) {
        CloseCode::GoingAway.close(&link.connection, &reason.to_string());
        inner.leader.handle_disconnected(executor, link.session);
    }
}

/// Queues `body` for `executor`; a session whose outbox is full is too far behind and is closed.
fn send(inner: &mut Inner, executor: ExecutorId, body: pb::server_message::Body) {
    let Some(link) = inner.links.get(&executor) else { return };
    if link.outbox.try_send(pb::ServerMessage { body: Some(body) }).is_ok() {
        return;
    }
    CloseCode::GoingAway.close(&link.connection, "outbox full");
    let session = link.session;
    inner.links.remove(&executor);
    inner.leader.handle_disconnected(executor, session);
}
