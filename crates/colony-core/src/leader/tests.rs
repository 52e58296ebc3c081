//! Every decision the leader makes about executors, driven by inputs under a virtual clock and
//! checked by the effects it emits (as openraft's `engine/tests` check its engine's commands).

#![allow(clippy::unwrap_used)]

use super::*;
use crate::executor::ExecutorSpec;
use crate::model::{ModelMetrics, ModelRecord};
use crate::resources::Resources;
use crate::scheduler::{plan, PlanConfig};
use crate::state_machine::{Placement, Proposal};
use crate::task::{RunSpec, TaskSpec};
use crate::ModelVersion;
use std::collections::BTreeSet;

const SECOND: Duration = Duration::from_secs(1);

/// A state machine with executors and tasks, a leader, and a virtual clock.
struct World {
    sm: StateMachine,
    leader: Leader,
    start: Instant,
    /// Virtual time since `start`.
    elapsed: Duration,
    now_unix_ms: u64,
    next_session: u64,
}

fn spec(name: &str) -> TaskSpec {
    TaskSpec {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        labels: BTreeMap::new(),
        capabilities: BTreeSet::new(),
        resources: Resources {
            cpu_millis: 500,
            memory_bytes: 64 << 20,
            gpus: 0,
            custom: BTreeMap::new(),
        },
        priority: 0,
        deadline_unix_ms: None,
        timeout_ms: None,
        max_retries: 1,
        dependencies: BTreeSet::new(),
        run: RunSpec::Builtin { handler: "sleep".to_owned(), input: "1s".to_owned() },
        idempotency_key: None,
        placement: Default::default(),
        memory_auto: false,
    }
}

fn executor_spec(name: &str) -> ExecutorSpec {
    ExecutorSpec {
        name: name.to_owned(),
        capacity: Resources {
            cpu_millis: 2000,
            memory_bytes: 4 << 30,
            gpus: 0,
            custom: BTreeMap::new(),
        },
        labels: BTreeMap::new(),
        capabilities: BTreeSet::new(),
    }
}

fn fingerprint(id: ExecutorId) -> [u8; 32] {
    [id.0 as u8; 32]
}

impl World {
    fn new() -> World {
        let start = Instant::now();
        let config = LeaderConfig {
            heartbeat_timeout: 5 * SECOND,
            leader_grace: 3 * SECOND,
            assign_resend_after: 2 * SECOND,
        };
        World {
            sm: StateMachine::new(),
            leader: Leader::new(config, start),
            start,
            elapsed: Duration::ZERO,
            now_unix_ms: 1_000_000,
            next_session: 0,
        }
    }

    fn now(&self) -> Instant {
        self.start + self.elapsed
    }

    fn advance(&mut self, by: Duration) {
        self.elapsed += by;
        self.now_unix_ms += by.as_millis() as u64;
    }

    fn apply(&mut self, command: Command) -> Outcome {
        let mut results = self
            .sm
            .apply_proposal(&Proposal { now_unix_ms: self.now_unix_ms, commands: vec![command] });
        self.sm.check_invariants().unwrap();
        results.remove(0).unwrap()
    }

    /// An admitted, registered executor (not connected to the leader yet).
    fn executor(&mut self) -> ExecutorId {
        let id = self.sm.next_executor_id();
        self.apply(Command::CreateJoinToken {
            secret_hash: [7; 32],
            expires_unix_ms: self.now_unix_ms + 60_000,
            kind: crate::JoinKind::Executor,
        });
        self.apply(Command::AdmitExecutor {
            secret_hash: [7; 32],
            expected_id: id,
            name: format!("e{id}"),
            cert_fingerprint: fingerprint(id),
        });
        self.apply(Command::RegisterExecutor { id, spec: executor_spec(&format!("e{id}")) });
        id
    }

    fn connect(&mut self, id: ExecutorId, running: &[RunningAttempt]) -> (SessionId, Vec<Effect>) {
        self.next_session += 1;
        let session = SessionId(self.next_session);
        let now = self.now();
        (session, self.leader.handle_connected(&self.sm, id, session, running, now))
    }

    fn submit(&mut self, name: &str) -> TaskId {
        match self.apply(Command::SubmitTask(spec(name))) {
            Outcome::Submitted { task, .. } => task.id,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Places `task` on `executor`, commits it, and returns the leader's effects.
    fn place(&mut self, task: TaskId, executor: ExecutorId) -> Vec<Effect> {
        let placement = Placement { task, executor, evict: Vec::new(), memory_bytes: None };
        let outcome = self
            .apply(Command::PlaceTasks { placements: vec![placement], unschedulable: Vec::new() });
        let now = self.now();
        self.leader.handle_committed(&self.sm, &outcome, now)
    }

    fn token(&self, task: TaskId) -> FencingToken {
        self.sm.get_task(task).and_then(|t| t.fencing_token).unwrap()
    }

    fn heartbeat(&mut self, id: ExecutorId, running: &[RunningAttempt]) -> Vec<Effect> {
        let now = self.now();
        self.leader.handle_heartbeat(&self.sm, id, running, now)
    }

    fn tick(&mut self) -> Vec<Effect> {
        self.leader.handle_tick(&self.sm, self.now())
    }

    fn start_attempt(&mut self, id: ExecutorId, task: TaskId) {
        let token = self.token(task);
        self.apply(Command::Report { executor: id, task, token, status: AttemptStatus::Started });
    }
}

fn assign(executor: ExecutorId, task: TaskId, attempt: u32, token: FencingToken) -> Effect {
    Effect::Send { executor, message: ToExecutor::Assign { task, attempt, token } }
}

fn kill(executor: ExecutorId, task: TaskId, token: FencingToken, reason: KillReason) -> Effect {
    Effect::Send { executor, message: ToExecutor::Kill { task, token, reason } }
}

fn running(task: TaskId, token: FencingToken) -> RunningAttempt {
    RunningAttempt { task, token }
}

#[test]
fn a_committed_placement_is_sent_to_its_connected_executor() {
    let mut w = World::new();
    let e = w.executor();
    w.connect(e, &[]);
    let t = w.submit("a");
    let effects = w.place(t, e);
    assert_eq!(effects, vec![assign(e, t, 1, w.token(t))]);
}

#[test]
fn a_placement_on_a_disconnected_executor_waits_for_its_hello() {
    let mut w = World::new();
    let e = w.executor();
    let t = w.submit("a");
    assert_eq!(w.place(t, e), vec![]);
    // The Hello reconciles: the assignment goes out then.
    let (_, effects) = w.connect(e, &[]);
    assert_eq!(effects, vec![Effect::WakeScheduler, assign(e, t, 1, w.token(t))]);
}

#[test]
fn an_unacknowledged_assignment_is_resent_after_the_resend_interval() {
    let mut w = World::new();
    let e = w.executor();
    w.connect(e, &[]);
    let t = w.submit("a");
    w.place(t, e);
    w.advance(SECOND);
    assert_eq!(w.heartbeat(e, &[]), vec![], "sent a second ago: not yet");
    w.advance(SECOND + Duration::from_millis(1));
    let token = w.token(t);
    assert_eq!(
        w.heartbeat(e, &[]),
        vec![assign(e, t, 1, token)],
        "two seconds unlisted: sent again"
    );
    w.advance(SECOND);
    assert_eq!(w.heartbeat(e, &[]), vec![], "the resend restarts the interval");
}

#[test]
fn an_assignment_the_executor_lists_is_settled() {
    let mut w = World::new();
    let e = w.executor();
    w.connect(e, &[]);
    let t = w.submit("a");
    w.place(t, e);
    let token = w.token(t);
    assert_eq!(w.heartbeat(e, &[running(t, token)]), vec![]);
    w.advance(10 * SECOND);
    assert_eq!(w.heartbeat(e, &[running(t, token)]), vec![], "listed attempts are never resent");
}

#[test]
fn a_listed_attempt_that_is_no_longer_current_is_killed() {
    let mut w = World::new();
    let e = w.executor();
    w.connect(e, &[]);
    let t = w.submit("a");
    w.place(t, e);
    let stale = FencingToken(w.token(t).0 + 100);
    let current = w.token(t);
    let effects = w.heartbeat(e, &[running(t, current), running(TaskId(999), stale)]);
    assert_eq!(effects, vec![kill(e, TaskId(999), stale, KillReason::NotCurrent)]);
    // The same task under an older token is killed too, while the current one is left alone.
    let old = FencingToken(current.0 - 1);
    assert_eq!(
        w.heartbeat(e, &[running(t, old)]),
        vec![assign(e, t, 1, current), kill(e, t, old, KillReason::NotCurrent)]
    );
}

#[test]
fn a_heartbeat_from_an_executor_without_a_session_does_nothing() {
    let mut w = World::new();
    let e = w.executor();
    assert_eq!(w.heartbeat(e, &[running(TaskId(1), FencingToken(1))]), vec![]);
}

#[test]
fn attempts_an_executor_forgot_are_reported_lost_on_reconnect() {
    let mut w = World::new();
    let e = w.executor();
    w.connect(e, &[]);
    let (kept, forgotten, assigned_only) =
        (w.submit("kept"), w.submit("forgotten"), w.submit("assigned"));
    for t in [kept, forgotten, assigned_only] {
        w.place(t, e);
    }
    w.start_attempt(e, kept);
    w.start_attempt(e, forgotten);
    let (kept_token, forgotten_token) = (w.token(kept), w.token(forgotten));
    let (_, effects) = w.connect(e, &[running(kept, kept_token)]);
    let lost: Vec<_> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Propose(Command::Report {
                executor,
                task,
                token,
                status: AttemptStatus::Finished(r),
            }) => {
                assert_eq!(r.outcome, AttemptOutcome::Failed);
                assert!(r.message.contains("reconnected without it"), "{}", r.message);
                Some((*executor, *task, *token))
            }
            _ => None,
        })
        .collect();
    // Only a *running* attempt can be lost; an assigned one is simply sent again.
    assert_eq!(lost, vec![(e, forgotten, forgotten_token)]);
    assert!(effects.contains(&assign(e, assigned_only, 1, w.token(assigned_only))), "{effects:?}");
}

#[test]
fn a_silent_executor_is_declared_down_after_the_timeout() {
    let mut w = World::new();
    let e = w.executor();
    w.connect(e, &[]);
    w.advance(5 * SECOND);
    assert_eq!(w.tick(), vec![], "exactly the timeout is not yet silence");
    w.heartbeat(e, &[]);
    w.advance(5 * SECOND + Duration::from_millis(100));
    match w.tick().as_slice() {
        [Effect::Propose(Command::MarkExecutorDown { id, reason })] => {
            assert_eq!(*id, e);
            assert_eq!(reason, "nothing heard for 5.1s (timeout 5.0s)");
        }
        other => panic!("expected one MarkExecutorDown, got {other:?}"),
    }
}

#[test]
fn the_timeout_and_interval_grow_with_the_number_of_executors() {
    let w = World::new();
    let ms = Duration::from_millis;
    // A minimum plus five heartbeats at a thousand a second shared among the executors.
    assert_eq!(w.leader.heartbeat_timeout(0), 5 * SECOND);
    assert_eq!(w.leader.heartbeat_timeout(10), 5 * SECOND + ms(50));
    assert_eq!(w.leader.heartbeat_timeout(1000), 10 * SECOND);
    assert_eq!(w.leader.heartbeat_timeout(10_000), 55 * SECOND);
    // The configured interval until the leader would take more than a thousand a second.
    assert_eq!(heartbeat_interval(ms(500), 10), ms(500));
    assert_eq!(heartbeat_interval(ms(500), 500), ms(500));
    assert_eq!(heartbeat_interval(ms(500), 1000), SECOND);
    assert_eq!(heartbeat_interval(ms(500), 10_000), 10 * SECOND);
    for executors in [1, 100, 1000, 10_000, 100_000] {
        let interval = heartbeat_interval(ms(500), executors);
        assert!(w.leader.heartbeat_timeout(executors) >= interval * HEARTBEATS_MISSED_MAX);
        let per_second = executors as f64 / interval.as_secs_f64();
        assert!(per_second <= f64::from(HEARTBEATS_PER_SECOND_MAX), "{executors}: {per_second}/s");
    }
}

#[test]
fn the_timeout_allows_for_every_interval_handed_out_in_the_term() {
    let mut w = World::new();
    let executors: Vec<ExecutorId> = (0..2000).map(|_| w.executor()).collect();
    let interval = w.leader.welcome_interval(&w.sm, Duration::from_millis(500));
    assert_eq!(interval, 2 * SECOND, "2,000 executors at a thousand heartbeats a second");
    // Most go down; the one left still heartbeats every 2s, and gets 5 of them plus the minimum.
    for e in &executors[1..] {
        w.apply(Command::MarkExecutorDown { id: *e, reason: "test".to_owned() });
    }
    w.connect(executors[0], &[]);
    w.advance(14 * SECOND);
    assert_eq!(w.tick(), vec![]);
    w.advance(SECOND + Duration::from_millis(100));
    assert_eq!(w.tick().len(), 1);
}

#[test]
fn with_a_thousand_executors_a_silence_past_the_minimum_is_not_down() {
    let mut w = World::new();
    let executors: Vec<ExecutorId> = (0..1000).map(|_| w.executor()).collect();
    for e in &executors {
        w.connect(*e, &[]);
    }
    // Well past the configured 5s, within the 10s that 1,000 executors get.
    w.advance(9 * SECOND);
    assert_eq!(w.tick(), vec![]);
    w.advance(SECOND + Duration::from_millis(100));
    assert_eq!(w.tick().len(), 1000, "all silent past 10s");
}

#[test]
fn an_executor_that_sent_a_report_recently_is_not_declared_down() {
    let mut w = World::new();
    let e = w.executor();
    w.connect(e, &[]);
    w.advance(4 * SECOND);
    // A report, with no heartbeat: its heartbeats are queued behind its reports.
    let now = w.now();
    w.leader.handle_heard(e, now);
    w.advance(4 * SECOND);
    assert_eq!(w.tick(), vec![], "heard 4s ago, though its last heartbeat was 8s ago");
    assert_eq!(w.leader.heartbeat_age(e, w.now()), Some(4 * SECOND));
    w.advance(SECOND + Duration::from_millis(100));
    assert!(matches!(w.tick().as_slice(), [Effect::Propose(Command::MarkExecutorDown { .. })]));
}

#[test]
fn an_executor_registering_late_in_a_term_is_not_declared_down_before_its_session_opens() {
    let mut w = World::new();
    w.advance(20 * SECOND);
    // Hello arrives; the registration is applied (the detector sees it up) before the proposer
    // hands its outcome back, and the session opens only after the Welcome is written.
    let e = w.sm.next_executor_id();
    let now = w.now();
    w.leader.handle_hello(e, now);
    assert_eq!(w.executor(), e);
    w.advance(Duration::from_millis(100));
    assert_eq!(w.tick(), vec![], "said Hello 100ms ago, registration not handed back yet");
    let outcome = Outcome::Registered { id: e, changed: true };
    let now = w.now();
    assert_eq!(w.leader.handle_committed(&w.sm, &outcome, now), vec![Effect::WakeScheduler]);
    w.advance(Duration::from_millis(100));
    assert_eq!(w.tick(), vec![], "registered 100ms ago, no session yet");
    w.connect(e, &[]);
    w.advance(5 * SECOND);
    assert_eq!(w.tick(), vec![]);
}

#[test]
fn a_dropped_session_gets_the_whole_timeout_to_come_back() {
    let mut w = World::new();
    w.advance(20 * SECOND);
    let e = w.executor();
    let (session, _) = w.connect(e, &[]);
    w.advance(SECOND);
    w.heartbeat(e, &[]);
    w.leader.handle_disconnected(e, session);
    w.advance(SECOND);
    assert_eq!(w.tick(), vec![], "silent for 1s, though not connected");
    w.connect(e, &[]);
    w.advance(4 * SECOND);
    assert_eq!(w.tick(), vec![], "it reconnected");
    // Without a reconnection, the timeout counts from the last message.
    let e2 = w.executor();
    let (session, _) = w.connect(e2, &[]);
    w.leader.handle_disconnected(e2, session);
    w.advance(5 * SECOND + Duration::from_millis(100));
    let down: Vec<ExecutorId> = w
        .tick()
        .iter()
        .filter_map(|effect| match effect {
            Effect::Propose(Command::MarkExecutorDown { id, .. }) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(down, vec![e, e2]);
}

#[test]
fn no_executor_is_declared_down_within_the_grace_after_an_election() {
    let mut w = World::new();
    let e = w.executor();
    // Never heard from in this term: its silence counts from the start of the term.
    w.advance(Duration::from_millis(2900));
    assert_eq!(w.tick(), vec![], "within the grace");
    w.advance(3 * SECOND);
    assert!(
        matches!(w.tick().as_slice(), [Effect::Propose(Command::MarkExecutorDown { id, .. })] if *id == e)
    );
    // A later election restarts the grace, and the new term's silence counts from it.
    let now = w.now();
    w.leader.became_leader(now);
    w.advance(Duration::from_millis(2900));
    assert_eq!(w.tick(), vec![], "a new term's grace");
}

#[test]
fn down_and_admitted_executors_are_not_declared_down_again() {
    let mut w = World::new();
    let e = w.executor();
    w.apply(Command::MarkExecutorDown { id: e, reason: "test".to_owned() });
    let admitted = w.sm.next_executor_id();
    w.apply(Command::AdmitExecutor {
        secret_hash: [7; 32],
        expected_id: admitted,
        name: "new".to_owned(),
        cert_fingerprint: [9; 32],
    });
    w.advance(60 * SECOND);
    assert_eq!(w.tick(), vec![]);
}

#[test]
fn an_executor_declared_down_loses_its_session() {
    let mut w = World::new();
    let e = w.executor();
    w.connect(e, &[]);
    let outcome = w.apply(Command::MarkExecutorDown { id: e, reason: "silent".to_owned() });
    let now = w.now();
    assert_eq!(
        w.leader.handle_committed(&w.sm, &outcome, now),
        vec![Effect::Close { executor: e, reason: CloseReason::DeclaredDown }]
    );
    assert_eq!(w.leader.connected(), 0);
    // Declared down while not connected: nothing to close.
    let other = w.executor();
    let outcome = w.apply(Command::MarkExecutorDown { id: other, reason: "silent".to_owned() });
    assert_eq!(w.leader.handle_committed(&w.sm, &outcome, now), vec![]);
}

#[test]
fn a_cancelled_running_attempt_is_killed_at_once() {
    let mut w = World::new();
    let e = w.executor();
    w.connect(e, &[]);
    let t = w.submit("a");
    w.place(t, e);
    w.start_attempt(e, t);
    let token = w.token(t);
    let outcome = w.apply(Command::CancelTask { id: t, reason: "user".to_owned() });
    let now = w.now();
    assert_eq!(
        w.leader.handle_committed(&w.sm, &outcome, now),
        vec![kill(e, t, token, KillReason::Cancelled)]
    );
}

/// Two independent steps, `a` and `b`, of one workflow.
fn two_step_workflow(w: &mut World) -> (crate::WorkflowId, TaskId, TaskId) {
    let step = |name: &str| crate::StepSpec {
        name: name.to_owned(),
        task: TaskSpec { max_retries: 0, ..spec("") },
        after: BTreeSet::new(),
        inputs: Default::default(),
        outputs: BTreeSet::new(),
        for_each: None,
        allow_failure: false,
    };
    let workflow = crate::WorkflowSpec {
        name: "w".to_owned(),
        namespace: "default".to_owned(),
        params: Default::default(),
        steps: vec![step("a"), step("b")],
    };
    let Outcome::WorkflowSubmitted { workflow } = w.apply(Command::SubmitWorkflow(workflow)) else {
        panic!("not submitted")
    };
    (workflow.id, workflow.steps[0].tasks[0], workflow.steps[1].tasks[0])
}

#[test]
fn a_workflow_submission_wakes_the_scheduler() {
    let mut w = World::new();
    let workflow = crate::WorkflowSpec {
        name: "w".to_owned(),
        namespace: "default".to_owned(),
        params: Default::default(),
        steps: vec![crate::StepSpec {
            name: "a".to_owned(),
            task: spec(""),
            after: BTreeSet::new(),
            inputs: Default::default(),
            outputs: BTreeSet::new(),
            for_each: None,
            allow_failure: false,
        }],
    };
    let outcome = w.apply(Command::SubmitWorkflow(workflow));
    let now = w.now();
    assert_eq!(w.leader.handle_committed(&w.sm, &outcome, now), vec![Effect::WakeScheduler]);
}

#[test]
fn a_cancelled_workflows_running_tasks_are_killed_at_once() {
    let mut w = World::new();
    let e = w.executor();
    w.connect(e, &[]);
    let (id, a, b) = two_step_workflow(&mut w);
    w.place(a, e);
    w.start_attempt(e, a);
    let outcome = w.apply(Command::CancelWorkflow { id, reason: "user".to_owned() });
    let now = w.now();
    // b never ran: only a's attempt is killed.
    let effects = w.leader.handle_committed(&w.sm, &outcome, now);
    assert_eq!(effects, vec![kill(e, a, w.token(a), KillReason::Cancelled)]);
    assert_eq!(w.sm.get_task(b).map(|t| t.state), Some(TaskState::Cancelled));
}

#[test]
fn a_step_failing_its_workflow_kills_the_other_running_steps_at_once() {
    let mut w = World::new();
    let e = w.executor();
    w.connect(e, &[]);
    let (_, a, b) = two_step_workflow(&mut w);
    for task in [a, b] {
        w.place(task, e);
        w.start_attempt(e, task);
    }
    let failed = AttemptStatus::Finished(AttemptResult {
        outcome: AttemptOutcome::Failed,
        exit_code: Some(1),
        stdout_tail: String::new(),
        stderr_tail: String::new(),
        message: String::new(),
        peak_memory_bytes: None,
    });
    let outcome =
        w.apply(Command::Report { executor: e, task: a, token: w.token(a), status: failed });
    let now = w.now();
    let effects = w.leader.handle_committed(&w.sm, &outcome, now);
    assert_eq!(effects, vec![kill(e, b, w.token(b), KillReason::Cancelled), Effect::WakeScheduler]);
}

#[test]
fn a_preempted_attempt_is_killed_and_the_new_one_assigned() {
    let mut w = World::new();
    let e = w.executor();
    w.connect(e, &[]);
    let mut low = spec("low");
    low.resources.cpu_millis = 2000;
    let low = match w.apply(Command::SubmitTask(low)) {
        Outcome::Submitted { task, .. } => task.id,
        other => panic!("{other:?}"),
    };
    w.place(low, e);
    let low_token = w.token(low);
    let mut high = spec("high");
    high.resources.cpu_millis = 2000;
    high.priority = 500;
    w.apply(Command::SubmitTask(high));
    let round = plan(&w.sm, w.now_unix_ms, &PlanConfig::default());
    let commands = round_commands(round);
    assert_eq!(commands.len(), 1, "{commands:?}");
    let outcome = w.apply(commands.into_iter().next().unwrap());
    let now = w.now();
    let effects = w.leader.handle_committed(&w.sm, &outcome, now);
    let Outcome::Placed { assigned, evicted, .. } = &outcome else { panic!("{outcome:?}") };
    assert_eq!(evicted, &vec![low]);
    let high = &assigned[0];
    assert_eq!(
        effects,
        vec![
            kill(e, low, low_token, KillReason::Preempted),
            assign(e, high.task, high.attempt, high.token)
        ]
    );
}

#[test]
fn attempts_evicted_at_a_drain_deadline_are_killed() {
    let mut w = World::new();
    let e = w.executor();
    w.connect(e, &[]);
    let t = w.submit("a");
    w.place(t, e);
    let token = w.token(t);
    w.apply(Command::DrainExecutor { id: e, deadline_unix_ms: w.now_unix_ms + 1_000 });
    w.advance(2 * SECOND);
    let round = plan(&w.sm, w.now_unix_ms, &PlanConfig::default());
    let commands = round_commands(round);
    assert!(
        matches!(commands.as_slice(), [Command::EvictTasks { ids, reason }] if ids == &vec![t] && reason == "the drain deadline passed"),
        "{commands:?}"
    );
    let outcome = w.apply(commands.into_iter().next().unwrap());
    let now = w.now();
    assert_eq!(
        w.leader.handle_committed(&w.sm, &outcome, now),
        vec![kill(e, t, token, KillReason::DrainDeadline)]
    );
}

#[test]
fn work_arriving_wakes_the_scheduler() {
    let mut w = World::new();
    let now = w.now();
    let outcome = w.apply(Command::SubmitTask(spec("a")));
    assert_eq!(w.leader.handle_committed(&w.sm, &outcome, now), vec![Effect::WakeScheduler]);
    let outcome = w.apply(Command::CreateJoinToken {
        secret_hash: [3; 32],
        expires_unix_ms: w.now_unix_ms + 1,
        kind: crate::JoinKind::Executor,
    });
    assert_eq!(
        w.leader.handle_committed(&w.sm, &outcome, now),
        vec![],
        "a token changes nothing the scheduler sees"
    );
}

#[test]
fn a_round_proposes_expiries_then_evictions_then_placements() {
    let plan = Plan {
        placements: vec![Placement {
            task: TaskId(3),
            executor: ExecutorId(1),
            evict: Vec::new(),
            memory_bytes: None,
        }],
        unschedulable: vec![],
        expire: vec![TaskId(1)],
        drain_evictions: vec![TaskId(2)],
    };
    let kinds: Vec<&str> = round_commands(plan)
        .iter()
        .map(|c| match c {
            Command::ExpireTasks { .. } => "expire",
            Command::EvictTasks { .. } => "evict",
            Command::PlaceTasks { .. } => "place",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["expire", "evict", "place"]);
    assert_eq!(round_commands(Plan::default()), vec![]);
}

#[test]
fn an_older_session_ending_leaves_the_newer_one() {
    let mut w = World::new();
    let e = w.executor();
    let (old, _) = w.connect(e, &[]);
    let (new, _) = w.connect(e, &[]);
    w.leader.handle_disconnected(e, old);
    assert_eq!(w.leader.connected(), 1);
    w.advance(SECOND);
    assert_eq!(w.leader.heartbeat_age(e, w.now()), Some(SECOND));
    w.leader.handle_disconnected(e, new);
    assert_eq!(w.leader.connected(), 0);
    assert_eq!(w.leader.heartbeat_age(e, w.now()), None);
}

#[test]
fn hello_checks() {
    let mut w = World::new();
    let e = w.executor();
    let unknown = ExecutorId(99);
    assert_eq!(
        check_hello(&w.sm, unknown, &fingerprint(unknown), executor_spec("x")),
        Err(HelloRefusal::UnknownExecutor(unknown))
    );
    assert_eq!(
        check_hello(&w.sm, e, &[0xee; 32], executor_spec("x")),
        Err(HelloRefusal::WrongCertificate(e))
    );
    let mut bad = executor_spec("x");
    bad.name = "n".repeat(10_000);
    assert!(matches!(
        check_hello(&w.sm, e, &fingerprint(e), bad),
        Err(HelloRefusal::InvalidSpec(_))
    ));
    let registered = executor_spec(&format!("e{e}"));
    assert_eq!(check_hello(&w.sm, e, &fingerprint(e), registered.clone()), Ok(Hello::AlreadyUp));
    let mut bigger = registered;
    bigger.capacity.cpu_millis *= 2;
    assert_eq!(
        check_hello(&w.sm, e, &fingerprint(e), bigger.clone()),
        Ok(Hello::Register(Command::RegisterExecutor { id: e, spec: bigger }))
    );
    w.apply(Command::MarkExecutorDown { id: e, reason: "test".to_owned() });
    let same = executor_spec(&format!("e{e}"));
    assert_eq!(
        check_hello(&w.sm, e, &fingerprint(e), same.clone()),
        Ok(Hello::Register(Command::RegisterExecutor { id: e, spec: same })),
        "a down executor registers again"
    );
}

fn model(version: u64, created_unix_ms: u64) -> ModelRecord {
    ModelRecord {
        version: ModelVersion(version),
        created_unix_ms,
        device: "cpu".to_owned(),
        feature_schema: "colony-features-v1".to_owned(),
        weights: Vec::new(),
        metrics: ModelMetrics {
            holdout_mse: 1.0,
            baseline_mse: 2.0,
            previous_mse: None,
            train_rows: 10,
            holdout_rows: 2,
        },
    }
}

#[test]
fn a_model_is_decoded_once_per_version_and_a_bad_one_is_not_retried() {
    let mut tracker = ModelTracker::default();
    let stale_after = Duration::from_secs(3600);
    let v1 = model(1, 1_000);
    assert_eq!(
        tracker.refresh(Some(&v1), 2_000, stale_after),
        ModelDecision::Decode(ModelVersion(1))
    );
    tracker.decoded(ModelVersion(1), true);
    assert_eq!(tracker.refresh(Some(&v1), 3_000, stale_after), ModelDecision::Keep);
    assert_eq!(tracker.in_use(), Some(ModelVersion(1)));
    let v2 = model(2, 5_000);
    assert_eq!(
        tracker.refresh(Some(&v2), 6_000, stale_after),
        ModelDecision::Decode(ModelVersion(2))
    );
    tracker.decoded(ModelVersion(2), false);
    assert_eq!(
        tracker.refresh(Some(&v2), 7_000, stale_after),
        ModelDecision::Keep,
        "a bad version is not decoded again"
    );
    assert_eq!(tracker.in_use(), None);
    assert_eq!(tracker.refresh(None, 8_000, stale_after), ModelDecision::NoModel);
    assert_eq!(
        tracker.refresh(Some(&v2), 9_000, stale_after),
        ModelDecision::Decode(ModelVersion(2)),
        "after a rollback to none, looked at afresh"
    );
}

#[test]
fn a_stale_model_is_ignored() {
    let mut tracker = ModelTracker::default();
    let stale_after = Duration::from_secs(10);
    let v1 = model(1, 1_000);
    assert_eq!(
        tracker.refresh(Some(&v1), 5_000, stale_after),
        ModelDecision::Decode(ModelVersion(1))
    );
    tracker.decoded(ModelVersion(1), true);
    assert_eq!(
        tracker.refresh(Some(&v1), 11_000, stale_after),
        ModelDecision::Keep,
        "exactly the limit is still fresh"
    );
    assert_eq!(
        tracker.refresh(Some(&v1), 11_001, stale_after),
        ModelDecision::Stale { version: ModelVersion(1), was_in_use: true }
    );
    assert_eq!(tracker.in_use(), None);
    assert_eq!(
        tracker.refresh(Some(&v1), 12_000, stale_after),
        ModelDecision::Stale { version: ModelVersion(1), was_in_use: false }
    );
}

#[test]
fn an_executor_that_says_it_stops_is_declared_down_at_once() {
    let mut w = World::new();
    w.advance(20 * SECOND);
    let e = w.executor();
    let (old, _) = w.connect(e, &[]);
    let (session, _) = w.connect(e, &[]);
    // The end of a replaced session says nothing about the executor.
    assert_eq!(w.leader.handle_stopped(&w.sm, e, old), vec![]);
    let effects = w.leader.handle_stopped(&w.sm, e, session);
    assert_eq!(
        effects,
        vec![Effect::Propose(Command::MarkExecutorDown {
            id: e,
            reason: "the executor stopped".to_owned()
        })]
    );
    assert_eq!(w.leader.connected(), 0);
    assert_eq!(w.leader.handle_stopped(&w.sm, e, session), vec![], "only once");
}
