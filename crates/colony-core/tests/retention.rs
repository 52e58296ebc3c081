//! Retention: exactly the finished tasks, executors and tokens due go, and nothing else.

#![allow(clippy::unwrap_used)]

use colony_core::{
    AclToken, AttemptOutcome, AttemptResult, AttemptStatus, Collected, Command, CommandError,
    ExecutorId, ExecutorSpec, ExecutorState, Grant, JoinKind, Outcome, Placement, Proposal,
    Resources, Retention, Role, RunSpec, StateMachine, TaskId, TaskSpec, TaskState,
};
use std::collections::{BTreeMap, BTreeSet};

const HOUR: u64 = 3_600_000;

fn spec(name: &str, deps: &[TaskId], key: Option<&str>) -> TaskSpec {
    TaskSpec {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        labels: BTreeMap::new(),
        capabilities: BTreeSet::new(),
        resources: Resources {
            cpu_millis: 100,
            memory_bytes: 1 << 20,
            gpus: 0,
            custom: BTreeMap::new(),
        },
        priority: 1,
        deadline_unix_ms: None,
        timeout_ms: None,
        max_retries: 0,
        dependencies: deps.iter().copied().collect(),
        run: RunSpec::Process {
            program: "/bin/true".to_owned(),
            args: vec![],
            env: BTreeMap::new(),
        },
        idempotency_key: key.map(str::to_owned),
        placement: Default::default(),
        memory_auto: false,
    }
}

struct Cluster {
    sm: StateMachine,
    now: u64,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster { sm: StateMachine::new(), now: 1_000_000 }
    }

    fn apply(&mut self, command: Command) -> Result<Outcome, CommandError> {
        let proposal = Proposal { now_unix_ms: self.now, commands: vec![command] };
        let result = self.sm.apply_proposal(&proposal).remove(0);
        self.sm.check_invariants().unwrap();
        result
    }

    fn submit(&mut self, spec: TaskSpec) -> TaskId {
        match self.apply(Command::SubmitTask(spec)).unwrap() {
            Outcome::Submitted { task, .. } => task.id,
            other => panic!("{other:?}"),
        }
    }

    fn cancel(&mut self, id: TaskId) {
        self.apply(Command::CancelTask { id, reason: String::new() }).unwrap();
    }

    fn executor(&mut self) -> ExecutorId {
        let id = self.sm.next_executor_id();
        let hash = [id.0 as u8; 32];
        let expires = self.now + 10 * HOUR;
        self.apply(Command::CreateJoinToken {
            secret_hash: hash,
            expires_unix_ms: expires,
            kind: JoinKind::Executor,
        })
        .unwrap();
        self.apply(Command::AdmitExecutor {
            secret_hash: hash,
            expected_id: id,
            name: format!("e{}", id.0),
            cert_fingerprint: hash,
        })
        .unwrap();
        id
    }

    fn register(&mut self, id: ExecutorId) {
        let spec = ExecutorSpec {
            name: format!("e{}", id.0),
            capacity: Resources {
                cpu_millis: 4000,
                memory_bytes: 1 << 30,
                gpus: 0,
                custom: BTreeMap::new(),
            },
            labels: BTreeMap::new(),
            capabilities: BTreeSet::new(),
        };
        self.apply(Command::RegisterExecutor { id, spec }).unwrap();
    }

    /// Runs `task` to success on `executor`.
    fn succeed(&mut self, task: TaskId, executor: ExecutorId) {
        let placement = Placement { task, executor, evict: vec![], memory_bytes: None };
        let token = match self
            .apply(Command::PlaceTasks { placements: vec![placement], unschedulable: vec![] })
            .unwrap()
        {
            Outcome::Placed { assigned, .. } => assigned[0].token,
            other => panic!("{other:?}"),
        };
        let status = AttemptStatus::Finished(AttemptResult {
            outcome: AttemptOutcome::Succeeded,
            exit_code: Some(0),
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            message: String::new(),
            peak_memory_bytes: None,
        });
        self.apply(Command::Report { executor, task, token, status }).unwrap();
    }

    fn collect(&mut self, retention: Retention) -> Collected {
        match self.apply(Command::Collect(retention)).unwrap() {
            Outcome::Collected(collected) => collected,
            other => panic!("{other:?}"),
        }
    }

    fn state(&self, id: TaskId) -> Option<TaskState> {
        self.sm.get_task(id).map(|t| t.state)
    }
}

fn policy(retention_hours: u64, finished_max: u64) -> Retention {
    Retention {
        task_retention_ms: retention_hours * HOUR,
        finished_tasks_max: finished_max,
        executor_gc_after_ms: 24 * HOUR,
        scan_max: 1000,
    }
}

#[test]
fn finished_tasks_older_than_the_retention_go_with_their_keys() {
    let mut c = Cluster::new();
    let old = c.submit(spec("old", &[], Some("k-old")));
    c.cancel(old);
    c.now += 2 * HOUR;
    let young = c.submit(spec("young", &[], Some("k-young")));
    c.cancel(young);
    let live = c.submit(spec("live", &[], None));

    assert!(!c.sm.collectable(&policy(3, 100), c.now), "nothing is 3 hours old yet");
    c.now += 90 * 60_000;
    assert!(c.sm.collectable(&policy(3, 100), c.now));
    let collected = c.collect(policy(3, 100));
    assert_eq!(collected.tasks, vec![old]);
    assert!(!collected.more);
    assert_eq!(c.state(old), None);
    assert_eq!(c.state(young), Some(TaskState::Cancelled));
    assert_eq!(c.state(live), Some(TaskState::Pending));
    assert_eq!(c.sm.finished_removed_through(), 1);
    assert!(!c.sm.collectable(&policy(3, 100), c.now), "a second collection has nothing to do");

    // The key is free again: the same key makes a new task, the other key still finds its task.
    let again = c.submit(spec("old", &[], Some("k-old")));
    assert!(again > live);
    match c.apply(Command::SubmitTask(spec("young", &[], Some("k-young")))).unwrap() {
        Outcome::Submitted { task, existing } => assert!(existing && task.id == young),
        other => panic!("{other:?}"),
    }
}

#[test]
fn beyond_the_count_the_oldest_finished_go_first() {
    let mut c = Cluster::new();
    let ids: Vec<TaskId> = (0..5)
        .map(|i| {
            let id = c.submit(spec(&format!("t{i}"), &[], None));
            c.cancel(id);
            c.now += 1;
            id
        })
        .collect();
    let collected = c.collect(policy(72, 2));
    assert_eq!(collected.tasks, ids[..3].to_vec());
    assert_eq!(c.sm.finished_count(), 2);
    assert_eq!(c.state(ids[3]), Some(TaskState::Cancelled));
}

#[test]
fn a_finished_task_stays_while_an_unfinished_task_depends_on_it() {
    let mut c = Cluster::new();
    let e = c.executor();
    c.register(e);
    let upstream = c.submit(spec("upstream", &[], None));
    c.succeed(upstream, e);
    let downstream = c.submit(spec("downstream", &[upstream], None));
    assert_eq!(c.state(downstream), Some(TaskState::Pending));

    c.now += 100 * HOUR;
    let collected = c.collect(policy(72, 100));
    assert!(collected.tasks.is_empty());
    assert_eq!(collected.held, 1);
    assert_eq!(c.state(upstream), Some(TaskState::Succeeded));

    c.succeed(downstream, e);
    // The dependent is young: the upstream goes now, the dependent keeps its record (naming a
    // dependency that is gone) until it is old enough itself.
    let collected = c.collect(policy(72, 100));
    assert_eq!(collected.tasks, vec![upstream]);
    assert_eq!(c.state(downstream), Some(TaskState::Succeeded));
    assert_eq!(c.sm.dependents_of(upstream).count(), 0);
    c.now += 73 * HOUR;
    assert_eq!(c.collect(policy(72, 100)).tasks, vec![downstream]);
    // A new task cannot depend on a task retention removed.
    assert!(matches!(
        c.apply(Command::SubmitTask(spec("late", &[upstream], None))),
        Err(CommandError::UnknownDependency(id)) if id == upstream
    ));
}

#[test]
fn one_collection_looks_at_no_more_than_scan_max() {
    let mut c = Cluster::new();
    for i in 0..7 {
        let id = c.submit(spec(&format!("t{i}"), &[], None));
        c.cancel(id);
    }
    c.now += 100 * HOUR;
    let small = Retention { scan_max: 3, ..policy(72, 100) };
    let first = c.collect(small);
    assert_eq!((first.tasks.len(), first.more), (3, true));
    let second = c.collect(small);
    assert_eq!((second.tasks.len(), second.more), (3, true));
    let third = c.collect(small);
    assert_eq!((third.tasks.len(), third.more), (1, false));
    assert_eq!(c.sm.finished_count(), 0);
    assert_eq!(c.sm.finished_removed_through(), 7);
}

#[test]
fn long_down_or_never_connected_executors_and_expired_tokens_go() {
    let mut c = Cluster::new();
    let up = c.executor();
    c.register(up);
    let down = c.executor();
    c.register(down);
    c.apply(Command::MarkExecutorDown { id: down, reason: "silent".to_owned() }).unwrap();
    let never = c.executor();
    let token = |accessor: &str, expires: Option<u64>| AclToken {
        accessor: accessor.to_owned(),
        secret_hash: [accessor.len() as u8; 32],
        grant: Grant { role: Role::Reader, namespaces: None },
        description: String::new(),
        created_unix_ms: 0,
        expires_unix_ms: expires,
    };
    c.apply(Command::CreateAclToken(token("forever", None))).unwrap();
    c.apply(Command::CreateAclToken(token("short-lived", Some(c.now + HOUR)))).unwrap();

    c.now += 23 * HOUR;
    let early = c.collect(policy(72, 100));
    assert!(early.executors.is_empty());
    // The three join tokens lived 10 hours.
    assert_eq!((early.acl_tokens, early.join_tokens), (1, 3));
    assert!(c.sm.acl_token("short-lived").is_none() && c.sm.acl_token("forever").is_some());

    c.now += 2 * HOUR;
    let late = c.collect(policy(72, 100));
    assert_eq!(late.executors, vec![down, never]);
    assert_eq!((late.acl_tokens, late.join_tokens), (0, 0));
    assert_eq!(c.sm.get_executor(up).map(|e| e.state), Some(ExecutorState::Up));
    assert!(c.sm.get_executor(down).is_none() && c.sm.get_executor(never).is_none());
    // A removed executor is unknown: it must join again.
    let spec = c.sm.get_executor(up).unwrap().spec.clone();
    assert!(matches!(
        c.apply(Command::RegisterExecutor { id: down, spec }),
        Err(CommandError::UnknownExecutor(id)) if id == down
    ));
}

#[test]
fn a_policy_with_a_zero_bound_is_refused_and_changes_nothing() {
    let mut c = Cluster::new();
    let id = c.submit(spec("t", &[], None));
    c.cancel(id);
    c.now += 100 * HOUR;
    let before = c.sm.clone();
    for bad in [
        Retention { task_retention_ms: 0, ..policy(72, 100) },
        Retention { finished_tasks_max: 0, ..policy(72, 100) },
        Retention { executor_gc_after_ms: 0, ..policy(72, 100) },
        Retention { scan_max: 0, ..policy(72, 100) },
    ] {
        assert!(matches!(c.apply(Command::Collect(bad)), Err(CommandError::InvalidSpec(_))));
    }
    let mut expected = before;
    expected.apply_proposal(&Proposal { now_unix_ms: c.now, commands: vec![] });
    assert_eq!(c.sm, expected);
}

/// A restore stops everything the snapshot shows running: the attempt goes back to pending and
/// its report no longer matches, the executor is down until it registers, and the next token is
/// an epoch past the old ones.
#[test]
fn a_restored_state_stops_every_attempt_and_executor_from_before() {
    let mut c = Cluster::new();
    let e = c.executor();
    c.register(e);
    let task = c.submit(spec("running", &[], None));
    let placement = Placement { task, executor: e, evict: vec![], memory_bytes: None };
    let old_token = match c
        .apply(Command::PlaceTasks { placements: vec![placement.clone()], unschedulable: vec![] })
        .unwrap()
    {
        Outcome::Placed { assigned, .. } => assigned[0].token,
        other => panic!("{other:?}"),
    };

    let restored = c.sm.prepare_restore();
    c.sm.check_invariants().unwrap();
    assert_eq!(restored.requeued, vec![task]);
    assert_eq!(restored.executors_down, 1);
    assert_eq!(c.state(task), Some(TaskState::Pending));
    assert_eq!(c.sm.get_executor(e).map(|x| x.state), Some(ExecutorState::Down));
    let status = AttemptStatus::Started;
    assert!(matches!(
        c.apply(Command::Report { executor: e, task, token: old_token, status }),
        Err(CommandError::StaleReport { .. })
    ));
    c.register(e);
    let new_token = match c
        .apply(Command::PlaceTasks { placements: vec![placement], unschedulable: vec![] })
        .unwrap()
    {
        Outcome::Placed { assigned, .. } => assigned[0].token,
        other => panic!("{other:?}"),
    };
    assert!(new_token.0 > old_token.0 + colony_core::RESTORE_TOKEN_EPOCH, "{new_token}");
}
