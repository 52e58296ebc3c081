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

/// The most heartbeats a second the leader asks of its executors together, as Nomad bounds its
/// heartbeat rate: past `HEARTBEATS_PER_SECOND_MAX` times the configured interval executors, each
/// is told to heartbeat less often, and the timeout grows with the count. On the two cores a
/// 1,000-executor benchmark shares with three servers, a fixed 3s timeout declared healthy
/// executors down whenever a backlog kept the leader busy.
pub const HEARTBEATS_PER_SECOND_MAX: u32 = 1000;
/// Heartbeats at the scaled interval an executor may miss, on top of the configured timeout.
pub const HEARTBEATS_MISSED_MAX: u32 = 5;

/// The leader's timing rules for executors.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// Silence after which an up or draining executor is declared down, with few executors;
    /// [`Leader::heartbeat_timeout`] adds a term proportional to their number.
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
    /// Assignments sent and not yet seen in a heartbeat, with when they were sent.
    sent: BTreeMap<TaskId, (FencingToken, Instant)>,
}

/// The leader's decisions about executors. One per server; `became_leader` starts a term of office.
#[derive(Debug)]
pub struct Leader {
    config: LeaderConfig,
    leader_since: Instant,
    sessions: BTreeMap<ExecutorId, Session>,
    /// When each executor was last heard from in this term: any message, a session opening, its
    /// registration committing. Kept when the session ends, so a dropped connection gets the
    /// whole timeout to come back, and set at registration, which commits before the session
    /// opens: silence never counts from the start of the term for an executor just heard.
    heard: BTreeMap<ExecutorId, Instant>,
    /// The most executors an interval was handed out for in this term: the timeout is never
    /// shorter than that interval allows, however many executors are up now.
    welcomed_for_max: usize,
}

/// How often an executor should heartbeat when `executors` are up: the configured `interval`,
/// or less often once that would make more than [`HEARTBEATS_PER_SECOND_MAX`] a second.
pub fn heartbeat_interval(interval: Duration, executors: usize) -> Duration {
    interval.max(per_executor(executors))
}

/// `executors` heartbeats at the most the leader takes a second: each one's share of a second.
fn per_executor(executors: usize) -> Duration {
    let executors = u32::try_from(executors).unwrap_or(u32::MAX);
    Duration::from_secs(1).saturating_mul(executors) / HEARTBEATS_PER_SECOND_MAX
}

/// Executors that heartbeat or soon will: admitted, up or draining (not down).
pub fn fleet_executors(state: &StateMachine) -> usize {
    state.executors().filter(|e| e.state != ExecutorState::Down).count()
}

/// Executors the failure detector watches (and that heartbeat): up or draining ones.
pub fn live_executors(state: &StateMachine) -> usize {
    state
        .executors()
        .filter(|e| matches!(e.state, ExecutorState::Up | ExecutorState::Draining))
        .count()
}

impl Leader {
    pub fn new(config: LeaderConfig, now: Instant) -> Leader {
        Leader {
            config,
            leader_since: now,
            sessions: BTreeMap::new(),
            heard: BTreeMap::new(),
            welcomed_for_max: 0,
        }
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
        self.sessions.insert(executor, Session { id: session, sent: BTreeMap::new() });
        self.heard.insert(executor, now);
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
        if !self.sessions.contains_key(&executor) {
            return Vec::new();
        }
        self.heard.insert(executor, now);
        self.reconcile(state, executor, running, now)
    }

    /// An executor said Hello: it is alive, though its registration has yet to commit and its
    /// session to open. Once it commits the detector watches it, and without this its silence
    /// would count from the start of the term.
    pub fn handle_hello(&mut self, executor: ExecutorId, now: Instant) {
        self.heard.insert(executor, now);
    }

    /// The heartbeat interval to give an executor being welcomed, for the fleet in `state`;
    /// the timeout then allows for it as long as this server leads.
    pub fn welcome_interval(&mut self, state: &StateMachine, interval: Duration) -> Duration {
        let fleet = fleet_executors(state);
        self.welcomed_for_max = self.welcomed_for_max.max(fleet);
        heartbeat_interval(interval, fleet)
    }

    /// Any other message from a connected executor (a report): it is alive. A heartbeat queued
    /// behind a burst of reports on the same stream arrives late, but the reports did not.
    pub fn handle_heard(&mut self, executor: ExecutorId, now: Instant) {
        if self.sessions.contains_key(&executor) {
            self.heard.insert(executor, now);
        }
    }

    /// A session ended. A newer session of the same executor is left alone.
    pub fn handle_disconnected(&mut self, executor: ExecutorId, session: SessionId) {
        if self.sessions.get(&executor).is_some_and(|s| s.id == session) {
            self.sessions.remove(&executor);
        }
    }

    /// The executor closed its session saying it is stopping: it runs nothing now, so it is
    /// declared down at once instead of after the heartbeat timeout, and nothing more is placed
    /// there. A newer session of the same executor is left alone.
    pub fn handle_stopped(
        &mut self,
        state: &StateMachine,
        executor: ExecutorId,
        session: SessionId,
    ) -> Vec<Effect> {
        if self.sessions.get(&executor).is_none_or(|s| s.id != session) {
            return Vec::new();
        }
        self.sessions.remove(&executor);
        let up = state
            .get_executor(executor)
            .is_some_and(|e| matches!(e.state, ExecutorState::Up | ExecutorState::Draining));
        match up {
            true => vec![Effect::Propose(Command::MarkExecutorDown {
                id: executor,
                reason: "the executor stopped".to_owned(),
            })],
            false => Vec::new(),
        }
    }

    /// Every session ended (this server stopped leading or is stopping).
    pub fn handle_all_closed(&mut self) {
        self.sessions.clear();
        self.heard.clear();
        self.welcomed_for_max = 0;
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
            | Outcome::MarkedDown { .. }
            | Outcome::Registered { .. }
            | Outcome::WorkflowCancelled { .. } => None,
            Outcome::AgentRun { stopped, .. }
            | Outcome::AgentScaled { stopped, .. }
            | Outcome::AgentStopped { stopped, .. }
                if !stopped.is_empty() =>
            {
                None
            }
            Outcome::AgentRun { .. } | Outcome::AgentScaled { .. } => {
                Some(vec![Effect::WakeScheduler])
            }
            Outcome::Collected(collected) if !collected.executors.is_empty() => None,
            Outcome::Reported { stopped, .. } if !stopped.is_empty() => None,
            Outcome::Submitted { .. }
            | Outcome::Reported { .. }
            | Outcome::Draining { .. }
            | Outcome::Undrained { .. }
            | Outcome::WorkflowSubmitted { .. }
            | Outcome::WorkflowRetried { .. } => Some(vec![Effect::WakeScheduler]),
            _ => Some(Vec::new()),
        }
    }

    /// A command committed with `outcome`: assignments go out to their executors, attempts that
    /// stopped being current are killed at once (not at the next heartbeat), and an executor
    /// declared down loses its session. A registration counts as hearing from the executor.
    /// `state` is the state after the commit.
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
            // A workflow ended by a failed step or a cancel: its running tasks stop now, not at
            // their executors' next heartbeat.
            Outcome::Reported { stopped, .. } => {
                let mut effects = kill_superseded(state, stopped, KillReason::Cancelled);
                effects.push(Effect::WakeScheduler);
                effects
            }
            Outcome::WorkflowCancelled { workflow } => {
                let tasks: Vec<TaskId> =
                    workflow.steps.iter().flat_map(|run| run.tasks.iter().copied()).collect();
                kill_superseded(state, &tasks, KillReason::Cancelled)
            }
            // Instances an agent's change ended (scaled down, stopped, replaced) stop now.
            Outcome::AgentRun { stopped, .. }
            | Outcome::AgentScaled { stopped, .. }
            | Outcome::AgentStopped { stopped, .. } => {
                let mut effects = kill_superseded(state, stopped, KillReason::Cancelled);
                effects.push(Effect::WakeScheduler);
                effects
            }
            Outcome::Cancelled { task, cascaded } => {
                let ended: Vec<TaskId> =
                    std::iter::once(task.id).chain(cascaded.iter().copied()).collect();
                kill_superseded(state, &ended, KillReason::Cancelled)
            }
            Outcome::Registered { id, .. } => {
                self.heard.insert(*id, now);
                vec![Effect::WakeScheduler]
            }
            Outcome::MarkedDown { id, .. } => self.forget_executor(*id),
            // Retention removed executors long down: one that reconnected since must join again.
            Outcome::Collected(collected) => {
                collected.executors.iter().flat_map(|id| self.forget_executor(*id)).collect()
            }
            _ => Vec::new(),
        }
    }

    /// An executor declared down or removed: its session is closed and its silence forgotten.
    fn forget_executor(&mut self, id: ExecutorId) -> Vec<Effect> {
        self.heard.remove(&id);
        match self.sessions.remove(&id) {
            Some(_) => vec![Effect::Close { executor: id, reason: CloseReason::DeclaredDown }],
            None => Vec::new(),
        }
    }

    /// The silence after which an executor is declared down when `executors` are up: the
    /// configured timeout plus [`HEARTBEATS_MISSED_MAX`] heartbeats at the interval the count
    /// scales to, so it always outlasts several heartbeats however large the fleet.
    pub fn heartbeat_timeout(&self, executors: usize) -> Duration {
        self.config.heartbeat_timeout + per_executor(executors) * HEARTBEATS_MISSED_MAX
    }

    /// Time passed: every up or draining executor silent for longer than the heartbeat timeout
    /// (for their number) is declared down, but never within the grace after taking office. An
    /// executor the leader has not heard from in this term counts as heard at its start.
    pub fn handle_tick(&mut self, state: &StateMachine, now: Instant) -> Vec<Effect> {
        // Executors no longer in the state are no longer watched.
        self.heard.retain(|id, _| state.get_executor(*id).is_some());
        if now.saturating_duration_since(self.leader_since) < self.config.leader_grace {
            return Vec::new();
        }
        let timeout = self.heartbeat_timeout(live_executors(state).max(self.welcomed_for_max));
        state
            .executors()
            .filter(|e| matches!(e.state, ExecutorState::Up | ExecutorState::Draining))
            .filter_map(|e| {
                let last = self.heard.get(&e.id).map_or(self.leader_since, |at| {
                    // Heard in an earlier term: the new term's silence counts from its start.
                    (*at).max(self.leader_since)
                });
                let silence = now.saturating_duration_since(last);
                (silence > timeout).then(|| {
                    let reason = format!(
                        "nothing heard for {:.1}s (timeout {:.1}s)",
                        silence.as_secs_f64(),
                        timeout.as_secs_f64()
                    );
                    Effect::Propose(Command::MarkExecutorDown { id: e.id, reason })
                })
            })
            .collect()
    }

    /// How long ago the leader last heard from a connected executor.
    pub fn heartbeat_age(&self, executor: ExecutorId, now: Instant) -> Option<Duration> {
        self.sessions.contains_key(&executor).then(|| self.silence(executor, now))
    }

    /// The longest silence among connected executors (zero when none is connected).
    pub fn heartbeat_age_max(&self, now: Instant) -> Duration {
        self.sessions.keys().map(|id| self.silence(*id, now)).max().unwrap_or_default()
    }

    fn silence(&self, executor: ExecutorId, now: Instant) -> Duration {
        let last = self.heard.get(&executor).copied().unwrap_or(self.leader_since);
        now.saturating_duration_since(last)
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
