//! Property tests: random command sequences keep every invariant, and rejected commands change nothing.

#![allow(clippy::unwrap_used)]

use colony_core::scheduler::{plan, PlanConfig};
use colony_core::{
    AttemptOutcome, AttemptResult, AttemptStatus, Command, CommandError, ExecutorId, ExecutorSpec,
    FencingToken, Outcome, Placement, PlacementPolicy, Proposal, Resources, Retention, RunSpec,
    StateMachine, TaskId, TaskSpec, TaskState,
};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug)]
enum Op {
    Submit {
        name: String,
        deps: Vec<u64>,
        key: Option<u8>,
        priority: u16,
        deadline_in_ms: Option<i64>,
        cpu: u64,
    },
    Cancel {
        id: u64,
    },
    /// Admits an executor and registers it with this much cpu.
    AddExecutor {
        cpu: u64,
    },
    Register {
        executor: u64,
        cpu: u64,
    },
    Down {
        executor: u64,
    },
    Drain {
        executor: u64,
        deadline_in_ms: u64,
    },
    /// Runs the planner and applies its plan.
    Schedule {
        gap: u16,
    },
    /// An arbitrary placement, most of them invalid: `apply` must refuse those.
    Place {
        task: u64,
        executor: u64,
        evict: Vec<u64>,
    },
    /// A report for a task; `stale` sends an older token than the current one.
    Report {
        task: u64,
        stale: bool,
        outcome: u8,
    },
    /// Retention with short bounds (zero ones must be refused).
    Collect {
        retention_ms: u64,
        finished_max: u64,
        gc_after_ms: u64,
        scan_max: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (
            prop_oneof![Just("job".to_owned()), Just(String::new()), Just("bad name!".to_owned()), "[a-z]{1,8}"],
            prop::collection::vec(0u64..25, 0..4),
            prop::option::of(0u8..6),
            0u16..1100,
            prop::option::of(-50i64..500),
            0u64..4000,
        )
            .prop_map(|(name, deps, key, priority, deadline_in_ms, cpu)| Op::Submit { name, deps, key, priority, deadline_in_ms, cpu }),
        1 => (0u64..25).prop_map(|id| Op::Cancel { id }),
        1 => (0u64..5000).prop_map(|cpu| Op::AddExecutor { cpu }),
        1 => (0u64..5, 0u64..5000).prop_map(|(executor, cpu)| Op::Register { executor, cpu }),
        1 => (0u64..5).prop_map(|executor| Op::Down { executor }),
        1 => (0u64..5, 0u64..100).prop_map(|(executor, deadline_in_ms)| Op::Drain { executor, deadline_in_ms }),
        3 => prop_oneof![Just(0u16), Just(1u16), Just(100u16)].prop_map(|gap| Op::Schedule { gap }),
        1 => (0u64..25, 0u64..5, prop::collection::vec(0u64..25, 0..3)).prop_map(|(task, executor, evict)| Op::Place { task, executor, evict }),
        3 => (0u64..25, prop::bool::weighted(0.2), 0u8..5).prop_map(|(task, stale, outcome)| Op::Report { task, stale, outcome }),
        1 => (0u64..200, 0u64..6, 0u64..200, 0u32..4).prop_map(|(retention_ms, finished_max, gc_after_ms, scan_max)| Op::Collect { retention_ms, finished_max, gc_after_ms, scan_max }),
    ]
}

fn executor_spec(cpu: u64) -> ExecutorSpec {
    ExecutorSpec {
        name: "exec".to_owned(),
        capacity: Resources {
            cpu_millis: cpu,
            memory_bytes: 1 << 30,
            gpus: 0,
            custom: BTreeMap::new(),
        },
        labels: BTreeMap::new(),
        capabilities: BTreeSet::new(),
    }
}

/// The commands an operation turns into, given the state (reports name the current attempt).
fn commands(op: &Op, sm: &StateMachine, now: u64) -> Vec<Command> {
    match op {
        Op::Submit { name, deps, key, priority, deadline_in_ms, cpu } => {
            let deadline = deadline_in_ms.map(|d| now.saturating_add_signed(d));
            vec![Command::SubmitTask(spec(name, deps, *key, *priority, deadline, *cpu))]
        }
        Op::Cancel { id } => vec![Command::CancelTask { id: TaskId(*id), reason: String::new() }],
        Op::AddExecutor { cpu } => {
            let id = sm.next_executor_id();
            vec![
                Command::CreateJoinToken {
                    secret_hash: [7; 32],
                    expires_unix_ms: now + 1_000_000,
                    kind: colony_core::JoinKind::Executor,
                },
                Command::AdmitExecutor {
                    secret_hash: [7; 32],
                    expected_id: id,
                    name: format!("e{id}"),
                    cert_fingerprint: [id.0 as u8; 32],
                },
                Command::RegisterExecutor { id, spec: executor_spec(*cpu) },
            ]
        }
        Op::Register { executor, cpu } => {
            vec![Command::RegisterExecutor { id: ExecutorId(*executor), spec: executor_spec(*cpu) }]
        }
        Op::Down { executor } => vec![Command::MarkExecutorDown {
            id: ExecutorId(*executor),
            reason: "silent".to_owned(),
        }],
        Op::Drain { executor, deadline_in_ms } => vec![Command::DrainExecutor {
            id: ExecutorId(*executor),
            deadline_unix_ms: now + deadline_in_ms,
        }],
        Op::Schedule { gap } => {
            let config = PlanConfig { preemption_priority_gap_min: *gap, ..PlanConfig::default() };
            let plan = plan(sm, now, &config);
            vec![
                Command::ExpireTasks { ids: plan.expire },
                Command::EvictTasks {
                    ids: plan.drain_evictions,
                    reason: "drain deadline".to_owned(),
                },
                Command::PlaceTasks {
                    placements: plan.placements,
                    unschedulable: plan.unschedulable,
                },
            ]
        }
        Op::Place { task, executor, evict } => vec![Command::PlaceTasks {
            placements: vec![Placement {
                task: TaskId(*task),
                executor: ExecutorId(*executor),
                evict: evict.iter().map(|&t| TaskId(t)).collect(),
                memory_bytes: None,
            }],
            unschedulable: vec![],
        }],
        Op::Report { task, stale, outcome } => {
            let current = sm.get_task(TaskId(*task));
            let executor = current.and_then(|t| t.executor).unwrap_or(ExecutorId(1));
            let token = current.and_then(|t| t.fencing_token).unwrap_or(FencingToken(1));
            let token = if *stale { FencingToken(token.0.saturating_sub(1)) } else { token };
            let status = match outcome {
                0 => AttemptStatus::Started,
                n => AttemptStatus::Finished(AttemptResult {
                    outcome: [
                        AttemptOutcome::Succeeded,
                        AttemptOutcome::Failed,
                        AttemptOutcome::TimedOut,
                        AttemptOutcome::OomKilled,
                    ][usize::from(*n - 1)],
                    exit_code: Some(i32::from(*n) - 1),
                    stdout_tail: "out".to_owned(),
                    stderr_tail: String::new(),
                    message: String::new(),
                    peak_memory_bytes: None,
                }),
            };
            vec![Command::Report { executor, task: TaskId(*task), token, status }]
        }
        Op::Collect { retention_ms, finished_max, gc_after_ms, scan_max } => {
            vec![Command::Collect(Retention {
                task_retention_ms: *retention_ms,
                finished_tasks_max: *finished_max,
                executor_gc_after_ms: *gc_after_ms,
                scan_max: *scan_max,
            })]
        }
    }
}

fn spec(
    name: &str,
    deps: &[u64],
    key: Option<u8>,
    priority: u16,
    deadline: Option<u64>,
    cpu: u64,
) -> TaskSpec {
    TaskSpec {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        labels: BTreeMap::new(),
        capabilities: BTreeSet::new(),
        resources: Resources {
            cpu_millis: cpu,
            memory_bytes: 64 << 20,
            gpus: 0,
            custom: BTreeMap::new(),
        },
        priority,
        deadline_unix_ms: deadline,
        timeout_ms: None,
        max_retries: u32::from(priority % 3),
        dependencies: deps.iter().map(|&d| TaskId(d)).collect(),
        run: RunSpec::Process {
            program: "/bin/true".to_owned(),
            args: vec![],
            env: BTreeMap::new(),
        },
        idempotency_key: key.map(|k| format!("key-{k}")),
        placement: if cpu.is_multiple_of(2) {
            PlacementPolicy::BinPack
        } else {
            PlacementPolicy::Spread
        },
        memory_auto: false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_commands_keep_invariants(ops in prop::collection::vec(op(), 1..80), clock_steps in prop::collection::vec(0u64..40, 80)) {
        let mut sm = StateMachine::new();
        let mut now = 1_000_000u64;
        let mut finished: BTreeMap<TaskId, TaskState> = BTreeMap::new();
        let mut next_expected_id = 1u64;
        let mut tokens: BTreeMap<TaskId, FencingToken> = BTreeMap::new();
        let mut removed: BTreeSet<TaskId> = BTreeSet::new();
        for (i, op) in ops.iter().enumerate() {
            now += clock_steps[i % clock_steps.len()];
            for command in commands(op, &sm, now) {
            let before = sm.clone();
            let results = sm.apply_proposal(&Proposal { now_unix_ms: now, commands: vec![command] });
            prop_assert_eq!(results.len(), 1);
            match &results[0] {
                Err(_) => {
                    // Only the replicated clock may move on a rejected command.
                    let mut expected = before.clone();
                    expected.apply_proposal(&Proposal { now_unix_ms: now, commands: vec![] });
                    prop_assert_eq!(&sm, &expected, "a rejected command changed state");
                }
                Ok(Outcome::Submitted { task, existing: false }) => {
                    prop_assert_eq!(task.id, TaskId(next_expected_id), "ids are dense and increasing");
                    next_expected_id += 1;
                }
                Ok(Outcome::Collected(collected)) => {
                    for id in &collected.tasks {
                        prop_assert!(finished.contains_key(id), "retention removed unfinished task {}", id);
                        removed.insert(*id);
                    }
                }
                Ok(_) => {}
            }
            }
            if let Err(violation) = sm.check_invariants() {
                prop_assert!(false, "invariant broken after {:?}: {}", op, violation);
            }
            for (id, state) in &finished {
                let expected = (!removed.contains(id)).then_some(*state);
                prop_assert_eq!(sm.get_task(*id).map(|t| t.state), expected, "finished task {} changed state or was not removed", id);
            }
            for task in sm.list_tasks(&colony_core::TaskFilter { limit: usize::MAX, ..Default::default() }) {
                if let Some(token) = task.fencing_token {
                    let previous = tokens.insert(task.id, token);
                    prop_assert!(previous.is_none_or(|p| p <= token), "task {}'s token went backwards", task.id);
                }
                if task.state.is_finished() {
                    finished.entry(task.id).or_insert(task.state);
                }
            }
        }
    }

    #[test]
    fn snapshots_are_deterministic(ops in prop::collection::vec(op(), 1..40)) {
        let run = || {
            let mut sm = StateMachine::new();
            for (i, op) in ops.iter().enumerate() {
                let now = 1000 + i as u64;
                let commands = commands(op, &sm, now);
                sm.apply_proposal(&Proposal { now_unix_ms: now, commands });
            }
            serde_json::to_vec(&sm).map_err(|e| e.to_string())
        };
        prop_assert_eq!(run(), run());
    }
}

#[test]
fn dependency_chain_blocks_then_cascades_on_cancel() {
    let mut sm = StateMachine::new();
    let submit = |sm: &mut StateMachine, deps: &[u64]| match sm
        .apply_proposal(&Proposal {
            now_unix_ms: 10,
            commands: vec![Command::SubmitTask(spec("step", deps, None, 1, None, 100))],
        })
        .remove(0)
    {
        Ok(Outcome::Submitted { task, .. }) => task,
        other => panic!("submit failed: {other:?}"),
    };
    let a = submit(&mut sm, &[]);
    let b = submit(&mut sm, &[a.id.0]);
    let c = submit(&mut sm, &[b.id.0]);
    assert_eq!(
        (a.state, b.state, c.state),
        (TaskState::Pending, TaskState::Blocked, TaskState::Blocked)
    );

    let result = sm.apply(&Command::CancelTask { id: a.id, reason: "operator".into() });
    match result {
        Ok(Outcome::Cancelled { task, cascaded }) => {
            assert_eq!(task.state, TaskState::Cancelled);
            assert_eq!(cascaded, vec![b.id, c.id]);
        }
        other => panic!("cancel failed: {other:?}"),
    }
    assert_eq!(
        sm.apply(&Command::CancelTask { id: c.id, reason: String::new() }),
        Err(CommandError::AlreadyFinished { id: c.id, state: TaskState::Cancelled })
    );
    let after_cancel = sm.apply(&Command::SubmitTask(spec("late", &[a.id.0], None, 1, None, 1)));
    assert_eq!(
        after_cancel,
        Err(CommandError::DependencyEnded { dependency: a.id, state: TaskState::Cancelled })
    );
    sm.check_invariants().unwrap();
}

#[test]
fn bad_input_is_rejected_with_typed_errors() {
    let mut sm = StateMachine::new();
    let reject = |sm: &mut StateMachine, spec: TaskSpec| sm.apply(&Command::SubmitTask(spec));
    assert!(
        matches!(reject(&mut sm, spec("", &[], None, 1, None, 1)), Err(CommandError::InvalidSpec(m)) if m.contains("name must not be empty"))
    );
    assert!(
        matches!(reject(&mut sm, spec(&"x".repeat(300), &[], None, 1, None, 1)), Err(CommandError::InvalidSpec(m)) if m.contains("253"))
    );
    assert!(
        matches!(reject(&mut sm, spec("p", &[], None, 1001, None, 1)), Err(CommandError::InvalidSpec(m)) if m.contains("priority"))
    );
    assert_eq!(
        reject(&mut sm, spec("d", &[7], None, 1, None, 1)),
        Err(CommandError::UnknownDependency(TaskId(7)))
    );
    assert_eq!(
        sm.apply(&Command::CancelTask { id: TaskId(99), reason: String::new() }),
        Err(CommandError::UnknownTask(TaskId(99)))
    );
    // Each argument is within its own limit; together they are not.
    let mut huge = spec("huge", &[], None, 1, None, 1);
    huge.run = RunSpec::Process {
        program: "/bin/true".into(),
        args: vec!["a".repeat(8000); 20],
        env: BTreeMap::new(),
    };
    assert!(
        matches!(reject(&mut sm, huge), Err(CommandError::InvalidSpec(m)) if m.contains("task spec") && m.contains("65536"))
    );
    assert_eq!(sm.task_count(), 0);
}

#[test]
fn idempotency_key_returns_the_first_task_and_refuses_a_different_spec() {
    let mut sm = StateMachine::new();
    let first = sm.apply(&Command::SubmitTask(spec("once", &[], Some(1), 5, None, 1)));
    let again = sm.apply(&Command::SubmitTask(spec("once", &[], Some(1), 5, None, 1)));
    let (
        Ok(Outcome::Submitted { task: a, existing: false }),
        Ok(Outcome::Submitted { task: b, existing: true }),
    ) = (first, again)
    else {
        panic!("idempotent resubmission did not return the first task");
    };
    assert_eq!(a.id, b.id);
    let conflict = sm.apply(&Command::SubmitTask(spec("other", &[], Some(1), 5, None, 1)));
    assert_eq!(
        conflict,
        Err(CommandError::IdempotencyConflict { key: "key-1".into(), existing: a.id })
    );
    assert_eq!(sm.task_count(), 1);
}

#[test]
fn task_states_are_lowercase_in_json() {
    assert_eq!(serde_json::to_value(TaskState::TimedOut).unwrap(), "timed_out");
    assert_eq!(serde_json::to_value(TaskState::Pending).unwrap(), "pending");
    assert_eq!("timed_out".parse::<TaskState>(), Ok(TaskState::TimedOut));
    assert!("sleeping".parse::<TaskState>().is_err());
}

fn bincode_round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
    let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard()).expect("encode");
    let (back, read) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).expect("decode");
    assert_eq!(read, bytes.len(), "every byte consumed");
    back
}

proptest! {
    /// Everything the log and snapshots hold is encoded with bincode (not self-describing): every
    /// persisted type must decode to exactly what was encoded, whatever optional fields it has.
    #[test]
    fn persisted_types_round_trip_through_bincode(ops in prop::collection::vec(op(), 1..40)) {
        let mut sm = StateMachine::new();
        for (i, op) in ops.iter().enumerate() {
            let now = 10_000 + i as u64;
            let commands = match op {
                Op::Submit { name, deps, key, priority, deadline_in_ms, cpu } => {
                    let mut spec = spec(name, deps, *key, *priority, deadline_in_ms.map(|d| now.saturating_add_signed(d)), *cpu);
                    if i % 2 == 0 {
                        spec.run = RunSpec::Builtin { handler: "sleep".into(), input: String::new() };
                        spec.timeout_ms = Some(5);
                        spec.labels.insert("zone".into(), "a".into());
                    }
                    vec![Command::SubmitTask(spec)]
                }
                other => commands(other, &sm, now),
            };
            let proposal = Proposal { now_unix_ms: now, commands };
            prop_assert_eq!(&bincode_round_trip(&proposal), &proposal);
            let results = sm.apply_proposal(&proposal);
            prop_assert_eq!(&bincode_round_trip(&results), &results);
        }
        prop_assert_eq!(&bincode_round_trip(&sm), &sm);
    }
}
