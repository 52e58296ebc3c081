#![allow(clippy::unwrap_used)]

use super::*;
use crate::state_machine::{Command, Outcome, Proposal};
use crate::task::{RunSpec, TaskState};

/// A state machine driven the way the leader drives it, with one `Blocked` across rounds.
struct World {
    sm: StateMachine,
    now: u64,
    config: PlanConfig,
    blocked: Blocked,
}

fn resources(cpu_millis: u64) -> Resources {
    Resources { cpu_millis, memory_bytes: 64 << 20, gpus: 0, custom: BTreeMap::new() }
}

fn spec(name: &str, cpu_millis: u64, priority: u16) -> TaskSpec {
    TaskSpec {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        labels: BTreeMap::new(),
        capabilities: BTreeSet::new(),
        resources: resources(cpu_millis),
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

fn needing(name: &str, cpu_millis: u64, priority: u16, capability: &str) -> TaskSpec {
    let mut spec = spec(name, cpu_millis, priority);
    spec.capabilities.insert(capability.to_owned());
    spec
}

impl World {
    fn new() -> World {
        World {
            sm: StateMachine::new(),
            now: 1_000_000,
            config: PlanConfig::default(),
            blocked: Blocked::default(),
        }
    }

    fn apply_all(&mut self, commands: Vec<Command>) -> Vec<Outcome> {
        let results = self.sm.apply_proposal(&Proposal { now_unix_ms: self.now, commands });
        self.sm.check_invariants().unwrap();
        results.into_iter().map(Result::unwrap).collect()
    }

    fn apply(&mut self, command: Command) -> Outcome {
        self.apply_all(vec![command]).remove(0)
    }

    fn executor(&mut self, cpu_millis: u64, capabilities: &[&str]) -> ExecutorId {
        let id = self.sm.next_executor_id();
        self.apply(Command::CreateJoinToken {
            secret_hash: [1; 32],
            expires_unix_ms: self.now + 60_000,
            kind: crate::JoinKind::Executor,
        });
        self.apply(Command::AdmitExecutor {
            secret_hash: [1; 32],
            expected_id: id,
            name: format!("e{id}"),
            cert_fingerprint: [0; 32],
        });
        let spec = ExecutorSpec {
            name: format!("e{id}"),
            capacity: Resources { memory_bytes: 4 << 30, ..resources(cpu_millis) },
            labels: BTreeMap::new(),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
        };
        self.apply(Command::RegisterExecutor { id, spec });
        id
    }

    fn submit(&mut self, spec: TaskSpec) -> TaskId {
        match self.apply(Command::SubmitTask(spec)) {
            Outcome::Submitted { task, .. } => task.id,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn submit_many(&mut self, count: usize, spec: &TaskSpec) -> Vec<TaskId> {
        (0..count).map(|_| self.submit(spec.clone())).collect()
    }

    /// One round with memory, checked against a round without it, then applied.
    fn schedule(&mut self) -> Plan {
        let fresh = plan(&self.sm, self.now, &self.config);
        let plan = plan_remembering(&self.sm, self.now, &self.config, &NoModel, &mut self.blocked);
        assert_eq!(plan, fresh, "remembering blocked shapes changed the plan");
        self.apply(Command::PlaceTasks {
            placements: plan.placements.clone(),
            unschedulable: plan.unschedulable.clone(),
        });
        plan
    }

    fn state(&self, id: TaskId) -> TaskState {
        self.sm.get_task(id).unwrap().state
    }

    fn cancel(&mut self, id: TaskId) {
        self.apply(Command::CancelTask { id, reason: String::new() });
    }
}

fn placed(plan: &Plan) -> Vec<TaskId> {
    plan.placements.iter().map(|p| p.task).collect()
}

#[test]
fn tasks_no_executor_could_run_do_not_hold_back_one_that_fits() {
    let mut w = World::new();
    w.executor(4000, &["shell"]);
    let stuck = w.submit_many(600, &needing("stuck", 100, 1000, "gpu"));
    let low = w.submit(spec("low", 100, 0));
    let plan = plan(&w.sm, w.now, &w.config);
    assert_eq!(placed(&plan), vec![low]);
    let reason = "unschedulable: no executor has capability gpu".to_owned();
    let expected: Vec<(TaskId, String)> = stuck.iter().map(|&id| (id, reason.clone())).collect();
    assert_eq!(plan.unschedulable, expected);
    w.apply(Command::PlaceTasks { placements: plan.placements, unschedulable: plan.unschedulable });
    assert_eq!(w.state(low), TaskState::Assigned);
    assert!(stuck
        .iter()
        .all(|&id| w.sm.get_task(id).unwrap().reason.as_deref() == Some(reason.as_str())));
}

#[test]
fn tasks_that_only_lack_free_room_do_not_hold_back_a_small_one() {
    let mut w = World::new();
    w.executor(2000, &[]);
    let big = w.submit(spec("big", 1500, 1000));
    assert_eq!(placed(&w.schedule()), vec![big]);
    // They fit the executor's capacity but not what `big` leaves, and `big` is not
    // preemptible (same priority).
    let waiting = w.submit_many(600, &spec("waiting", 1000, 1000));
    let small = w.submit(spec("small", 500, 0));
    let plan = w.schedule();
    assert_eq!(placed(&plan), vec![small]);
    assert!(plan.unschedulable.is_empty(), "no room is not unschedulable");
    assert!(waiting.iter().all(|&id| w.state(id) == TaskState::Pending));
    assert_eq!(w.blocked.skipped(), 599, "one task of the shape is judged, the rest skipped");
}

#[test]
fn tasks_no_executor_could_run_are_not_misses() {
    let mut w = World::new();
    w.executor(4000, &[]);
    w.config.misses_in_a_row_max = 1;
    w.submit(needing("stuck", 100, 1000, "gpu"));
    w.submit(needing("stuck-too", 100, 900, "tpu"));
    let low = w.submit(spec("low", 100, 0));
    assert_eq!(placed(&w.schedule()), vec![low]);
}

#[test]
fn a_blocked_shape_is_skipped_until_room_is_freed() {
    let mut w = World::new();
    w.executor(2000, &[]);
    let filler = w.submit(spec("filler", 2000, 50));
    w.schedule();
    // Below the preemption gap: a shape that waits only for free room.
    let waiting = w.submit_many(3, &spec("waiting", 1000, 50));
    let first = w.schedule();
    assert!(first.is_empty());
    assert_eq!((w.blocked.len(), w.blocked.skipped()), (1, 2));
    let again = w.schedule();
    assert_eq!(again, first);
    assert_eq!((w.blocked.len(), w.blocked.skipped()), (1, 3), "nothing changed: all skipped");
    w.cancel(filler);
    let freed = w.schedule();
    assert_eq!(placed(&freed), waiting[..2].to_vec());
    assert_eq!(w.blocked.skipped(), 0, "more free room forgets the shape");
    assert_eq!(w.blocked.len(), 1, "the third found no room again");
    w.cancel(waiting[0]);
    assert_eq!(placed(&w.schedule()), vec![waiting[2]]);
    assert!(w.blocked.is_empty());
}

#[test]
fn a_blocked_shape_is_placed_once_a_new_executor_registers() {
    let mut w = World::new();
    w.config.preemption_priority_gap_min = 0;
    w.executor(1000, &[]);
    w.submit(spec("filler", 1000, 1000));
    w.schedule();
    let waiting = w.submit(spec("waiting", 1000, 1000));
    let stuck = w.submit(needing("stuck", 100, 1000, "gpu"));
    w.schedule();
    w.schedule();
    assert_eq!((w.blocked.len(), w.blocked.skipped()), (2, 2));
    assert_eq!(w.state(waiting), TaskState::Pending);
    w.executor(1000, &[]);
    assert_eq!(placed(&w.schedule()), vec![waiting]);
    assert_eq!(w.blocked.len(), 1, "still no gpu");
    w.executor(1000, &["gpu"]);
    assert_eq!(placed(&w.schedule()), vec![stuck]);
    assert!(w.blocked.is_empty());
}

#[test]
fn a_never_fitting_shape_gives_every_task_its_reason_once() {
    let mut w = World::new();
    w.executor(1000, &[]);
    let stuck = w.submit_many(3, &needing("stuck", 100, 10, "gpu"));
    let reason = "unschedulable: no executor has capability gpu".to_owned();
    let first = w.schedule();
    assert_eq!(first.unschedulable.len(), 3);
    assert_eq!(w.blocked.skipped(), 2);
    assert!(w.schedule().is_empty(), "unchanged reasons are not proposed again");
    assert_eq!(w.blocked.skipped(), 3);
    let late = w.submit(needing("late", 100, 10, "gpu"));
    let plan = w.schedule();
    assert_eq!(plan.unschedulable, vec![(late, reason)], "a skipped task still gets it");
    assert_eq!(w.blocked.skipped(), 4);
    assert!(stuck.iter().all(|&id| w.state(id) == TaskState::Pending));
}

#[test]
fn a_shape_that_could_preempt_is_judged_again_every_round() {
    let mut w = World::new();
    let e = w.executor(2000, &[]);
    let owner = w.submit(spec("owner", 2000, 1000));
    w.schedule();
    let high = w.submit(spec("high", 2000, 500));
    assert!(w.schedule().placements.is_empty(), "`owner` is not preemptible");
    assert!(w.blocked.is_empty(), "a shape that may preempt is not carried over");
    // Another leader's plan lands as `owner` finishes: free room is unchanged, but there is
    // now a victim.
    let low = w.submit(spec("low", 2000, 0));
    let foreign = Placement { task: low, executor: e, evict: Vec::new(), memory_bytes: None };
    w.apply_all(vec![
        Command::CancelTask { id: owner, reason: String::new() },
        Command::PlaceTasks { placements: vec![foreign], unschedulable: Vec::new() },
    ]);
    let plan = w.schedule();
    assert_eq!(placed(&plan), vec![high]);
    assert_eq!(plan.placements[0].evict, vec![low]);
}

#[test]
fn an_eviction_that_gives_back_more_than_it_takes_forgets_shapes_within_the_round() {
    let mut w = World::new();
    let e = w.executor(2000, &[]);
    let mut with_gpus = w.sm.get_executor(e).unwrap().spec.clone();
    with_gpus.capacity.gpus = 2;
    w.apply(Command::RegisterExecutor { id: e, spec: with_gpus });
    let mut victim = spec("victim", 1000, 0);
    victim.resources.gpus = 2;
    let victim = w.submit(victim);
    w.submit(spec("keeper", 1000, 1000));
    assert_eq!(w.schedule().placements.len(), 2);
    // Below the gap, so it cannot evict `victim` itself, and carried over.
    let mut gpu = spec("gpu", 0, 50);
    gpu.resources.gpus = 1;
    let gpu = w.submit(gpu);
    assert!(w.schedule().is_empty());
    assert_eq!(w.blocked.len(), 1);
    // Takes cpu only, and evicting `victim` gives back both gpus as well.
    let preemptor = w.submit(spec("preemptor", 1000, 500));
    let plan = w.schedule();
    assert_eq!(placed(&plan), vec![preemptor, gpu]);
    assert_eq!(plan.placements[0].evict, vec![victim]);
}

#[test]
fn a_shape_is_carried_over_unless_the_config_lets_it_preempt() {
    let mut w = World::new();
    w.config.preemption_priority_gap_min = 0;
    w.executor(1000, &[]);
    w.submit(spec("filler", 1000, 0));
    w.schedule();
    w.submit(spec("high", 1000, 500));
    w.schedule();
    assert_eq!(w.blocked.len(), 1);
    w.config.preemption_priority_gap_min = 100;
    let plan = w.schedule();
    assert_eq!(plan.placements.len(), 1, "preempts once the config allows it");
    assert_eq!(w.blocked.skipped(), 0);
}

/// Remembering must never change a plan: across seeded random histories (submissions,
/// cancels, executors joining, leaving and changing, other leaders' placements), every
/// round's plan equals a fresh round's (`World::schedule` checks).
#[test]
fn remembering_never_changes_a_plan() {
    for seed in 1..=40u64 {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut w = World::new();
        w.config.preemption_priority_gap_min = [0, 100][next(2) as usize];
        let mut executors = vec![w.executor(2000, &[])];
        let mut tasks: Vec<TaskId> = Vec::new();
        for _ in 0..150 {
            match next(10) {
                0..=3 => {
                    let cpu = [500, 1000, 2000, 3000][next(4) as usize];
                    let priority = [0, 50, 500, 1000][next(4) as usize];
                    let mut task = spec("t", cpu, priority);
                    if next(4) == 0 {
                        task.capabilities.insert("gpu".to_owned());
                    }
                    tasks.push(w.submit(task));
                }
                4 if !tasks.is_empty() => {
                    let id = tasks[next(tasks.len() as u64) as usize];
                    if !w.state(id).is_finished() {
                        w.cancel(id);
                    }
                }
                5 if executors.len() < 4 => {
                    let caps: &[&str] = if next(2) == 0 { &["gpu"] } else { &[] };
                    executors.push(w.executor(1000 + 1000 * next(3), caps));
                }
                6 => {
                    let e = executors[next(executors.len() as u64) as usize];
                    let executor = w.sm.get_executor(e).unwrap();
                    let command = match executor.state {
                        ExecutorState::Up => {
                            Command::MarkExecutorDown { id: e, reason: "test".to_owned() }
                        }
                        _ => Command::RegisterExecutor { id: e, spec: executor.spec.clone() },
                    };
                    w.apply(command);
                }
                7 if !tasks.is_empty() => {
                    let task = tasks[next(tasks.len() as u64) as usize];
                    let executor = executors[next(executors.len() as u64) as usize];
                    let foreign =
                        Placement { task, executor, evict: Vec::new(), memory_bytes: None };
                    w.apply(Command::PlaceTasks {
                        placements: vec![foreign],
                        unschedulable: Vec::new(),
                    });
                }
                _ => {
                    w.schedule();
                }
            }
        }
    }
}

#[test]
fn a_hash_collision_never_skips_another_shape() {
    let mut blocked = Blocked::default();
    let request = resources(100);
    let gpu = needing("a", 100, 10, "gpu");
    blocked.insert(7, request.clone(), &gpu, Verdict::NoRoom);
    assert!(blocked.find(7, &request, &gpu).is_some());
    assert!(blocked.find(7, &request, &spec("b", 100, 10)).is_none());
    assert!(blocked.find(7, &request, &needing("c", 100, 11, "gpu")).is_none());
    assert!(blocked.find(7, &resources(200), &gpu).is_none());
    assert!(blocked.find(8, &request, &gpu).is_none());
    assert_eq!(blocked.len(), 1);
}

#[test]
fn an_executor_spec_change_forgets_every_shape() {
    let mut w = World::new();
    let e = w.executor(1000, &[]);
    let stuck = w.submit(needing("stuck", 100, 10, "gpu"));
    w.schedule();
    assert_eq!(w.blocked.len(), 1);
    let mut spec = w.sm.get_executor(e).unwrap().spec.clone();
    spec.capabilities.insert("gpu".to_owned());
    w.apply(Command::RegisterExecutor { id: e, spec });
    assert_eq!(placed(&w.schedule()), vec![stuck]);
}
