//! Frozen bytes for every persisted format: a proposal holding every command, a Raft log entry as
//! the log store writes it, and a snapshot file as the state machine store writes it.
//!
//! The expected bytes live in `tests/frozen/*.hex`. A test here failing means the bytes written
//! today differ from the bytes an older build wrote: that is a format change. Bump
//! `codec::FORMAT_VERSION` and keep a reader for the old version; never just replace the file.

#![allow(clippy::unwrap_used)] // A test that cannot set up or whose check fails should panic.

use colony_core::{
    AclToken, AgentKey, AgentSpec, AgentSpecV5, AttemptOutcome, AttemptResult, AttemptStatus,
    ClusterCaRecord, Command, DeliveryRef, ExecutorId, ExecutorSpec, FencingToken, Grant,
    HealthCheck, InputSource, JoinKind, ModelMetrics, ModelVersion, Outcome, OutputRef, Placement,
    PlacementPolicy, Probe, Proposal, PublishSpec, ReceiveSpec, Resources, RestartPolicy,
    Retention, Role, RunSpec, StateMachine, StepSpec, TaskId, TaskSpec, TopicKey, TopicPolicy,
    WhenFull, WorkflowId, WorkflowSpec,
};
use colony_store::snapshot_file::SnapshotFile;
use colony_store::{codec, Applied, StoreOptions, TypeConfig};
use openraft::storage::{RaftLogStorageExt, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const FORMAT_CHANGE: &str =
    "a change here is a format change: bump codec::FORMAT_VERSION and keep a \
                             reader for the old format; do not just replace the frozen file";

/// The stores here check the state machine's invariants after each entry they apply.
const CHECKED: StoreOptions = StoreOptions { check_invariants: true };

fn frozen(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/frozen").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

/// Lowercase hex, 64 digits a line, as the frozen files are written.
fn hex(bytes: &[u8]) -> String {
    let digits: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let lines: Vec<&str> =
        digits.as_bytes().chunks(64).map(|line| std::str::from_utf8(line).unwrap()).collect();
    lines.join("\n") + "\n"
}

fn assert_frozen(name: &str, written: &[u8]) {
    let expected = frozen(name);
    assert!(
        written == expected.as_slice(),
        "{name}: the bytes written differ from the frozen bytes; {FORMAT_CHANGE}.\nwritten now:\n{}",
        hex(written)
    );
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
        priority: 10,
        deadline_unix_ms: None,
        timeout_ms: None,
        max_retries: 0,
        dependencies: BTreeSet::new(),
        run: RunSpec::Builtin { handler: "sleep".to_owned(), input: "1s".to_owned() },
        idempotency_key: None,
        placement: PlacementPolicy::BinPack,
        memory_auto: false,
    }
}

/// A spec with every optional field set, so their encodings are frozen too.
fn full_spec() -> TaskSpec {
    TaskSpec {
        labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
        capabilities: BTreeSet::from(["gpu".to_owned()]),
        resources: Resources {
            cpu_millis: 1500,
            memory_bytes: 1 << 30,
            gpus: 1,
            custom: BTreeMap::from([("fpga".to_owned(), 2)]),
        },
        priority: 900,
        deadline_unix_ms: Some(1_700_000_600_000),
        timeout_ms: Some(60_000),
        max_retries: 3,
        dependencies: BTreeSet::from([TaskId(1), TaskId(2)]),
        run: RunSpec::Process {
            program: "/bin/train".to_owned(),
            args: vec!["--epochs".to_owned(), "3".to_owned()],
            env: BTreeMap::from([("SEED".to_owned(), "7".to_owned())]),
        },
        idempotency_key: Some("train-7".to_owned()),
        placement: PlacementPolicy::Spread,
        memory_auto: true,
        ..spec("train")
    }
}

fn metrics() -> ModelMetrics {
    ModelMetrics {
        holdout_mse: 0.25,
        baseline_mse: 0.5,
        previous_mse: Some(0.375),
        train_rows: 900,
        holdout_rows: 100,
    }
}

/// Which variant a command is. The match has no wildcard on purpose: a new `Command` variant does
/// not compile here until it gets a number, and `proposal_with_every_command_is_frozen` then
/// fails until the frozen proposal carries it.
fn variant(command: &Command) -> usize {
    match command {
        Command::SubmitTask(_) => 0,
        Command::CancelTask { .. } => 1,
        Command::InitCa(_) => 2,
        Command::CreateJoinToken { .. } => 3,
        Command::AdmitExecutor { .. } => 4,
        Command::RegisterExecutor { .. } => 5,
        Command::MarkExecutorDown { .. } => 6,
        Command::DrainExecutor { .. } => 7,
        Command::PlaceTasks { .. } => 8,
        Command::Report { .. } => 9,
        Command::ExpireTasks { .. } => 10,
        Command::PublishModel { .. } => 11,
        Command::RollbackModel { .. } => 12,
        Command::EvictTasks { .. } => 13,
        Command::BootstrapAcl(_) => 14,
        Command::CreateAclToken(_) => 15,
        Command::RevokeAclToken { .. } => 16,
        Command::UndrainExecutor { .. } => 17,
        Command::Collect(_) => 18,
        Command::SubmitWorkflow(_) => 19,
        Command::CancelWorkflow { .. } => 20,
        Command::RetryWorkflow { .. } => 21,
        Command::Publish(_) => 22,
        Command::Receive(_) => 23,
        Command::Ack { .. } => 24,
        Command::CreateTopic { .. } => 25,
        Command::DeleteTopic { .. } => 26,
        Command::RunAgentV5(_) => 27,
        Command::ScaleAgent { .. } => 28,
        Command::StopAgent { .. } => 29,
        Command::RunAgent(_) => 30,
        Command::AsAttempt { .. } => 31,
    }
}

const VARIANTS: usize = 32;

fn agent_key() -> AgentKey {
    AgentKey { namespace: "default".to_owned(), name: "researcher".to_owned() }
}

/// An agent of two instances, restarted on failure, as format 5 wrote it.
fn agent_spec_v5() -> AgentSpecV5 {
    AgentSpecV5 {
        name: "researcher".to_owned(),
        namespace: "default".to_owned(),
        task: spec(""),
        replicas: 2,
        restart: RestartPolicy::OnFailure,
        backoff_ms_base: 1_000,
        backoff_ms_max: 60_000,
    }
}

/// An agent of one instance with a port and an HTTP health check.
fn agent_spec_checked() -> AgentSpec {
    AgentSpec {
        name: "server".to_owned(),
        replicas: 1,
        restart: RestartPolicy::Always,
        port: true,
        health: Some(HealthCheck {
            probe: Probe::Http { path: "/healthz".to_owned() },
            interval_ms: 5_000,
            timeout_ms: 1_000,
            failures: 3,
        }),
        ..AgentSpec::from(agent_spec_v5())
    }
}

/// An agent with a health check command.
fn agent_spec_command() -> AgentSpec {
    AgentSpec {
        port: false,
        health: Some(HealthCheck {
            probe: Probe::Command {
                program: "/bin/sh".to_owned(),
                args: vec!["-c".to_owned(), "test -f ready".to_owned()],
            },
            interval_ms: 2_000,
            timeout_ms: 500,
            failures: 1,
        }),
        ..agent_spec_checked()
    }
}

fn topic(name: &str) -> TopicKey {
    TopicKey { namespace: "default".to_owned(), name: name.to_owned() }
}

/// A publish with every optional field set.
fn full_publish() -> PublishSpec {
    PublishSpec {
        topic: topic("agents/researcher"),
        priority: 5,
        payload: b"{\"q\":\"raft\"}".to_vec(),
        idempotency_key: Some("ask-1".to_owned()),
        reply_to: Some("replies/0123".to_owned()),
        correlation_id: Some("c-1".to_owned()),
    }
}

/// A topic policy unlike the default in every field.
fn policy() -> TopicPolicy {
    TopicPolicy {
        messages_max: 1_000,
        bytes_max: 1 << 20,
        age_ms_max: 3_600_000,
        when_full: WhenFull::DropOldest,
        deliveries_max: 3,
        ack_deadline_ms: 5_000,
        consumers_max: 4,
    }
}

/// A two-step workflow: `plan` writes `topics`, `write` runs once per topic with a parameter.
fn workflow_spec() -> WorkflowSpec {
    let step = |name: &str| StepSpec {
        name: name.to_owned(),
        task: spec(""),
        after: BTreeSet::new(),
        inputs: BTreeMap::new(),
        outputs: BTreeSet::new(),
        for_each: None,
        allow_failure: false,
    };
    WorkflowSpec {
        name: "research".to_owned(),
        namespace: "default".to_owned(),
        params: BTreeMap::from([("topic".to_owned(), "raft".to_owned())]),
        steps: vec![
            StepSpec { outputs: BTreeSet::from(["topics".to_owned()]), ..step("plan") },
            StepSpec {
                after: BTreeSet::from(["plan".to_owned()]),
                inputs: BTreeMap::from([(
                    "topic".to_owned(),
                    InputSource::Param("topic".to_owned()),
                )]),
                for_each: Some(OutputRef { step: "plan".to_owned(), output: "topics".to_owned() }),
                allow_failure: true,
                ..step("write")
            },
        ],
    }
}

fn acl_token(accessor: &str, role: Role, namespaces: Option<&[&str]>) -> AclToken {
    AclToken {
        accessor: accessor.to_owned(),
        secret_hash: [0x5a; 32],
        grant: Grant {
            role,
            namespaces: namespaces.map(|n| n.iter().map(|s| s.to_string()).collect()),
        },
        description: "frozen".to_owned(),
        created_unix_ms: 1_700_000_000_000,
        expires_unix_ms: None,
    }
}

/// One of every command (two where a nested enum has two shapes), with every field set.
fn every_command() -> Vec<Command> {
    vec![
        Command::SubmitTask(full_spec()),
        Command::SubmitTask(spec("sleep")),
        Command::CancelTask { id: TaskId(3), reason: "no longer needed".to_owned() },
        Command::InitCa(ClusterCaRecord { cert_pem: "CERT".to_owned(), key_pem: "KEY".to_owned() }),
        Command::CreateJoinToken {
            secret_hash: [0xa5; 32],
            expires_unix_ms: 1_700_000_900_000,
            kind: JoinKind::Executor,
        },
        Command::AdmitExecutor {
            secret_hash: [0xa5; 32],
            expected_id: ExecutorId(1),
            name: "e1".to_owned(),
            cert_fingerprint: [0x3c; 32],
        },
        Command::RegisterExecutor { id: ExecutorId(1), spec: executor_spec() },
        Command::MarkExecutorDown { id: ExecutorId(2), reason: "silent for 3s".to_owned() },
        Command::DrainExecutor { id: ExecutorId(1), deadline_unix_ms: 1_700_000_700_000 },
        Command::PlaceTasks {
            placements: vec![Placement {
                task: TaskId(1),
                executor: ExecutorId(1),
                evict: vec![TaskId(4)],
                memory_bytes: Some(256 << 20),
            }],
            unschedulable: vec![(TaskId(5), "unschedulable: no executor has 2 gpus".to_owned())],
        },
        Command::Report {
            executor: ExecutorId(1),
            task: TaskId(1),
            token: FencingToken(6),
            status: AttemptStatus::Started,
        },
        Command::Report {
            executor: ExecutorId(1),
            task: TaskId(1),
            token: FencingToken(6),
            status: AttemptStatus::Finished(AttemptResult {
                outcome: AttemptOutcome::Failed,
                exit_code: Some(2),
                stdout_tail: "out".to_owned(),
                stderr_tail: "err".to_owned(),
                message: "exited with code 2".to_owned(),
                peak_memory_bytes: Some(100 << 20),
            }),
        },
        Command::ExpireTasks { ids: vec![TaskId(7), TaskId(8)] },
        Command::PublishModel {
            device: "cpu".to_owned(),
            feature_schema: "colony-features-v1".to_owned(),
            weights: vec![1, 2, 3, 4],
            metrics: metrics(),
        },
        Command::RollbackModel { version: ModelVersion(1) },
        Command::EvictTasks { ids: vec![TaskId(9)], reason: "drain deadline passed".to_owned() },
        Command::BootstrapAcl(acl_token("0123abcd", Role::Admin, None)),
        Command::CreateAclToken(AclToken {
            expires_unix_ms: Some(1_800_000_000_000),
            ..acl_token("4567ef01", Role::Submitter, Some(&["research"]))
        }),
        Command::RevokeAclToken { accessor: "4567ef01".to_owned() },
        Command::UndrainExecutor { id: ExecutorId(1) },
        Command::Collect(Retention {
            task_retention_ms: 259_200_000,
            finished_tasks_max: 1_000_000,
            executor_gc_after_ms: 86_400_000,
            scan_max: 20_000,
        }),
        Command::SubmitWorkflow(workflow_spec()),
        Command::CancelWorkflow { id: WorkflowId(1), reason: "changed my mind".to_owned() },
        Command::RetryWorkflow { id: WorkflowId(1) },
        Command::Report {
            executor: ExecutorId(1),
            task: TaskId(1),
            token: FencingToken(6),
            status: AttemptStatus::FinishedWithOutputs(
                AttemptResult {
                    outcome: AttemptOutcome::Succeeded,
                    exit_code: Some(0),
                    stdout_tail: String::new(),
                    stderr_tail: String::new(),
                    message: String::new(),
                    peak_memory_bytes: None,
                },
                BTreeMap::from([("topics".to_owned(), b"[\"a\",\"b\"]".to_vec())]),
            ),
        },
        Command::Publish(full_publish()),
        Command::Receive(ReceiveSpec {
            topic: topic("agents/researcher"),
            consumer: "researchers".to_owned(),
            max: 10,
            ack_deadline_ms: Some(30_000),
        }),
        Command::Ack {
            topic: topic("agents/researcher"),
            consumer: "researchers".to_owned(),
            deliveries: vec![DeliveryRef { seq: 1, delivery: 2 }],
        },
        Command::CreateTopic {
            topic: topic("replies/0123"),
            policy: policy(),
            delete_after_unix_ms: Some(1_700_000_090_000),
        },
        Command::DeleteTopic { topic: topic("replies/0123") },
        Command::RunAgentV5(agent_spec_v5()),
        Command::ScaleAgent { agent: agent_key(), replicas: 3 },
        Command::StopAgent { agent: agent_key() },
        Command::RunAgent(agent_spec_checked()),
        Command::RunAgent(agent_spec_command()),
        Command::Report {
            executor: ExecutorId(1),
            task: TaskId(1),
            token: FencingToken(6),
            status: AttemptStatus::Health { healthy: true, address: "10.0.0.7:20000".to_owned() },
        },
        Command::AsAttempt {
            task: TaskId(1),
            token: FencingToken(6),
            command: Box::new(Command::Publish(full_publish())),
        },
    ]
}

fn executor_spec() -> ExecutorSpec {
    ExecutorSpec {
        name: "e1".to_owned(),
        capacity: Resources {
            cpu_millis: 4000,
            memory_bytes: 8 << 30,
            gpus: 1,
            custom: BTreeMap::new(),
        },
        labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
        capabilities: BTreeSet::from(["gpu".to_owned(), "shell".to_owned()]),
    }
}

#[test]
fn proposal_with_every_command_is_frozen() {
    let proposal = Proposal { now_unix_ms: 1_700_000_000_000, commands: every_command() };
    let covered: BTreeSet<usize> = proposal.commands.iter().map(variant).collect();
    assert_eq!(
        covered,
        (0..VARIANTS).collect::<BTreeSet<usize>>(),
        "the frozen proposal must carry one of every Command variant; {FORMAT_CHANGE}"
    );
    let frame = codec::encode(&proposal).unwrap();
    assert_frozen("proposal_v6.hex", &frame);
    assert_eq!(codec::decode::<Proposal>(&frozen("proposal_v6.hex")).unwrap(), proposal);
    // Format 5 had every command but today's `RunAgent` and health reports (its `RunAgent` is
    // today's `RunAgentV5`).
    let mut before_discovery = proposal.clone();
    before_discovery.commands.retain(|c| {
        variant(c) < 30
            && !matches!(c, Command::Report { status: AttemptStatus::Health { .. }, .. })
    });
    assert_eq!(codec::decode::<Proposal>(&frozen("proposal_v5.hex")).unwrap(), before_discovery);
    // Format 4 had every command but the messaging ones, encoded as today.
    let mut before_messages = before_discovery;
    before_messages.commands.retain(|c| variant(c) < 22);
    assert_eq!(codec::decode::<Proposal>(&frozen("proposal_v4.hex")).unwrap(), before_messages);
    // Format 3 had every command but the workflows' and reports with outputs, encoded as today.
    let mut before_workflows = before_messages;
    before_workflows.commands.retain(|c| {
        variant(c) < 19
            && !matches!(c, Command::Report { status: AttemptStatus::FinishedWithOutputs(..), .. })
    });
    assert_eq!(codec::decode::<Proposal>(&frozen("proposal_v3.hex")).unwrap(), before_workflows);
    // Format 2 had those but `Collect`.
    let mut before_retention = before_workflows;
    before_retention.commands.retain(|c| !matches!(c, Command::Collect(_)));
    assert_eq!(codec::decode::<Proposal>(&frozen("proposal_v2.hex")).unwrap(), before_retention);
}

fn log_id(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(3, 1), index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_entry_is_frozen() {
    let proposal = Proposal {
        now_unix_ms: 1_700_000_000_000,
        commands: vec![
            Command::SubmitTask(spec("sleep")),
            Command::CancelTask { id: TaskId(1), reason: String::new() },
        ],
    };
    let entry: Entry<TypeConfig> =
        Entry { log_id: log_id(42), payload: EntryPayload::Normal(proposal) };
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = colony_store::open(dir.path(), &CHECKED).unwrap();
        log.blocking_append([entry.clone()]).await.unwrap();
    }
    // The bytes the log store put in RocksDB, read back without it.
    let raft_dir = dir.path().join("raft");
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), raft_dir, ["log", "meta"]).unwrap();
    let stored = db.get_cf(db.cf_handle("log").unwrap(), 42u64.to_be_bytes()).unwrap().unwrap();
    assert_frozen("log_entry_v6.hex", &stored);
    for name in [
        "log_entry_v6.hex",
        "log_entry_v5.hex",
        "log_entry_v4.hex",
        "log_entry_v3.hex",
        "log_entry_v2.hex",
    ] {
        assert_eq!(codec::decode::<Entry<TypeConfig>>(&frozen(name)).unwrap(), entry, "{name}");
    }
}

/// `snapshot_commands_v5` and an agent with a port and a health check whose one instance runs,
/// healthy, in the registry.
fn snapshot_commands() -> Vec<Command> {
    let mut commands = snapshot_commands_v5();
    // Tasks 1..=10 are the earlier commands'; the agent's instance is task 11.
    let instance = TaskId(11);
    commands.extend([
        Command::RunAgent(agent_spec_checked()),
        Command::PlaceTasks {
            placements: vec![Placement {
                task: instance,
                executor: ExecutorId(1),
                evict: Vec::new(),
                memory_bytes: None,
            }],
            unschedulable: Vec::new(),
        },
        Command::Report {
            executor: ExecutorId(1),
            task: instance,
            token: FencingToken(4),
            status: AttemptStatus::Started,
        },
        Command::Report {
            executor: ExecutorId(1),
            task: instance,
            token: FencingToken(4),
            status: AttemptStatus::Health { healthy: true, address: "10.0.0.7:20000".to_owned() },
        },
    ]);
    commands
}

/// `snapshot_commands_v4` and messages: a topic with a policy, messages of two priorities, one
/// consumer holding a delivery and another that acknowledged one; and an agent of two instances.
/// What format 5's frozen snapshot holds.
fn snapshot_commands_v5() -> Vec<Command> {
    let mut commands = snapshot_commands_v4();
    commands.extend([
        Command::CreateTopic {
            topic: topic("topics/papers"),
            policy: policy(),
            delete_after_unix_ms: None,
        },
        Command::Publish(PublishSpec {
            topic: topic("topics/papers"),
            priority: 0,
            payload: b"paper-1".to_vec(),
            idempotency_key: None,
            reply_to: None,
            correlation_id: None,
        }),
        Command::Publish(PublishSpec { topic: topic("topics/papers"), ..full_publish() }),
        Command::Receive(ReceiveSpec {
            topic: topic("topics/papers"),
            consumer: "summarizers".to_owned(),
            max: 1,
            ack_deadline_ms: None,
        }),
        Command::Receive(ReceiveSpec {
            topic: topic("topics/papers"),
            consumer: "archivers".to_owned(),
            max: 1,
            ack_deadline_ms: Some(1_000),
        }),
        Command::Ack {
            topic: topic("topics/papers"),
            consumer: "archivers".to_owned(),
            deliveries: vec![DeliveryRef { seq: 2, delivery: 1 }],
        },
        Command::RunAgentV5(agent_spec_v5()),
    ]);
    commands
}

/// `snapshot_commands_v3` and a workflow: its first step succeeded with its outputs, its second
/// fanned out over them. What format 4's frozen snapshot holds.
fn snapshot_commands_v4() -> Vec<Command> {
    let mut commands = snapshot_commands_v3();
    let plan = TaskId(6);
    commands.extend([
        Command::SubmitWorkflow(workflow_spec()),
        Command::PlaceTasks {
            placements: vec![Placement {
                task: plan,
                executor: ExecutorId(1),
                evict: Vec::new(),
                memory_bytes: None,
            }],
            unschedulable: Vec::new(),
        },
        Command::Report {
            executor: ExecutorId(1),
            task: plan,
            token: FencingToken(3),
            status: AttemptStatus::FinishedWithOutputs(
                AttemptResult {
                    outcome: AttemptOutcome::Succeeded,
                    exit_code: Some(0),
                    stdout_tail: String::new(),
                    stderr_tail: String::new(),
                    message: String::new(),
                    peak_memory_bytes: None,
                },
                BTreeMap::from([("topics".to_owned(), b"[\"a\",{\"b\":1}]".to_vec())]),
            ),
        },
    ]);
    commands
}

/// A small state with something in every part: tasks blocked, pending, running, succeeded and
/// cancelled; an up executor holding an allocation; a join token; the CA; ACL tokens; a model.
/// What format 3's frozen snapshot holds.
fn snapshot_commands_v3() -> Vec<Command> {
    let placed = Placement {
        task: TaskId(1),
        executor: ExecutorId(1),
        evict: Vec::new(),
        memory_bytes: None,
    };
    let done = Placement {
        task: TaskId(4),
        executor: ExecutorId(1),
        evict: Vec::new(),
        memory_bytes: None,
    };
    vec![
        Command::InitCa(ClusterCaRecord { cert_pem: "CERT".to_owned(), key_pem: "KEY".to_owned() }),
        Command::CreateJoinToken {
            secret_hash: [0xa5; 32],
            expires_unix_ms: 1_700_000_900_000,
            kind: JoinKind::Executor,
        },
        Command::AdmitExecutor {
            secret_hash: [0xa5; 32],
            expected_id: ExecutorId(1),
            name: "e1".to_owned(),
            cert_fingerprint: [0x3c; 32],
        },
        Command::RegisterExecutor { id: ExecutorId(1), spec: executor_spec() },
        Command::SubmitTask(spec("running")),
        Command::SubmitTask(TaskSpec {
            dependencies: BTreeSet::from([TaskId(1)]),
            ..spec("blocked")
        }),
        Command::SubmitTask(TaskSpec {
            idempotency_key: Some("pending-1".to_owned()),
            deadline_unix_ms: Some(1_700_000_600_000),
            ..spec("pending")
        }),
        Command::SubmitTask(spec("done")),
        Command::SubmitTask(spec("cancelled")),
        Command::PlaceTasks { placements: vec![placed, done], unschedulable: Vec::new() },
        Command::Report {
            executor: ExecutorId(1),
            task: TaskId(1),
            token: FencingToken(1),
            status: AttemptStatus::Started,
        },
        Command::Report {
            executor: ExecutorId(1),
            task: TaskId(4),
            token: FencingToken(2),
            status: AttemptStatus::Finished(AttemptResult {
                outcome: AttemptOutcome::Succeeded,
                exit_code: Some(0),
                stdout_tail: "ok".to_owned(),
                stderr_tail: String::new(),
                message: String::new(),
                peak_memory_bytes: Some(10 << 20),
            }),
        },
        Command::CancelTask { id: TaskId(5), reason: "not needed".to_owned() },
        Command::BootstrapAcl(acl_token("0123abcd", Role::Admin, None)),
        Command::CreateAclToken(AclToken {
            secret_hash: [0x6b; 32],
            ..acl_token("89ab", Role::Reader, Some(&["default"]))
        }),
        Command::PublishModel {
            device: "cpu".to_owned(),
            feature_schema: "colony-features-v1".to_owned(),
            weights: vec![1, 2, 3, 4],
            metrics: metrics(),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_file_is_frozen() {
    let membership = Entry::<TypeConfig> {
        log_id: log_id(1),
        payload: EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1])], None)),
    };
    let proposal = Proposal { now_unix_ms: 1_700_000_000_000, commands: snapshot_commands() };
    let entries =
        [membership, Entry { log_id: log_id(2), payload: EntryPayload::Normal(proposal.clone()) }];
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = colony_store::open(dir.path(), &CHECKED).unwrap();
    let responses = sm.apply(entries).await.unwrap();
    for (command, result) in proposal.commands.iter().zip(&responses[1].results) {
        assert!(result.is_ok(), "{command:?}: {result:?}");
    }
    assert!(matches!(responses[1].results[10], Ok(Outcome::Reported { .. })));
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();

    let written = std::fs::read(dir.path().join("snapshots/snapshot.bin")).unwrap();
    assert_frozen("snapshot_v6.hex", &written);
    let registered = sm.shared().read().unwrap().machine.agent_endpoint(TaskId(11)).cloned();
    assert_eq!(registered.map(|e| e.address), Some("10.0.0.7:20000".to_owned()));
    let workflow =
        sm.shared().read().unwrap().machine.get_workflow(WorkflowId(1)).cloned().unwrap();
    assert_eq!(workflow.steps[1].tasks.len(), 2, "the fan-out made one task per topic");

    let expected = |commands: Vec<Command>| {
        let mut machine = StateMachine::new();
        let proposal = Proposal { now_unix_ms: 1_700_000_000_000, commands };
        for result in machine.apply_proposal(&proposal) {
            result.unwrap();
        }
        machine
    };
    // Format 4, written before messages; formats 3 and 2, written before workflows (2 also before retention), read into the state
    // their commands make today.
    let today = expected(snapshot_commands());
    let before_discovery = expected(snapshot_commands_v5());
    let before_messages = expected(snapshot_commands_v4());
    let before_workflows = expected(snapshot_commands_v3());
    for (name, expected) in [
        ("snapshot_v6.hex", &today),
        ("snapshot_v5.hex", &before_discovery),
        ("snapshot_v4.hex", &before_messages),
        ("snapshot_v3.hex", &before_workflows),
        ("snapshot_v2.hex", &before_workflows),
    ] {
        let frozen_dir = tempfile::tempdir().unwrap();
        std::fs::write(frozen_dir.path().join("snapshot.bin"), frozen(name)).unwrap();
        let (_, stored) = SnapshotFile::open(frozen_dir.path()).unwrap();
        let stored = stored.unwrap();
        let applied = Applied::decode(&stored.data).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        applied.machine.check_invariants().unwrap();
        assert_eq!(&applied.machine, expected, "{name}");
        assert_eq!(applied.last_applied, Some(log_id(2)), "{name}");
        assert_eq!(stored.meta.last_log_id, Some(log_id(2)), "{name}");
        assert_eq!(stored.meta.snapshot_id, "3-2-1", "{name}");
    }
}

/// Format 1 (before TLS and ACLs) is refused with the version named, never misread: a cluster
/// written by it has no certificates or tokens to carry over, so it is started afresh.
#[test]
fn format_1_is_refused_by_name() {
    for name in ["proposal_v1.hex", "log_entry_v1.hex"] {
        let error = codec::decode::<Proposal>(&frozen(name)).unwrap_err().to_string();
        assert!(error.contains("unknown format version 1"), "{name}: {error}");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("snapshot.bin"), frozen("snapshot_v1.hex")).unwrap();
    let error = match SnapshotFile::open(dir.path()) {
        Ok((_, Some(stored))) => Applied::decode(&stored.data).unwrap_err().to_string(),
        Ok((_, None)) => panic!("the format 1 snapshot was not found"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("version"), "snapshot_v1.hex: {error}");
}
