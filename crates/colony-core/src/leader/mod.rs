//! The leader's decisions about executors, as a pure component in the shape of quinn-proto and
//! openraft's `Engine`: inputs go in (an executor connected, heartbeated or went away, a command
//! committed, time passed), each with the `now` it happened at; effects come out (propose this
//! command, send this message to that executor, close that session, run a scheduling round).
//! The server's gateway and leader loops only turn I/O into inputs and effects into I/O.
//!
//! Nothing here reads a clock: `now` is an argument, so tests drive every decision under a
//! virtual clock. What lives here is the leader's volatile view of its executors (when each was
//! last heard from, which assignments were sent and when); the authoritative state is the
//! replicated `StateMachine`, passed in by reference.

mod hello;
mod model;
#[cfg(test)]
mod tests;

pub use hello::{check_hello, Hello, HelloRefusal};
pub use model::{ModelDecision, ModelTracker};

use crate::ids::{ExecutorId, FencingToken, TaskId};
use crate::scheduler::Plan;
use crate::state_machine::{
    AttemptOutcome, AttemptResult, AttemptStatus, Command, Outcome, StateMachine,
};
use crate::task::TaskState;
use crate::ExecutorState;
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// The leader's timing rules for executors.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// Silence after which an up or draining executor is declared down.
    pub heartbeat_timeout: Duration,
    /// After taking office, no executor is declared down for this long, so they can find the
    /// new leader first.
    pub leader_grace: Duration,
    /// An assignment the executor has not listed in a heartbeat is sent again after this long.
    pub assign_resend_after: Duration,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        LeaderConfig {
            heartbeat_timeout: Duration::from_secs(5),
            leader_grace: Duration::from_secs(5),
            assign_resend_after: Duration::from_secs(2),
        }
    }
}

/// Tells one executor's sessions apart: a newer connection replaces an older one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

/// An attempt an executor says it runs (or has finished and not yet had acknowledged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunningAttempt {
    pub task: TaskId,
    pub token: FencingToken,
}

/// What the leader does in response to an input.
#[derive(Clone, Debug, PartialEq)]
// Effects live for one hand-over from the component to the shell: boxing the command would add
// an allocation to every proposal the leader makes.
#[allow(clippy::large_enum_variant)]
pub enum Effect {
    /// Propose this command through Raft; its outcome comes back through `handle_committed`.
    Propose(Command),
    /// Queue this message on the executor's session.
    Send { executor: ExecutorId, message: ToExecutor },
    /// Close the executor's current session; it must reconnect (and register) to come back.
    Close { executor: ExecutorId, reason: CloseReason },
    /// Run a scheduling round now: work arrived or capacity appeared.
    WakeScheduler,
}

/// A message from the leader to an executor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToExecutor {
    /// Run this attempt. The shell adds the task's spec from the state.
    Assign { task: TaskId, attempt: u32, token: FencingToken },
    /// Stop this attempt: its token is no longer current.
    Kill { task: TaskId, token: FencingToken, reason: KillReason },
}

/// Why an attempt is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// The executor listed an attempt the state no longer gives it.
    NotCurrent,
    Cancelled,
    Preempted,
    DrainDeadline,
}

impl fmt::Display for KillReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KillReason::NotCurrent => "the attempt is no longer current",
            KillReason::Cancelled => "cancelled",
            KillReason::Preempted => "preempted by a higher-priority task",
            KillReason::DrainDeadline => "the drain deadline passed",
        })
    }
}

/// Why the leader closes an executor's session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    DeclaredDown,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseReason::DeclaredDown => "declared down",
        })
    }
}

/// The leader's view of one connected executor.
#[derive(Debug)]
struct Session {
    id: SessionId,
    last_heard: Instant,
    /// Assignments sent and not yet seen in a heartbeat, with when they were sent.
    sent: BTreeMap<TaskId, (FencingToken, Instant)>,
}

/// The leader's decisions about executors. One per server; `became_leader` starts a term of office.
#[derive(Debug)]
pub struct Leader {
    config: LeaderConfig,
    leader_since: Instant,
    sessions: BTreeMap<ExecutorId, Session>,
}

impl Leader {
    pub fn new(config: LeaderConfig, now: Instant) -> Leader {
        Leader { config, leader_since: now, sessions: BTreeMap::new() }
    }

    /// This server took office at `now`: the grace before declaring executors down starts.
    pub fn became_leader(&mut self, now: Instant) {
        self.leader_since = now;
    }

    /// An executor registered on a new session, listing what it runs. Attempts the state says run
    /// there but that it does not list were lost (it restarted): they are reported failed, so they
    /// fail over to a retry. Then it is reconciled like a heartbeat, and a round is due.
    pub fn handle_connected(
        &mut self,
        state: &StateMachine,
        executor: ExecutorId,
        session: SessionId,
        running: &[RunningAttempt],
        now: Instant,
    ) -> Vec<Effect> {
        self.sessions
            .insert(executor, Session { id: session, last_heard: now, sent: BTreeMap::new() });
        let mut effects = vec![Effect::WakeScheduler];
        effects.extend(lost_attempts(state, executor, running).map(Effect::Propose));
        effects.extend(self.reconcile(state, executor, running, now));
        effects
    }

    /// A heartbeat: the executor is alive, and what it runs is compared with what it holds.
    pub fn handle_heartbeat(
        &mut self,
        state: &StateMachine,
        executor: ExecutorId,
        running: &[RunningAttempt],
        now: Instant,
    ) -> Vec<Effect> {
        match self.sessions.get_mut(&executor) {
            Some(session) => session.last_heard = now,
            None => return Vec::new(),
        }
        self.reconcile(state, executor, running, now)
    }

    /// A session ended. A newer session of the same executor is left alone.
    pub fn handle_disconnected(&mut self, executor: ExecutorId, session: SessionId) {
        if self.sessions.get(&executor).is_some_and(|s| s.id == session) {
            self.sessions.remove(&executor);
        }
    }

    /// Every session ended (this server stopped leading or is stopping).
    pub fn handle_all_closed(&mut self) {
        self.sessions.clear();
    }

    /// The effects of a committed `outcome` that needs neither the sessions nor the state (a
    /// submission, a report, a registration, a drain: wake the scheduler; most others: nothing),
    /// or `None` when only [`Leader::handle_committed`] can decide. The server asks this first,
    /// so the submit path takes no lock for the leader.
    pub fn committed_without_sessions(outcome: &Outcome) -> Option<Vec<Effect>> {
        match outcome {
            Outcome::Placed { .. }
            | Outcome::Evicted { .. }
            | Outcome::Cancelled { .. }
            | Outcome::MarkedDown { .. } => None,
            Outcome::Submitted { .. }
            | Outcome::Reported { .. }
            | Outcome::Registered { .. }
            | Outcome::Draining { .. }
            | Outcome::Undrained { .. } => Some(vec![Effect::WakeScheduler]),
            _ => Some(Vec::new()),
        }
    }

    /// A command committed with `outcome`: assignments go out to their executors, attempts that
    /// stopped being current are killed at once (not at the next heartbeat), and an executor
    /// declared down loses its session. `state` is the state after the commit.
    pub fn handle_committed(
        &mut self,
        state: &StateMachine,
        outcome: &Outcome,
        now: Instant,
    ) -> Vec<Effect> {
        if let Some(effects) = Leader::committed_without_sessions(outcome) {
            return effects;
        }
        match outcome {
            Outcome::Placed { assigned, evicted, .. } => {
                let mut effects = kill_superseded(state, evicted, KillReason::Preempted);
                for a in assigned {
                    let Some(session) = self.sessions.get_mut(&a.executor) else { continue };
                    session.sent.insert(a.task, (a.token, now));
                    let message =
                        ToExecutor::Assign { task: a.task, attempt: a.attempt, token: a.token };
                    effects.push(Effect::Send { executor: a.executor, message });
                }
                effects
            }
            Outcome::Evicted { ids } => kill_superseded(state, ids, KillReason::DrainDeadline),
            Outcome::Cancelled { task, cascaded } => {
                let ended: Vec<TaskId> =
                    std::iter::once(task.id).chain(cascaded.iter().copied()).collect();
                kill_superseded(state, &ended, KillReason::Cancelled)
            }
            Outcome::MarkedDown { id, .. } if self.sessions.remove(id).is_some() => {
                vec![Effect::Close { executor: *id, reason: CloseReason::DeclaredDown }]
            }
            _ => Vec::new(),
        }
    }

    /// Time passed: every up or draining executor silent for longer than the heartbeat timeout is
    /// declared down, but never within the grace after taking office. An executor the leader has
    /// never heard from counts as heard at the start of the term.
    pub fn handle_tick(&self, state: &StateMachine, now: Instant) -> Vec<Effect> {
        if now.saturating_duration_since(self.leader_since) < self.config.leader_grace {
            return Vec::new();
        }
        state
            .executors()
            .filter(|e| matches!(e.state, ExecutorState::Up | ExecutorState::Draining))
            .filter_map(|e| {
                let last = self.sessions.get(&e.id).map_or(self.leader_since, |s| s.last_heard);
                let silence = now.saturating_duration_since(last);
                (silence > self.config.heartbeat_timeout).then(|| {
                    let reason = format!("no heartbeat for {:.1}s", silence.as_secs_f64());
                    Effect::Propose(Command::MarkExecutorDown { id: e.id, reason })
                })
            })
            .collect()
    }

    /// How long ago the leader last heard from a connected executor.
    pub fn heartbeat_age(&self, executor: ExecutorId, now: Instant) -> Option<Duration> {
        self.sessions.get(&executor).map(|s| now.saturating_duration_since(s.last_heard))
    }

    /// The longest silence among connected executors (zero when none is connected).
    pub fn heartbeat_age_max(&self, now: Instant) -> Duration {
        self.sessions
            .values()
            .map(|s| now.saturating_duration_since(s.last_heard))
            .max()
            .unwrap_or_default()
    }

    pub fn connected(&self) -> usize {
        self.sessions.len()
    }

    /// Sends the assignments the executor lacks (again, once `assign_resend_after` has passed
    /// since the last send) and kills the attempts it lists that are no longer current.
    fn reconcile(
        &mut self,
        state: &StateMachine,
        id: ExecutorId,
        running: &[RunningAttempt],
        now: Instant,
    ) -> Vec<Effect> {
        let Some(executor) = state.get_executor(id) else { return Vec::new() };
        let Some(session) = self.sessions.get_mut(&id) else { return Vec::new() };
        let reported: BTreeMap<TaskId, FencingToken> =
            running.iter().map(|r| (r.task, r.token)).collect();
        // What was sent is settled once the executor lists it, or once it no longer holds the task.
        session
            .sent
            .retain(|task, _| !reported.contains_key(task) && executor.tasks.contains(task));
        let mut effects = Vec::new();
        for task_id in &executor.tasks {
            let Some(task) = state.get_task(*task_id) else { continue };
            let (Some(token), TaskState::Assigned) = (task.fencing_token, task.state) else {
                continue;
            };
            if reported.get(task_id) == Some(&token) {
                continue;
            }
            let resend_after = self.config.assign_resend_after;
            let recently = session.sent.get(task_id).is_some_and(|(t, at)| {
                *t == token && now.saturating_duration_since(*at) < resend_after
            });
            if !recently {
                session.sent.insert(*task_id, (token, now));
                let message = ToExecutor::Assign { task: *task_id, attempt: task.attempt, token };
                effects.push(Effect::Send { executor: id, message });
            }
        }
        for (task, token) in &reported {
            let current = executor.tasks.contains(task)
                && state.get_task(*task).and_then(|t| t.fencing_token) == Some(*token);
            if !current {
                let message =
                    ToExecutor::Kill { task: *task, token: *token, reason: KillReason::NotCurrent };
                effects.push(Effect::Send { executor: id, message });
            }
        }
        effects
    }
}

/// Kills for the attempts of `tasks` that just stopped being current (the task is no longer
/// assigned or running), sent to the executor that held them.
fn kill_superseded(state: &StateMachine, tasks: &[TaskId], reason: KillReason) -> Vec<Effect> {
    tasks
        .iter()
        .filter_map(|id| state.get_task(*id))
        .filter(|t| !matches!(t.state, TaskState::Assigned | TaskState::Running))
        .filter_map(|t| {
            let (executor, token) = (t.executor?, t.fencing_token?);
            Some(Effect::Send { executor, message: ToExecutor::Kill { task: t.id, token, reason } })
        })
        .collect()
}

/// Failure reports for the attempts the state says run on `executor` that it did not list.
fn lost_attempts<'a>(
    state: &'a StateMachine,
    executor: ExecutorId,
    running: &'a [RunningAttempt],
) -> impl Iterator<Item = Command> + 'a {
    let tasks = state.get_executor(executor).map(|e| &e.tasks).into_iter().flatten();
    tasks
        .filter_map(|id| state.get_task(*id))
        .filter(|t| t.state == TaskState::Running && !running.iter().any(|r| r.task == t.id))
        .filter_map(move |t| {
            let token = t.fencing_token?;
            let status = AttemptStatus::Finished(AttemptResult {
                outcome: AttemptOutcome::Failed,
                exit_code: None,
                stdout_tail: String::new(),
                stderr_tail: String::new(),
                message: format!(
                    "attempt lost: executor {executor} reconnected without it (restarted)"
                ),
                peak_memory_bytes: None,
            });
            Some(Command::Report { executor, task: t.id, token, status })
        })
}

/// The commands one scheduling round proposes, in the order they are proposed.
pub fn round_commands(plan: Plan) -> Vec<Command> {
    let mut commands = Vec::new();
    if !plan.expire.is_empty() {
        commands.push(Command::ExpireTasks { ids: plan.expire });
    }
    if !plan.drain_evictions.is_empty() {
        commands.push(Command::EvictTasks {
            ids: plan.drain_evictions,
            reason: KillReason::DrainDeadline.to_string(),
        });
    }
    if !plan.placements.is_empty() || !plan.unschedulable.is_empty() {
        commands.push(Command::PlaceTasks {
            placements: plan.placements,
            unschedulable: plan.unschedulable,
        });
    }
    commands
}
