//! Long-running agents in the state machine: instances started, restarted by policy with
//! backoff, replaced after their executor is lost, scaled, stopped, and rolled onto a new spec one
//! instance at a time (the old one runs until the new one starts). Invariants are checked after
//! every command.

#![allow(clippy::unwrap_used)]

use colony_core::{
    AgentKey, AgentSpec, AgentState, AttemptOutcome, AttemptResult, AttemptStatus, Command,
    CommandError, ExecutorId, ExecutorSpec, FencingToken, HealthCheck, JoinKind, Outcome,
    Placement, Probe, Proposal, Resources, RestartPolicy, RunSpec, StateMachine, TaskId, TaskSpec,
    TaskState,
};
use std::collections::{BTreeMap, BTreeSet};

const HOUR: u64 = 3_600_000;

fn template(program: &str) -> TaskSpec {
    TaskSpec {
        name: String::new(),
        namespace: String::new(),
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
        dependencies: BTreeSet::new(),
        run: RunSpec::Process { program: program.to_owned(), args: vec![], env: BTreeMap::new() },
        idempotency_key: None,
        placement: Default::default(),
        memory_auto: false,
    }
}

fn agent(replicas: u32, restart: RestartPolicy) -> AgentSpec {
    AgentSpec {
        name: "researcher".to_owned(),
        namespace: "default".to_owned(),
        task: template("/usr/bin/researcher"),
        replicas,
        restart,
        backoff_ms_base: 1_000,
        backoff_ms_max: 8_000,
        port: false,
        health: None,
    }
}

fn key() -> AgentKey {
    AgentKey { namespace: "default".to_owned(), name: "researcher".to_owned() }
}

struct Cluster {
    sm: StateMachine,
    now: u64,
}

impl Cluster {
    fn new() -> Cluster {
        let mut c = Cluster { sm: StateMachine::new(), now: 1_000_000 };
        for id in 1..=2u64 {
            let hash = [id as u8; 32];
            let expires = c.now + 10 * HOUR;
            c.apply(Command::CreateJoinToken {
                secret_hash: hash,
                expires_unix_ms: expires,
                kind: JoinKind::Executor,
            })
            .unwrap();
            c.apply(Command::AdmitExecutor {
                secret_hash: hash,
                expected_id: ExecutorId(id),
                name: format!("e{id}"),
                cert_fingerprint: hash,
            })
            .unwrap();
            let spec = ExecutorSpec {
                name: format!("e{id}"),
                capacity: Resources {
                    cpu_millis: 64_000,
                    memory_bytes: 64 << 30,
                    gpus: 0,
                    custom: BTreeMap::new(),
                },
                labels: BTreeMap::new(),
                capabilities: BTreeSet::new(),
            };
            c.apply(Command::RegisterExecutor { id: ExecutorId(id), spec }).unwrap();
        }
        c
    }

    fn apply(&mut self, command: Command) -> Result<Outcome, CommandError> {
        let proposal = Proposal { now_unix_ms: self.now, commands: vec![command] };
        let result = self.sm.apply_proposal(&proposal).remove(0);
        self.sm.check_invariants().unwrap();
        result
    }

    fn tasks(&self) -> Vec<TaskId> {
        let agent = self.sm.get_agent(&key()).unwrap();
        agent.instances.values().map(|i| i.task).collect()
    }

    /// Places `task` on `executor` and reports it started; its token.
    fn start(&mut self, task: TaskId, executor: u64) -> (FencingToken, Outcome) {
        let placement =
            Placement { task, executor: ExecutorId(executor), evict: vec![], memory_bytes: None };
        let token = match self
            .apply(Command::PlaceTasks { placements: vec![placement], unschedulable: vec![] })
            .unwrap()
        {
            Outcome::Placed { assigned, .. } => assigned[0].token,
            other => panic!("{other:?}"),
        };
        let outcome = self
            .apply(Command::Report {
                executor: ExecutorId(executor),
                task,
                token,
                status: AttemptStatus::Started,
            })
            .unwrap();
        (token, outcome)
    }

    fn exit(&mut self, task: TaskId, executor: u64, token: FencingToken, code: i32) {
        let result = AttemptResult {
            outcome: if code == 0 { AttemptOutcome::Succeeded } else { AttemptOutcome::Failed },
            exit_code: Some(code),
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            message: String::new(),
            peak_memory_bytes: None,
        };
        self.apply(Command::Report {
            executor: ExecutorId(executor),
            task,
            token,
            status: AttemptStatus::Finished(result),
        })
        .unwrap();
    }

    fn health(
        &mut self,
        task: TaskId,
        executor: u64,
        token: FencingToken,
        healthy: bool,
    ) -> Result<Outcome, CommandError> {
        self.apply(Command::Report {
            executor: ExecutorId(executor),
            task,
            token,
            status: AttemptStatus::Health { healthy, address: format!("10.0.0.{executor}:20000") },
        })
    }

    fn registered(&self, task: TaskId) -> Option<String> {
        self.sm.agent_endpoint(task).map(|e| e.address.clone())
    }

    fn state(&self, task: TaskId) -> TaskState {
        self.sm.get_task(task).unwrap().state
    }
}

#[test]
fn instances_start_named_with_the_agent_in_their_environment() {
    let mut c = Cluster::new();
    let Outcome::AgentRun { agent, created, .. } =
        c.apply(Command::RunAgent(agent(3, RestartPolicy::Always))).unwrap()
    else {
        panic!()
    };
    assert!(created);
    assert_eq!(agent.instances.len(), 3);
    for (index, task) in c.tasks().into_iter().enumerate() {
        let task = c.sm.get_task(task).unwrap();
        assert_eq!(task.spec.name, format!("researcher-{index}"));
        assert_eq!(task.state, TaskState::Pending);
        let RunSpec::Process { env, .. } = &task.spec.run else { panic!() };
        assert_eq!(env["COLONY_AGENT"], "researcher");
        assert_eq!(env["COLONY_AGENT_INSTANCE"], index.to_string());
    }
}

#[test]
fn an_instance_that_exits_is_restarted_with_growing_backoff_that_resets_after_a_minute() {
    let mut c = Cluster::new();
    c.apply(Command::RunAgent(agent(1, RestartPolicy::Always))).unwrap();
    let mut waits = Vec::new();
    for _ in 0..5 {
        let task = c.tasks()[0];
        let not_before = c.sm.get_task(task).unwrap().not_before_unix_ms;
        c.now = c.now.max(not_before);
        let (token, _) = c.start(task, 1);
        c.now += 10;
        c.exit(task, 1, token, 0);
        let next = c.sm.get_task(c.tasks()[0]).unwrap();
        assert_ne!(next.id, task, "an exited instance gets a new task");
        waits.push(next.not_before_unix_ms - c.now);
    }
    assert_eq!(waits, [1_000, 2_000, 4_000, 8_000, 8_000]);
    // An instance that ran a minute starts over at the first backoff.
    let task = c.tasks()[0];
    c.now += 8_000;
    let (token, _) = c.start(task, 1);
    c.now += 60_000;
    c.exit(task, 1, token, 1);
    let next = c.sm.get_task(c.tasks()[0]).unwrap();
    assert_eq!(next.not_before_unix_ms - c.now, 1_000);
    assert_eq!(c.sm.get_agent(&key()).unwrap().instances[&0].restarts, 6);
}

#[test]
fn on_failure_leaves_a_succeeded_instance_down_and_restarts_a_failed_one() {
    let mut c = Cluster::new();
    c.apply(Command::RunAgent(agent(2, RestartPolicy::OnFailure))).unwrap();
    let [a, b] = c.tasks()[..] else { panic!() };
    let (ta, _) = c.start(a, 1);
    let (tb, _) = c.start(b, 2);
    c.exit(a, 1, ta, 0);
    c.exit(b, 2, tb, 3);
    let agent = c.sm.get_agent(&key()).unwrap();
    assert_eq!(agent.instances.keys().copied().collect::<Vec<_>>(), [1]);
    assert!(agent.reason.as_deref().unwrap().contains("instance 0 succeeded"));
    assert_ne!(agent.instances[&1].task, b);
}

#[test]
fn an_instance_on_a_lost_executor_is_replaced() {
    let mut c = Cluster::new();
    c.apply(Command::RunAgent(agent(1, RestartPolicy::OnFailure))).unwrap();
    let task = c.tasks()[0];
    c.start(task, 1);
    c.apply(Command::MarkExecutorDown { id: ExecutorId(1), reason: "silent".to_owned() }).unwrap();
    assert!(c.state(task).is_finished());
    let next = c.tasks()[0];
    assert_ne!(next, task);
    assert_eq!(c.state(next), TaskState::Pending);
    c.now += 1_000;
    c.start(next, 2);
    assert_eq!(c.state(next), TaskState::Running);
}

#[test]
fn scaling_starts_and_stops_instances_and_stop_ends_them_all() {
    let mut c = Cluster::new();
    c.apply(Command::RunAgent(agent(3, RestartPolicy::Always))).unwrap();
    let tasks = c.tasks();
    c.start(tasks[2], 1);
    let Outcome::AgentScaled { agent: scaled, stopped } =
        c.apply(Command::ScaleAgent { agent: key(), replicas: 1 }).unwrap()
    else {
        panic!()
    };
    assert_eq!(scaled.instances.len(), 1);
    assert_eq!(stopped, vec![tasks[2]], "the running instance beyond is stopped at its executor");
    assert_eq!(c.state(tasks[1]), TaskState::Cancelled);
    c.apply(Command::ScaleAgent { agent: key(), replicas: 4 }).unwrap();
    assert_eq!(c.tasks().len(), 4);
    let Outcome::AgentStopped { agent: stopped_agent, .. } =
        c.apply(Command::StopAgent { agent: key() }).unwrap()
    else {
        panic!()
    };
    assert_eq!(stopped_agent.state, AgentState::Stopped);
    assert!(c.sm.get_task(tasks[0]).unwrap().state.is_finished());
    // Nothing restarts a stopped agent's instances; scaling it is refused; running it starts it.
    assert!(c.apply(Command::ScaleAgent { agent: key(), replicas: 2 }).is_err());
    let Outcome::AgentRun { agent: again, created, .. } =
        c.apply(Command::RunAgent(agent(2, RestartPolicy::Always))).unwrap()
    else {
        panic!()
    };
    assert!(!created);
    assert_eq!((again.state, again.instances.len()), (AgentState::Running, 2));
}

#[test]
fn a_new_spec_rolls_one_instance_at_a_time_old_running_until_new_starts() {
    let mut c = Cluster::new();
    c.apply(Command::RunAgent(agent(2, RestartPolicy::Always))).unwrap();
    let old = c.tasks();
    c.start(old[0], 1);
    c.start(old[1], 2);
    let v2 =
        AgentSpec { task: template("/usr/bin/researcher-v2"), ..agent(2, RestartPolicy::Always) };
    let Outcome::AgentRun { agent, stopped, .. } = c.apply(Command::RunAgent(v2.clone())).unwrap()
    else {
        panic!()
    };
    assert!(stopped.is_empty());
    assert_eq!(agent.version, 2);
    let new0 = agent.instances[&0].task;
    assert_eq!(agent.instances[&0].replacing, Some(old[0]));
    assert_eq!(agent.instances[&1].task, old[1], "one instance at a time");
    assert_eq!(c.state(old[0]), TaskState::Running);
    // The new instance starts: the old one stops (its executor is told), the next one rolls.
    let (_, outcome) = c.start(new0, 2);
    let Outcome::Reported { stopped, .. } = outcome else { panic!() };
    assert_eq!(stopped, vec![old[0]]);
    assert_eq!(c.state(old[0]), TaskState::Cancelled);
    let agent = c.sm.get_agent(&key()).unwrap().clone();
    let new1 = agent.instances[&1].task;
    assert_eq!(agent.instances[&1].replacing, Some(old[1]));
    let (_, outcome) = c.start(new1, 1);
    let Outcome::Reported { stopped, .. } = outcome else { panic!() };
    assert_eq!(stopped, vec![old[1]]);
    let agent = c.sm.get_agent(&key()).unwrap();
    assert!(agent.instances.values().all(|i| i.version == 2 && i.replacing.is_none()));
    // The same spec again changes nothing.
    let Outcome::AgentRun { agent, .. } = c.apply(Command::RunAgent(v2)).unwrap() else { panic!() };
    assert_eq!(agent.version, 2);
}

#[test]
fn bad_agents_are_refused_and_change_nothing() {
    let mut c = Cluster::new();
    c.apply(Command::RunAgent(agent(1, RestartPolicy::Always))).unwrap();
    let before = c.sm.clone();
    let bad = [
        Command::RunAgent(agent(0, RestartPolicy::Always)),
        Command::RunAgent(AgentSpec { name: "bad name".into(), ..agent(1, RestartPolicy::Always) }),
        Command::RunAgent(AgentSpec {
            task: TaskSpec { timeout_ms: Some(5), ..template("/x") },
            ..agent(1, RestartPolicy::Always)
        }),
        Command::RunAgent(AgentSpec { backoff_ms_base: 0, ..agent(1, RestartPolicy::Always) }),
        Command::ScaleAgent { agent: key(), replicas: 0 },
        Command::ScaleAgent {
            agent: AgentKey { namespace: "default".into(), name: "nobody".into() },
            replicas: 1,
        },
        Command::StopAgent {
            agent: AgentKey { namespace: "default".into(), name: "nobody".into() },
        },
    ];
    for command in bad {
        let error = c.apply(command.clone()).expect_err(&format!("{command:?} was accepted"));
        assert!(!error.to_string().is_empty());
        assert_eq!(c.sm, before, "{command:?} changed the state");
    }
}

fn checked(replicas: u32) -> AgentSpec {
    AgentSpec {
        port: true,
        health: Some(HealthCheck {
            probe: Probe::Http { path: "/healthz".to_owned() },
            interval_ms: 1_000,
            timeout_ms: 500,
            failures: 2,
        }),
        ..agent(replicas, RestartPolicy::Always)
    }
}

#[test]
fn healthy_instances_are_registered_and_leave_when_unhealthy_ended_or_lost() {
    let mut c = Cluster::new();
    c.apply(Command::RunAgent(checked(2))).unwrap();
    let tasks = c.tasks();
    let placement =
        Placement { task: tasks[0], executor: ExecutorId(1), evict: vec![], memory_bytes: None };
    let Outcome::Placed { assigned, .. } = c
        .apply(Command::PlaceTasks { placements: vec![placement], unschedulable: vec![] })
        .unwrap()
    else {
        panic!()
    };
    // One executor's reports commit concurrently: health overtaking the start implies it.
    let t0 = assigned[0].token;
    c.health(tasks[0], 1, t0, false).unwrap();
    assert_eq!(c.state(tasks[0]), TaskState::Running);
    c.apply(Command::Report {
        executor: ExecutorId(1),
        task: tasks[0],
        token: t0,
        status: AttemptStatus::Started,
    })
    .unwrap();
    let (t1, _) = c.start(tasks[1], 2);
    assert_eq!(c.registered(tasks[0]), None, "running is not healthy when there is a check");
    c.health(tasks[0], 1, t0, true).unwrap();
    c.health(tasks[1], 2, t1, true).unwrap();
    assert_eq!(c.registered(tasks[0]).as_deref(), Some("10.0.0.1:20000"));
    assert_eq!(c.registered(tasks[1]).as_deref(), Some("10.0.0.2:20000"));
    // An address that is no address is refused and changes nothing.
    let before = c.sm.clone();
    for address in ["", "10.0.0.1 :80", "\u{7f}", &"a".repeat(300)] {
        let bad = c.apply(Command::Report {
            executor: ExecutorId(1),
            task: tasks[0],
            token: t0,
            status: AttemptStatus::Health { healthy: true, address: address.to_owned() },
        });
        assert!(matches!(bad, Err(CommandError::InvalidAgent(_))), "{address:?}: {bad:?}");
    }
    assert_eq!(c.sm, before);
    // A stale token's word is refused.
    assert!(c.health(tasks[0], 1, FencingToken(t0.0 + 100), false).is_err());
    // Unhealthy: out of the registry, still running.
    c.health(tasks[0], 1, t0, false).unwrap();
    assert_eq!(c.registered(tasks[0]), None);
    assert_eq!(c.state(tasks[0]), TaskState::Running);
    c.health(tasks[0], 1, t0, true).unwrap();
    // Its executor lost: the task is lost, the entry goes with it, a replacement is pending.
    c.apply(Command::MarkExecutorDown { id: ExecutorId(1), reason: "silent".into() }).unwrap();
    assert_eq!(c.registered(tasks[0]), None);
    assert!(c.state(tasks[0]).is_finished());
    // Stopped: nothing left registered.
    c.apply(Command::StopAgent { agent: key() }).unwrap();
    assert_eq!(c.registered(tasks[1]), None);
}

#[test]
fn with_a_health_check_a_roll_waits_for_the_new_instance_to_be_healthy() {
    let mut c = Cluster::new();
    c.apply(Command::RunAgent(checked(1))).unwrap();
    let old = c.tasks()[0];
    let (old_token, _) = c.start(old, 1);
    c.health(old, 1, old_token, true).unwrap();
    let v2 = AgentSpec { task: template("/usr/bin/researcher-v2"), ..checked(1) };
    let Outcome::AgentRun { agent, .. } = c.apply(Command::RunAgent(v2)).unwrap() else { panic!() };
    let new = agent.instances[&0].task;
    let (new_token, outcome) = c.start(new, 2);
    let Outcome::Reported { stopped, .. } = outcome else { panic!() };
    assert!(stopped.is_empty(), "started is not healthy: the old instance serves on");
    assert_eq!(c.state(old), TaskState::Running);
    assert_eq!(c.registered(old).as_deref(), Some("10.0.0.1:20000"));
    // Healthy: now the old one stops and leaves the registry.
    let Outcome::Reported { stopped, .. } = c.health(new, 2, new_token, true).unwrap() else {
        panic!()
    };
    assert_eq!(stopped, vec![old]);
    assert_eq!(c.state(old), TaskState::Cancelled);
    assert_eq!(c.registered(old), None);
    assert_eq!(c.registered(new).as_deref(), Some("10.0.0.2:20000"));
    assert_eq!(c.sm.get_agent(&key()).unwrap().instances[&0].replacing, None);
}

#[test]
fn bad_health_checks_are_refused_and_change_nothing() {
    let mut c = Cluster::new();
    let before = c.sm.clone();
    let health = |probe: Probe, interval_ms: u64, timeout_ms: u64, failures: u32| {
        Some(HealthCheck { probe, interval_ms, timeout_ms, failures })
    };
    let http = || Probe::Http { path: "/healthz".into() };
    let bad = [
        // An HTTP check without a port.
        AgentSpec { port: false, ..checked(1) },
        AgentSpec { health: health(http(), 10, 5, 1), ..checked(1) },
        AgentSpec { health: health(http(), 1_000, 2_000, 1), ..checked(1) },
        AgentSpec { health: health(http(), 1_000, 500, 0), ..checked(1) },
        AgentSpec {
            health: health(Probe::Http { path: "healthz".into() }, 1_000, 500, 1),
            ..checked(1)
        },
        AgentSpec {
            health: health(Probe::Command { program: String::new(), args: vec![] }, 1_000, 500, 1),
            ..checked(1)
        },
    ];
    for spec in bad {
        let error = c.apply(Command::RunAgent(spec.clone())).expect_err(&format!("{spec:?}"));
        assert!(matches!(error, CommandError::InvalidAgent(_)), "{error:?}");
    }
    assert_eq!(c.sm, before);
    // Health from a task that is not an instance is refused.
    let mut plain = template("/bin/true");
    plain.name = "plain".into();
    plain.namespace = "default".into();
    let Outcome::Submitted { task, .. } = c.apply(Command::SubmitTask(plain)).unwrap() else {
        panic!()
    };
    let id = task.id;
    let placement =
        Placement { task: id, executor: ExecutorId(1), evict: vec![], memory_bytes: None };
    let Outcome::Placed { assigned, .. } = c
        .apply(Command::PlaceTasks { placements: vec![placement], unschedulable: vec![] })
        .unwrap()
    else {
        panic!()
    };
    let token = assigned[0].token;
    c.apply(Command::Report {
        executor: ExecutorId(1),
        task: id,
        token,
        status: AttemptStatus::Started,
    })
    .unwrap();
    assert!(c.health(id, 1, token, true).is_err());
    assert_eq!(c.registered(id), None);
}

#[test]
fn a_newer_spec_supersedes_a_roll_stuck_on_an_unhealthy_version() {
    let mut c = Cluster::new();
    c.apply(Command::RunAgent(checked(1))).unwrap();
    let old = c.tasks()[0];
    let (old_token, _) = c.start(old, 1);
    c.health(old, 1, old_token, true).unwrap();
    // Version 2 starts but never turns healthy; it crashes once, and its restart still waits
    // for health with the old task serving.
    let v2 = AgentSpec { task: template("/usr/bin/broken"), ..checked(1) };
    c.apply(Command::RunAgent(v2)).unwrap();
    let broken = c.tasks()[0];
    let (broken_token, _) = c.start(broken, 2);
    c.exit(broken, 2, broken_token, 1);
    let instance = c.sm.get_agent(&key()).unwrap().instances[&0].clone();
    assert_eq!(instance.replacing, Some(old), "a crash of the new version dropped the old one");
    assert_eq!(c.state(old), TaskState::Running);
    let restarted = instance.task;
    c.now += 60_000;
    let (restarted_token, _) = c.start(restarted, 2);
    // Version 3 replaces the unhealthy version-2 task at once, still keeping the old one.
    let v3 = AgentSpec { task: template("/usr/bin/fixed"), ..checked(1) };
    let Outcome::AgentRun { agent, stopped, .. } = c.apply(Command::RunAgent(v3)).unwrap() else {
        panic!()
    };
    assert_eq!(stopped, vec![restarted], "the superseded replacement is stopped at its executor");
    let instance = &agent.instances[&0];
    assert_eq!((instance.version, instance.replacing), (3, Some(old)));
    assert_eq!(c.state(old), TaskState::Running);
    assert!(c.health(restarted, 2, restarted_token, true).is_err(), "a stopped task's word counts");
    let fixed = instance.task;
    let (fixed_token, _) = c.start(fixed, 2);
    let Outcome::Reported { stopped, .. } = c.health(fixed, 2, fixed_token, true).unwrap() else {
        panic!()
    };
    assert_eq!(stopped, vec![old]);
    assert_eq!(c.sm.get_agent(&key()).unwrap().instances[&0].replacing, None);
}

#[test]
fn an_attempts_messaging_is_fenced_by_its_token_and_namespace() {
    use colony_core::{PublishSpec, TopicKey};
    let mut c = Cluster::new();
    c.apply(Command::RunAgent(agent(1, RestartPolicy::Always))).unwrap();
    let task = c.tasks()[0];
    let (token, _) = c.start(task, 1);
    let publish = |namespace: &str, payload: &[u8]| {
        Box::new(Command::Publish(PublishSpec {
            topic: TopicKey { namespace: namespace.to_owned(), name: "topics/t".to_owned() },
            priority: 0,
            payload: payload.to_vec(),
            idempotency_key: None,
            reply_to: None,
            correlation_id: None,
        }))
    };
    c.apply(Command::AsAttempt { task, token, command: publish("default", b"live") }).unwrap();
    let before = c.sm.clone();
    let refused = [
        // Another namespace than its task's.
        Command::AsAttempt { task, token, command: publish("other", b"x") },
        // Not a messaging command.
        Command::AsAttempt { task, token, command: Box::new(Command::StopAgent { agent: key() }) },
        // A token that is not the attempt's.
        Command::AsAttempt {
            task,
            token: FencingToken(token.0 + 1),
            command: publish("default", b"x"),
        },
    ];
    for command in refused {
        assert!(c.apply(command.clone()).is_err(), "{command:?}");
    }
    assert_eq!(c.sm, before);
    // Superseded: its executor is lost and the instance replaced; the old token is refused.
    c.apply(Command::MarkExecutorDown { id: ExecutorId(1), reason: "silent".into() }).unwrap();
    let stale = c.apply(Command::AsAttempt { task, token, command: publish("default", b"stale") });
    assert!(matches!(stale, Err(CommandError::StaleAttempt { .. })), "{stale:?}");
}
