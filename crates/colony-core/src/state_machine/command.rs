//! The commands a proposal carries, what applying one returns, and why one is refused.
//!
//! `Command` and `Proposal` (and everything inside them) are persisted in the Raft log with
//! bincode: their field order, names and types are a format, frozen by colony-store's tests.
//! `Outcome` and `CommandError` are only ever returned, never stored.

use crate::acl::{AclToken, JoinKind};
use crate::agent::{Agent, AgentKey, AgentSpec};
use crate::executor::{ClusterCaRecord, ExecutorSpec, ExecutorState};
use crate::ids::{ExecutorId, FencingToken, ModelVersion, TaskId, WorkflowId};
use crate::messaging::{
    Acked, DeliveryRef, MessageError, PublishSpec, Published, ReceiveSpec, Received, TopicKey,
    TopicPolicy,
};
use crate::model::ModelMetrics;
use crate::resources::Resources;
use crate::state_machine::upgrade::AgentSpecV5;
use crate::state_machine::workflows::Outputs;
use crate::state_machine::{Collected, PlacementRejection, Retention};
use crate::task::{SpecError, Task, TaskSpec, TaskState};
use crate::workflow::{Workflow, WorkflowSpec, WorkflowState};
use serde::{Deserialize, Serialize};

/// One change a client asked for.
// A command is moved once, into a proposal; boxing the spec would buy nothing but an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    SubmitTask(TaskSpec),
    CancelTask {
        id: TaskId,
        reason: String,
    },
    /// Installs the cluster CA; the bootstrap leader proposes it once.
    InitCa(ClusterCaRecord),
    CreateJoinToken {
        secret_hash: [u8; 32],
        expires_unix_ms: u64,
        kind: JoinKind,
    },
    /// Admits an executor that presented a valid join token. `expected_id` is the id its
    /// certificate was issued for; the command fails if another admission took it first.
    AdmitExecutor {
        secret_hash: [u8; 32],
        expected_id: ExecutorId,
        name: String,
        cert_fingerprint: [u8; 32],
    },
    /// What a connected executor offers; brings a down (or newly admitted) executor up.
    RegisterExecutor {
        id: ExecutorId,
        spec: ExecutorSpec,
    },
    /// The leader's failure detector gave up on it: its attempts are lost and rescheduled.
    MarkExecutorDown {
        id: ExecutorId,
        reason: String,
    },
    DrainExecutor {
        id: ExecutorId,
        deadline_unix_ms: u64,
    },
    /// A scheduling round: placements (each re-validated here) and reasons for pending tasks
    /// that fit nowhere.
    PlaceTasks {
        placements: Vec<Placement>,
        unschedulable: Vec<(TaskId, String)>,
    },
    /// An executor's report on an attempt, fenced by the attempt's token.
    Report {
        executor: ExecutorId,
        task: TaskId,
        token: FencingToken,
        status: AttemptStatus,
    },
    /// Tasks not started by their deadline.
    ExpireTasks {
        ids: Vec<TaskId>,
    },
    /// Adds a model to the registry and makes it current. The server has already decoded and
    /// checked the weights (finite, the right shape); `apply` checks what it can without them.
    PublishModel {
        device: String,
        feature_schema: String,
        weights: Vec<u8>,
        metrics: ModelMetrics,
    },
    RollbackModel {
        version: ModelVersion,
    },
    /// Stops attempts (a drain deadline passed) and returns the tasks to pending without
    /// spending a retry.
    EvictTasks {
        ids: Vec<TaskId>,
        reason: String,
    },
    /// Creates the first management token; refused once ACLs are bootstrapped.
    BootstrapAcl(AclToken),
    CreateAclToken(AclToken),
    RevokeAclToken {
        accessor: String,
    },
    /// Stops an executor's drain: it takes new placements again.
    UndrainExecutor {
        id: ExecutorId,
    },
    /// Forgets finished tasks, long-down executors and expired tokens, as the leader's retention
    /// policy says, at the proposal's time.
    Collect(Retention),
    // Variants are appended: a log entry written before one existed still decodes.
    /// Creates a workflow and starts its first steps, all at once or not at all.
    SubmitWorkflow(WorkflowSpec),
    /// Stops every running step of a workflow and cancels the rest.
    CancelWorkflow {
        id: WorkflowId,
        reason: String,
    },
    /// Re-runs a failed or cancelled workflow's unsucceeded steps and what depends on them.
    RetryWorkflow {
        id: WorkflowId,
    },
    /// Appends a message to a topic or mailbox (created with the default policy if new).
    Publish(PublishSpec),
    /// Hands a consumer its next messages, each with an ack deadline from the proposal's time.
    Receive(ReceiveSpec),
    Ack {
        topic: TopicKey,
        consumer: String,
        deliveries: Vec<DeliveryRef>,
    },
    /// Creates a topic with a policy, or changes an existing topic's policy. A temporary mailbox
    /// (a request's reply) names when it goes.
    CreateTopic {
        topic: TopicKey,
        policy: TopicPolicy,
        delete_after_unix_ms: Option<u64>,
    },
    DeleteTopic {
        topic: TopicKey,
    },
    /// `RunAgent` as format 5 wrote it (a spec without port or health check).
    RunAgentV5(AgentSpecV5),
    ScaleAgent {
        agent: AgentKey,
        replicas: u32,
    },
    /// Stops every instance; the agent is kept, stopped, until it is run again.
    StopAgent {
        agent: AgentKey,
    },
    /// Creates an agent and starts its instances, or changes its spec (a new replica count is
    /// applied at once; any other change rolls the instances onto it one at a time, each new
    /// instance healthy before the old one stops).
    RunAgent(AgentSpec),
    /// A messaging command made by a task's attempt (through its executor's local socket):
    /// applied only while that attempt is the task's current one and holds it, and only within
    /// the task's namespace, so a superseded attempt can no longer publish, receive or ack.
    AsAttempt {
        task: TaskId,
        token: FencingToken,
        command: Box<Command>,
    },
}

/// One task to one executor, evicting strictly lower-priority attempts there first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub task: TaskId,
    pub executor: ExecutorId,
    pub evict: Vec<TaskId>,
    /// For a `memory_auto` task, the memory the leader sized with the model (or its fallback).
    pub memory_bytes: Option<u64>,
}

/// A placement that committed: what the executor is told to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub task: TaskId,
    pub executor: ExecutorId,
    pub attempt: u32,
    pub token: FencingToken,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptStatus {
    Started,
    Finished(AttemptResult),
    /// A finished attempt that wrote outputs (kept only if it succeeded and they pass the limits).
    FinishedWithOutputs(AttemptResult, Outputs),
    /// A running agent instance passed its health check (registered at `address`) or stopped
    /// passing it (unregistered).
    Health {
        healthy: bool,
        address: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptOutcome {
    Succeeded,
    Failed,
    TimedOut,
    /// Passed its memory limit and was killed by the kernel: a failure (it spends a retry) whose
    /// reason starts `oom_killed:`.
    OomKilled,
}

/// How an attempt ended, as its executor saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptResult {
    pub outcome: AttemptOutcome,
    pub exit_code: Option<i32>,
    pub stdout_tail: String,
    pub stderr_tail: String,
    pub message: String,
    pub peak_memory_bytes: Option<u64>,
}

/// What one Raft entry carries: commands batched by the leader, and the time it stamped on them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub now_unix_ms: u64,
    pub commands: Vec<Command>,
}

/// The result of a successfully applied command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// `existing` is true when the idempotency key matched an earlier submission.
    Submitted {
        task: Task,
        existing: bool,
    },
    /// The cancelled task and the dependents cancelled with it.
    Cancelled {
        task: Task,
        cascaded: Vec<TaskId>,
    },
    CaInitialized,
    TokenCreated,
    AclBootstrapped,
    AclTokenCreated,
    AclTokenRevoked,
    Undrained {
        id: ExecutorId,
    },
    Admitted {
        id: ExecutorId,
    },
    /// `changed` is false when the executor was already up with this spec.
    Registered {
        id: ExecutorId,
        changed: bool,
    },
    /// The tasks that go back to pending for another attempt, and those out of retries.
    MarkedDown {
        id: ExecutorId,
        rescheduled: Vec<TaskId>,
        lost: Vec<TaskId>,
    },
    Draining {
        id: ExecutorId,
    },
    /// Committed assignments, and the placements `apply` refused (the tasks stay pending).
    Placed {
        assigned: Vec<Assignment>,
        evicted: Vec<TaskId>,
        rejected: Vec<(TaskId, PlacementRejection)>,
    },
    Reported {
        task: TaskId,
        state: TaskState,
        /// When the report ended the task's workflow (a failed step): the workflow's tasks, so
        /// the leader stops those still running at once.
        stopped: Vec<TaskId>,
    },
    Expired {
        ids: Vec<TaskId>,
    },
    Evicted {
        ids: Vec<TaskId>,
    },
    ModelPublished {
        version: ModelVersion,
    },
    ModelRolledBack {
        version: ModelVersion,
    },
    Collected(Collected),
    WorkflowSubmitted {
        workflow: Workflow,
    },
    WorkflowCancelled {
        workflow: Workflow,
    },
    WorkflowRetried {
        workflow: Workflow,
    },
    Published(Published),
    Received(Received),
    Acked(Acked),
    /// `created` is false when the topic existed and only its policy changed.
    TopicCreated {
        created: bool,
    },
    TopicDeleted {
        messages: u64,
    },
    /// `stopped`: running tasks that ended (their executors stop them now).
    AgentRun {
        agent: Agent,
        created: bool,
        stopped: Vec<TaskId>,
    },
    AgentScaled {
        agent: Agent,
        stopped: Vec<TaskId>,
    },
    AgentStopped {
        agent: Agent,
        stopped: Vec<TaskId>,
    },
}

/// Why a command was rejected. A rejected command changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("invalid task: {0}")]
    InvalidSpec(String),
    #[error("task {0} does not exist")]
    UnknownTask(TaskId),
    #[error("dependency {0} does not exist")]
    UnknownDependency(TaskId),
    #[error("dependency {dependency} has already ended as {state}; the task could never run")]
    DependencyEnded { dependency: TaskId, state: TaskState },
    #[error("task {id} has already finished as {state}")]
    AlreadyFinished { id: TaskId, state: TaskState },
    #[error("deadline {deadline_unix_ms} is already past (now {now_unix_ms})")]
    DeadlinePassed { deadline_unix_ms: u64, now_unix_ms: u64 },
    #[error("idempotency key {key:?} was already used for task {existing} with a different spec")]
    IdempotencyConflict { key: String, existing: TaskId },
    #[error("a proposal carries {count} commands; the limit is {max}")]
    BatchTooLarge { count: usize, max: usize },
    #[error("the cluster CA is already set")]
    CaExists,
    #[error("the join token is unknown, has expired, or does not admit a {kind}")]
    InvalidJoinToken { kind: JoinKind },
    #[error("ACLs are already bootstrapped: ask an admin for a token")]
    AclAlreadyBootstrapped,
    #[error("no ACL token has accessor {0:?}")]
    UnknownAccessor(String),
    #[error("an ACL token with this accessor or secret already exists")]
    AclTokenExists,
    #[error("too many {what}: the limit is {max}")]
    TooMany { what: String, max: usize },
    #[error("executor id {expected} was taken by another admission; retry")]
    AdmissionRaced { expected: ExecutorId },
    #[error("executor {0} does not exist")]
    UnknownExecutor(ExecutorId),
    #[error("executor {id} is {state}")]
    ExecutorState { id: ExecutorId, state: ExecutorState },
    #[error("executor {id} would offer {capacity} but already holds {allocated}")]
    CapacityBelowAllocated { id: ExecutorId, capacity: Resources, allocated: Resources },
    #[error("report for task {task} from executor {executor} with token {token} does not match the current attempt")]
    StaleReport { task: TaskId, executor: ExecutorId, token: FencingToken },
    #[error("{what} is {len} bytes; the limit is {max}")]
    TooLong { what: String, len: usize, max: usize },
    #[error("model version {0} does not exist")]
    UnknownModel(ModelVersion),
    #[error("invalid model: {0}")]
    InvalidModel(String),
    #[error("invalid workflow: {0}")]
    InvalidWorkflow(String),
    #[error("workflow {0} does not exist")]
    UnknownWorkflow(WorkflowId),
    #[error("workflow {id} has already ended as {state}")]
    WorkflowFinished { id: WorkflowId, state: WorkflowState },
    #[error("workflow {0} is still running: wait for it to end or cancel it first")]
    WorkflowRunning(WorkflowId),
    #[error("{0}")]
    Message(#[from] MessageError),
    #[error("{0}")]
    InvalidAgent(String),
    #[error("agent {0} does not exist")]
    UnknownAgent(String),
    #[error("attempt of task {task} with token {token} is not the task's current attempt: it was superseded or has ended")]
    StaleAttempt { task: TaskId, token: FencingToken },
    #[error("an attempt may {0}")]
    NotForAttempts(String),
}

impl From<SpecError> for CommandError {
    fn from(e: SpecError) -> Self {
        CommandError::InvalidSpec(e.to_string())
    }
}
