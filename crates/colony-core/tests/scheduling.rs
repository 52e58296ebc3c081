//! Scenario tests of placement, preemption, deadlines, dependencies, retries, drain and fencing,
//! driving the state machine with the planner's own plans, as the leader does.

#![allow(clippy::unwrap_used)]

use colony_core::scheduler::{plan, PlanConfig};
use colony_core::{
    AttemptOutcome, AttemptResult, AttemptStatus, Command, CommandError, ConstraintMismatch,
    ExecutorId, ExecutorSpec, ExecutorState, Outcome, PlacementRejection, Proposal, ResourceKind,
    Resources, RunSpec, StateMachine, TaskId, TaskSpec, TaskState,
};
use std::collections::{BTreeMap, BTreeSet};

struct World {
    sm: StateMachine,
    now: u64,
    config: PlanConfig,
}

fn resources(cpu_millis: u64, memory_mib: u64) -> Resources {
    Resources { cpu_millis, memory_bytes: memory_mib << 20, gpus: 0, custom: BTreeMap::new() }
}

fn spec(name: &str, cpu_millis: u64, priority: u16) -> TaskSpec {
    TaskSpec {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        labels: BTreeMap::new(),
        capabilities: BTreeSet::new(),
        resources: resources(cpu_millis, 64),
        priority,
        deadline_unix_ms: None,
        timeout_ms: None,
        max_retries: 0,
        dependencies: BTreeSet::new(),
        run: RunSpec::Builtin { handler: "sleep".to_owned(), input: "1s".to_owned() },
        idempotency_key: None,
        placement: Default::default(),
        memory_auto: false,
    }
}

fn finished(outcome: AttemptOutcome) -> AttemptStatus {
    AttemptStatus::Finished(AttemptResult {
        outcome,
        exit_code: Some(0),
        stdout_tail: String::new(),
        stderr_tail: String::new(),
        message: String::new(),
        peak_memory_bytes: Some(1 << 20),
    })
}

impl World {
    fn new() -> World {
        World { sm: StateMachine::new(), now: 1_000_000, config: PlanConfig::default() }
    }

    fn apply(&mut self, command: Command) -> Result<Outcome, CommandError> {
        let result = self
            .sm
            .apply_proposal(&Proposal { now_unix_ms: self.now, commands: vec![command] })
            .remove(0);
        self.sm.check_invariants().unwrap();
        result
    }

    fn executor(&mut self, cpu_millis: u64, labels: &[(&str, &str)]) -> ExecutorId {
        let id = self.sm.next_executor_id();
        self.apply(Command::CreateJoinToken {
            secret_hash: [1; 32],
            expires_unix_ms: self.now + 60_000,
            kind: colony_core::JoinKind::Executor,
        })
        .unwrap();
        self.apply(Command::AdmitExecutor {
            secret_hash: [1; 32],
            expected_id: id,
            name: format!("e{id}"),
            cert_fingerprint: [0; 32],
        })
        .unwrap();
        let spec = ExecutorSpec {
            name: format!("e{id}"),
            capacity: resources(cpu_millis, 4096),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            capabilities: BTreeSet::from(["shell".to_owned()]),
        };
        self.apply(Command::RegisterExecutor { id, spec }).unwrap();
        id
    }

    fn submit(&mut self, spec: TaskSpec) -> TaskId {
        match self.apply(Command::SubmitTask(spec)).unwrap() {
            Outcome::Submitted { task, .. } => task.id,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// One scheduling round, applied the way the leader proposes it.
    fn schedule(&mut self) -> Outcome {
        let plan = plan(&self.sm, self.now, &self.config);
        self.apply(Command::ExpireTasks { ids: plan.expire }).unwrap();
        self.apply(Command::EvictTasks {
            ids: plan.drain_evictions,
            reason: "drain deadline passed".to_owned(),
        })
        .unwrap();
        self.apply(Command::PlaceTasks {
            placements: plan.placements,
            unschedulable: plan.unschedulable,
        })
        .unwrap()
    }

    fn task(&self, id: TaskId) -> colony_core::Task {
        self.sm.get_task(id).unwrap().clone()
    }

    fn report(&mut self, id: TaskId, status: AttemptStatus) -> Result<Outcome, CommandError> {
        let task = self.task(id);
        self.apply(Command::Report {
            executor: task.executor.unwrap(),
            task: id,
            token: task.fencing_token.unwrap(),
            status,
        })
    }
}

#[test]
fn bin_packing_fills_one_executor_before_the_next_and_spread_does_the_opposite() {
    let mut w = World::new();
    let a = w.executor(4000, &[]);
    let b = w.executor(4000, &[]);
    let first = w.submit(spec("one", 1000, 10));
    let second = w.submit(spec("two", 1000, 10));
    w.schedule();
    assert_eq!(
        w.task(first).executor,
        w.task(second).executor,
        "bin-packing puts both on one executor"
    );
    let mut spread = spec("three", 1000, 10);
    spread.placement = colony_core::PlacementPolicy::Spread;
    let third = w.submit(spread);
    w.schedule();
    let used = w.task(first).executor.unwrap();
    let other = if used == a { b } else { a };
    assert_eq!(w.task(third).executor, Some(other), "spread picks the emptier executor");
}

#[test]
fn a_task_that_fits_nowhere_stays_pending_with_a_reason() {
    let mut w = World::new();
    w.executor(4000, &[]);
    let mut huge = spec("huge", 1000, 10);
    huge.resources.memory_bytes = 64 << 30;
    let id = w.submit(huge);
    w.schedule();
    let task = w.task(id);
    assert_eq!(task.state, TaskState::Pending);
    assert_eq!(task.reason.as_deref(), Some("unschedulable: no executor has 64Gi memory"));
    let mut zoned = spec("zoned", 100, 10);
    zoned.labels.insert("zone".into(), "c".into());
    let zoned = w.submit(zoned);
    w.schedule();
    assert_eq!(
        w.task(zoned).reason.as_deref(),
        Some("unschedulable: no executor has label zone=c")
    );
    let before = w.sm.clone();
    w.schedule();
    assert_eq!(
        w.sm.get_task(zoned),
        before.get_task(zoned),
        "an unchanged reason is not re-committed"
    );
}

#[test]
fn placements_never_overcommit_even_when_planned_against_a_stale_state() {
    let mut w = World::new();
    w.executor(1000, &[]);
    let a = w.submit(spec("a", 1000, 10));
    let b = w.submit(spec("b", 1000, 10));
    // Two leaders' worth of plans made against the same state: the second must be refused.
    let stale = plan(&w.sm, w.now, &w.config);
    assert_eq!(stale.placements.len(), 1);
    w.apply(Command::PlaceTasks { placements: stale.placements.clone(), unschedulable: vec![] })
        .unwrap();
    let mut forged = stale.placements.clone();
    forged[0].task = if forged[0].task == a { b } else { a };
    match w.apply(Command::PlaceTasks { placements: forged, unschedulable: vec![] }).unwrap() {
        Outcome::Placed { assigned, rejected, .. } => {
            assert!(assigned.is_empty());
            assert!(
                matches!(
                    &rejected[0].1,
                    PlacementRejection::Insufficient {
                        resource: ResourceKind::Cpu,
                        requested: 1000,
                        free: 0,
                        ..
                    }
                ),
                "{rejected:?}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn refused_placements_say_why_in_typed_fields() {
    let mut w = World::new();
    let e = w.executor(1000, &[("zone", "a")]);
    let mut zoned = spec("zoned", 100, 10);
    zoned.labels.insert("zone".into(), "b".into());
    let zoned = w.submit(zoned);
    let placed = w.submit(spec("placed", 100, 10));
    w.schedule();
    let place = |task, executor| colony_core::Placement {
        task,
        executor,
        evict: vec![],
        memory_bytes: None,
    };
    let placements =
        vec![place(zoned, e), place(placed, e), place(TaskId(99), e), place(zoned, ExecutorId(42))];
    let Outcome::Placed { assigned, rejected, .. } =
        w.apply(Command::PlaceTasks { placements, unschedulable: vec![] }).unwrap()
    else {
        panic!("not a placement outcome");
    };
    assert!(assigned.is_empty());
    let label = ConstraintMismatch::Label { key: "zone".into(), value: "b".into() };
    assert_eq!(
        rejected,
        vec![
            (
                zoned,
                PlacementRejection::ConstraintMismatch {
                    task: zoned,
                    executor: e,
                    mismatch: label
                }
            ),
            (
                placed,
                PlacementRejection::TaskNotPending { task: placed, state: TaskState::Assigned }
            ),
            (TaskId(99), PlacementRejection::UnknownTask { task: TaskId(99) }),
            (zoned, PlacementRejection::UnknownExecutor { executor: ExecutorId(42) }),
        ]
    );
    assert_eq!(
        rejected[0].1.to_string(),
        format!("executor {e} cannot run task {zoned}: it lacks label zone=b")
    );
}

#[test]
fn preemption_evicts_lower_priority_without_spending_a_retry() {
    let mut w = World::new();
    w.executor(2000, &[]);
    let low = w.submit(spec("low", 2000, 10));
    w.schedule();
    w.report(low, AttemptStatus::Started).unwrap();
    let close = w.submit(spec("close", 2000, 50));
    w.schedule();
    assert_eq!(
        w.task(close).state,
        TaskState::Pending,
        "a priority gap below the minimum does not preempt"
    );
    let high = w.submit(spec("high", 2000, 500));
    match w.schedule() {
        Outcome::Placed { evicted, .. } => assert_eq!(evicted, vec![low]),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(w.task(high).state, TaskState::Assigned);
    let low_task = w.task(low);
    assert_eq!(low_task.state, TaskState::Pending);
    assert_eq!(low_task.retries_used, 0, "eviction does not spend a retry");
    assert_eq!(low_task.reason.as_deref(), Some(format!("preempted by task {high}").as_str()));
}

#[test]
fn deadlines_expire_unstarted_tasks() {
    let mut w = World::new();
    let mut late = spec("late", 100, 10);
    late.deadline_unix_ms = Some(w.now + 500);
    let id = w.submit(late);
    w.now += 1000;
    w.schedule();
    let task = w.task(id);
    assert_eq!(task.state, TaskState::TimedOut);
    assert_eq!(task.reason.as_deref(), Some("not started by its deadline"));
}

#[test]
fn dependencies_release_on_success_and_cancel_on_failure() {
    let mut w = World::new();
    w.executor(4000, &[]);
    let build = w.submit(spec("build", 100, 10));
    let mut test = spec("test", 100, 10);
    test.dependencies.insert(build);
    let test = w.submit(test);
    let mut report = spec("report", 100, 10);
    report.dependencies.insert(test);
    let report = w.submit(report);
    assert_eq!(w.task(test).state, TaskState::Blocked);
    w.schedule();
    w.report(build, finished(AttemptOutcome::Succeeded)).unwrap();
    assert_eq!(w.task(test).state, TaskState::Pending, "released when its dependency succeeded");
    w.schedule();
    w.report(test, finished(AttemptOutcome::Failed)).unwrap();
    assert_eq!(w.task(test).state, TaskState::Failed);
    let report = w.task(report);
    assert_eq!(report.state, TaskState::Cancelled);
    assert_eq!(report.reason.as_deref(), Some(format!("dependency {test} ended failed").as_str()));
}

#[test]
fn failed_attempts_retry_with_backoff_then_fail() {
    let mut w = World::new();
    w.executor(4000, &[]);
    let mut flaky = spec("flaky", 100, 10);
    flaky.max_retries = 2;
    let id = w.submit(flaky);
    for retry in 1..=2u32 {
        w.schedule();
        let attempt = w.task(id);
        assert_eq!(attempt.attempt, retry);
        w.report(id, finished(AttemptOutcome::Failed)).unwrap();
        let task = w.task(id);
        assert_eq!((task.state, task.retries_used), (TaskState::Pending, retry));
        w.schedule();
        assert_eq!(w.task(id).state, TaskState::Pending, "not placed during its backoff");
        w.now = task.not_before_unix_ms;
    }
    w.schedule();
    w.report(id, finished(AttemptOutcome::Failed)).unwrap();
    assert_eq!(w.task(id).state, TaskState::Failed);
}

#[test]
fn an_executor_going_down_loses_its_attempts_to_retries_and_old_reports_are_fenced_off() {
    let mut w = World::new();
    let first = w.executor(1000, &[]);
    let mut job = spec("job", 1000, 10);
    job.max_retries = 1;
    let id = w.submit(job);
    w.schedule();
    let old = w.task(id);
    assert_eq!(old.executor, Some(first));
    w.report(id, AttemptStatus::Started).unwrap();
    w.apply(Command::MarkExecutorDown { id: first, reason: "no heartbeat for 3s".into() }).unwrap();
    assert_eq!(w.sm.get_executor(first).unwrap().state, ExecutorState::Down);
    let second = w.executor(1000, &[]);
    w.now += 10_000;
    w.schedule();
    let new = w.task(id);
    assert_eq!((new.executor, new.attempt), (Some(second), 2));
    assert!(new.fencing_token > old.fencing_token);
    let stale = Command::Report {
        executor: first,
        task: id,
        token: old.fencing_token.unwrap(),
        status: finished(AttemptOutcome::Succeeded),
    };
    assert!(
        matches!(w.apply(stale), Err(CommandError::StaleReport { .. })),
        "the old attempt cannot complete the task"
    );
    w.report(id, finished(AttemptOutcome::Succeeded)).unwrap();
    let duplicate = Command::Report {
        executor: second,
        task: id,
        token: new.fencing_token.unwrap(),
        status: finished(AttemptOutcome::Succeeded),
    };
    assert!(
        matches!(w.apply(duplicate), Err(CommandError::StaleReport { .. })),
        "an attempt completes at most once"
    );
    // Back from the dead: registering again brings it up, holding nothing.
    let spec = w.sm.get_executor(first).unwrap().spec.clone();
    w.apply(Command::RegisterExecutor { id: first, spec }).unwrap();
    assert_eq!(w.sm.get_executor(first).unwrap().state, ExecutorState::Up);
}

#[test]
fn drain_stops_new_placements_then_evicts_at_the_deadline() {
    let mut w = World::new();
    let drained = w.executor(1000, &[]);
    let id = w.submit(spec("long", 1000, 10));
    w.schedule();
    w.apply(Command::DrainExecutor { id: drained, deadline_unix_ms: w.now + 5000 }).unwrap();
    assert!(matches!(
        w.apply(Command::DrainExecutor { id: drained, deadline_unix_ms: w.now }),
        Err(CommandError::ExecutorState { state: ExecutorState::Draining, .. })
    ));
    assert!(matches!(
        w.apply(Command::DrainExecutor { id: ExecutorId(99), deadline_unix_ms: w.now }),
        Err(CommandError::UnknownExecutor(_))
    ));
    let queued = w.submit(spec("queued", 100, 10));
    w.schedule();
    assert_eq!(w.task(queued).state, TaskState::Pending, "a draining executor takes no new work");
    assert_eq!(
        w.task(id).state,
        TaskState::Assigned,
        "before the deadline the attempt keeps running"
    );
    w.now += 5000;
    w.schedule();
    let evicted = w.task(id);
    assert_eq!((evicted.state, evicted.retries_used), (TaskState::Pending, 0));
    let other = w.executor(2000, &[]);
    w.schedule();
    assert_eq!(w.task(id).executor, Some(other));
}

#[test]
fn join_tokens_expire_and_admissions_race_safely() {
    let mut w = World::new();
    w.apply(Command::CreateJoinToken {
        secret_hash: [9; 32],
        expires_unix_ms: w.now + 100,
        kind: colony_core::JoinKind::Executor,
    })
    .unwrap();
    let id = w.sm.next_executor_id();
    let admit = |expected_id| Command::AdmitExecutor {
        secret_hash: [9; 32],
        expected_id,
        name: "e".into(),
        cert_fingerprint: [0; 32],
    };
    w.apply(admit(id)).unwrap();
    assert!(matches!(w.apply(admit(id)), Err(CommandError::AdmissionRaced { .. })));
    let wrong = Command::AdmitExecutor {
        secret_hash: [8; 32],
        expected_id: w.sm.next_executor_id(),
        name: "e".into(),
        cert_fingerprint: [0; 32],
    };
    assert_eq!(
        w.apply(wrong),
        Err(CommandError::InvalidJoinToken { kind: colony_core::JoinKind::Executor })
    );
    w.now += 100;
    assert_eq!(
        w.apply(admit(w.sm.next_executor_id())),
        Err(CommandError::InvalidJoinToken { kind: colony_core::JoinKind::Executor }),
        "an expired token is refused"
    );
}

/// Predicts 100 MiB of memory for every task, and a runtime that depends on the executor's size.
struct FixedModel;

impl colony_core::scheduler::Oracle for FixedModel {
    fn peak_memory_bytes(&self, _: &TaskSpec, _: &ExecutorSpec) -> Option<f64> {
        Some((100u64 << 20) as f64)
    }

    fn runtime_ms(&self, _: &TaskSpec, executor: &ExecutorSpec) -> Option<f64> {
        Some(100_000.0 / executor.capacity.cpu_millis as f64)
    }
}

#[test]
fn memory_auto_is_sized_by_the_model_with_a_margin_or_falls_back() {
    let mut w = World::new();
    w.executor(4000, &[]);
    let mut auto = spec("etl", 100, 10);
    auto.memory_auto = true;
    let sized = w.submit(auto.clone());
    let plan = colony_core::scheduler::plan_with(&w.sm, w.now, &w.config, &FixedModel);
    assert_eq!(plan.placements[0].memory_bytes, Some(125 << 20), "100 MiB predicted, 25% margin");
    w.apply(Command::PlaceTasks { placements: plan.placements, unschedulable: plan.unschedulable })
        .unwrap();
    assert_eq!(w.task(sized).allocated.memory_bytes, 125 << 20);
    let executor = w.task(sized).executor.unwrap();
    assert_eq!(
        w.sm.get_executor(executor).unwrap().allocated.memory_bytes,
        125 << 20,
        "the executor holds the sized memory"
    );

    let fallback = w.submit(auto.clone());
    w.schedule();
    assert_eq!(w.task(fallback).allocated.memory_bytes, 512 << 20, "no model: the fallback");

    // apply refuses a placement that sizes a declared task or sizes below the floor.
    let declared = w.submit(spec("declared", 100, 10));
    let refuse = |w: &mut World, task, memory_bytes| match w
        .apply(Command::PlaceTasks {
            placements: vec![colony_core::Placement {
                task,
                executor,
                evict: vec![],
                memory_bytes,
            }],
            unschedulable: vec![],
        })
        .unwrap()
    {
        Outcome::Placed { rejected, .. } => {
            rejected.into_iter().map(|(_, why)| why).collect::<Vec<_>>()
        }
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(
        refuse(&mut w, declared, Some(1 << 30)),
        vec![PlacementRejection::MemorySizedButDeclared { task: declared }]
    );
    let tiny = w.submit(auto);
    assert_eq!(
        refuse(&mut w, tiny, Some(1 << 20)),
        vec![PlacementRejection::MemoryBelowFloor {
            task: tiny,
            memory_bytes: 1 << 20,
            floor_bytes: 64 << 20
        }],
        "below the 64 MiB floor"
    );
    assert_eq!(
        refuse(&mut w, tiny, None),
        vec![PlacementRejection::MemoryNotSized { task: tiny }],
        "memory auto needs a size"
    );
}

#[test]
fn with_a_model_deadline_work_goes_to_the_executor_that_finishes_soonest_and_least_slack_first() {
    let mut w = World::new();
    let small = w.executor(1000, &[]);
    let big = w.executor(8000, &[]);
    let mut urgent = spec("urgent", 500, 10);
    urgent.deadline_unix_ms = Some(w.now + 60_000);
    let urgent = w.submit(urgent);
    let plan = colony_core::scheduler::plan_with(&w.sm, w.now, &w.config, &FixedModel);
    assert_eq!(
        plan.placements[0].executor, big,
        "the 8-core executor is predicted to finish first"
    );
    let plan = colony_core::scheduler::plan(&w.sm, w.now, &w.config);
    assert_eq!(
        plan.placements[0].executor, small,
        "without a model, bin-packing picks the fuller (smaller) one"
    );
    assert_eq!(plan.placements[0].task, urgent);
}

#[test]
fn the_model_registry_publishes_rolls_back_and_refuses_bad_models() {
    let mut w = World::new();
    let metrics = colony_core::ModelMetrics {
        holdout_mse: 0.1,
        baseline_mse: 0.5,
        previous_mse: None,
        train_rows: 80,
        holdout_rows: 20,
    };
    let publish = |metrics: colony_core::ModelMetrics, weights: Vec<u8>| Command::PublishModel {
        device: "cpu".into(),
        feature_schema: "colony-features-v1".into(),
        weights,
        metrics,
    };
    let first = match w.apply(publish(metrics.clone(), vec![1, 2, 3])).unwrap() {
        Outcome::ModelPublished { version } => version,
        other => panic!("unexpected {other:?}"),
    };
    w.apply(publish(metrics.clone(), vec![4])).unwrap();
    assert_ne!(w.sm.current_model().unwrap().version, first);
    w.apply(Command::RollbackModel { version: first }).unwrap();
    assert_eq!(w.sm.current_model().unwrap().version, first);
    let before = w.sm.clone();
    assert_eq!(
        w.apply(Command::RollbackModel { version: colony_core::ModelVersion(99) }),
        Err(CommandError::UnknownModel(colony_core::ModelVersion(99)))
    );
    let nan = colony_core::ModelMetrics { holdout_mse: f64::NAN, ..metrics.clone() };
    assert!(matches!(w.apply(publish(nan, vec![1])), Err(CommandError::InvalidModel(_))));
    assert!(matches!(
        w.apply(publish(metrics.clone(), vec![0; 5 << 20])),
        Err(CommandError::TooLong { .. })
    ));
    assert!(matches!(w.apply(publish(metrics, vec![])), Err(CommandError::TooLong { .. })));
    assert_eq!(w.sm, before, "refused models change nothing");
}

#[test]
fn finished_tasks_are_kept_in_the_order_they_finished() {
    let mut w = World::new();
    w.executor(4000, &[]);
    let a = w.submit(spec("a", 100, 10));
    let b = w.submit(spec("b", 100, 10));
    w.schedule();
    w.report(b, finished(AttemptOutcome::Succeeded)).unwrap();
    w.report(a, finished(AttemptOutcome::Failed)).unwrap();
    let order: Vec<(u64, TaskId)> = w.sm.finished_after(0).map(|(seq, t)| (seq, t.id)).collect();
    assert_eq!(order, vec![(1, b), (2, a)]);
    assert_eq!(w.sm.finished_after(1).count(), 1, "resumable from a sequence number");
    assert_eq!(w.task(b).peak_memory_bytes, Some(1 << 20), "the executor's measured peak is kept");
}
