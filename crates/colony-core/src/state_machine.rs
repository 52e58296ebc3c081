//! The replicated state machine: `apply(command) -> result`, deterministic on every replica.
//!
//! Time comes in with the proposal (`now_unix_ms`, stamped by the leader); nothing here reads a
//! clock, a random number generator or a file. A command that would break an invariant is
//! rejected with a typed error and changes nothing.

use crate::executor::{ClusterCaRecord, Executor, ExecutorSpec, ExecutorState, JoinTokenRecord};
use crate::ids::{ExecutorId, FencingToken, ModelVersion, TaskId};
use crate::model::{ModelMetrics, ModelRecord};
use crate::resources::Resources;
use crate::limits::Limits;
use crate::task::{SpecError, Task, TaskSpec, TaskState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// One change a client asked for.
// A command is moved once, into a proposal; boxing the spec would buy nothing but an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    SubmitTask(TaskSpec),
    CancelTask { id: TaskId, reason: String },
    /// Installs the cluster CA; the bootstrap leader proposes it once.
    InitCa(ClusterCaRecord),
    CreateJoinToken { secret_hash: [u8; 32], expires_unix_ms: u64 },
    /// Admits an executor that presented a valid join token. `expected_id` is the id its
    /// certificate was issued for; the command fails if another admission took it first.
    AdmitExecutor { secret_hash: [u8; 32], expected_id: ExecutorId, name: String, cert_fingerprint: [u8; 32] },
    /// What a connected executor offers; brings a down (or newly admitted) executor up.
    RegisterExecutor { id: ExecutorId, spec: ExecutorSpec },
    /// The leader's failure detector gave up on it: its attempts are lost and rescheduled.
    MarkExecutorDown { id: ExecutorId, reason: String },
    DrainExecutor { id: ExecutorId, deadline_unix_ms: u64 },
    /// A scheduling round: placements (each re-validated here) and reasons for pending tasks
    /// that fit nowhere.
    PlaceTasks { placements: Vec<Placement>, unschedulable: Vec<(TaskId, String)> },
    /// An executor's report on an attempt, fenced by the attempt's token.
    Report { executor: ExecutorId, task: TaskId, token: FencingToken, status: AttemptStatus },
    /// Tasks not started by their deadline.
    ExpireTasks { ids: Vec<TaskId> },
    /// Adds a model to the registry and makes it current. The server has already decoded and
    /// checked the weights (finite, the right shape); `apply` checks what it can without them.
    PublishModel { device: String, feature_schema: String, weights: Vec<u8>, metrics: ModelMetrics },
    RollbackModel { version: ModelVersion },
    /// Stops attempts (a drain deadline passed) and returns the tasks to pending without
    /// spending a retry.
    EvictTasks { ids: Vec<TaskId>, reason: String },
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptOutcome {
    Succeeded,
    Failed,
    TimedOut,
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
    Submitted { task: Task, existing: bool },
    /// The cancelled task and the dependents cancelled with it.
    Cancelled { task: Task, cascaded: Vec<TaskId> },
    CaInitialized,
    TokenCreated,
    Admitted { id: ExecutorId },
    /// `changed` is false when the executor was already up with this spec.
    Registered { id: ExecutorId, changed: bool },
    /// The tasks that go back to pending for another attempt, and those out of retries.
    MarkedDown { id: ExecutorId, rescheduled: Vec<TaskId>, lost: Vec<TaskId> },
    Draining { id: ExecutorId },
    /// Committed assignments, and the placements `apply` refused (the tasks stay pending).
    Placed { assigned: Vec<Assignment>, evicted: Vec<TaskId>, rejected: Vec<(TaskId, String)> },
    Reported { task: TaskId, state: TaskState },
    Expired { ids: Vec<TaskId> },
    Evicted { ids: Vec<TaskId> },
    ModelPublished { version: ModelVersion },
    ModelRolledBack { version: ModelVersion },
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
    #[error("the join token is unknown or has expired")]
    InvalidJoinToken,
    #[error("too many {what}: the limit is {max}")]
    TooMany { what: String, max: usize },
    #[error("executor id {expected} was taken by another admission; retry")]
    AdmissionRaced { expected: ExecutorId },
    #[error("executor {0} does not exist")]
    UnknownExecutor(ExecutorId),
    #[error("executor {id} is {state}")]
    ExecutorState { id: ExecutorId, state: ExecutorState },
    #[error("executor {id} would offer {capacity} but already holds {allocated}")]
    CapacityBelowAllocated { id: ExecutorId, capacity: String, allocated: String },
    #[error("report for task {task} from executor {executor} with token {token} does not match the current attempt")]
    StaleReport { task: TaskId, executor: ExecutorId, token: FencingToken },
    #[error("{what} is {len} bytes; the limit is {max}")]
    TooLong { what: String, len: usize, max: usize },
    #[error("model version {0} does not exist")]
    UnknownModel(ModelVersion),
    #[error("invalid model: {0}")]
    InvalidModel(String),
}

impl From<SpecError> for CommandError {
    fn from(e: SpecError) -> Self {
        CommandError::InvalidSpec(e.to_string())
    }
}

/// Which tasks a listing returns.
#[derive(Clone, Debug, Default)]
pub struct TaskFilter {
    pub state: Option<TaskState>,
    /// Only tasks with an id greater than this (for paging).
    pub after: Option<TaskId>,
    pub limit: usize,
}

/// A pending task's place in the scheduling order: priority (highest first), then deadline
/// (earliest first, none last), then age (lowest id first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PendingKey {
    /// 1000 - priority, so that ascending order is highest priority first.
    pub rank: u16,
    pub deadline_unix_ms: u64,
    pub id: TaskId,
}

fn pending_key(task: &Task) -> Option<PendingKey> {
    (task.state == TaskState::Pending).then(|| PendingKey {
        rank: 1000u16.saturating_sub(task.spec.priority),
        deadline_unix_ms: task.spec.deadline_unix_ms.unwrap_or(u64::MAX),
        id: task.id,
    })
}

/// Tasks that have not started are indexed by deadline, so expiry never scans every task.
fn deadline_key(task: &Task) -> Option<(u64, TaskId)> {
    let waiting = matches!(task.state, TaskState::Blocked | TaskState::Pending);
    task.spec.deadline_unix_ms.filter(|_| waiting).map(|deadline| (deadline, task.id))
}

fn holds_resources(state: TaskState) -> bool {
    matches!(state, TaskState::Assigned | TaskState::Running)
}

/// The authoritative state of the cluster, identical on every replica at the same applied index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMachine {
    limits: Limits,
    tasks: BTreeMap<TaskId, Task>,
    /// The id the next submitted task gets; ids start at 1 and are never reused.
    next_task_id: u64,
    idempotency: BTreeMap<String, TaskId>,
    /// For each task, the unfinished-or-not tasks that named it as a dependency.
    dependents: BTreeMap<TaskId, BTreeSet<TaskId>>,
    /// The latest time any proposal carried: time on the replicated clock never goes backwards,
    /// even when a new leader's wall clock is behind the old one's.
    now_unix_ms: u64,
    /// Exactly the pending tasks, in scheduling order.
    pending: BTreeSet<PendingKey>,
    /// Exactly the blocked or pending tasks that have a deadline.
    deadlines: BTreeSet<(u64, TaskId)>,
    executors: BTreeMap<ExecutorId, Executor>,
    next_executor_id: u64,
    /// The token the next assignment gets: tokens only grow, across every task.
    next_fencing_token: u64,
    /// Keyed by the SHA-256 of the token's secret; the secret itself is never stored.
    join_tokens: BTreeMap<[u8; 32], JoinTokenRecord>,
    ca: Option<ClusterCaRecord>,
    /// Finished tasks by the order they finished in (bounded: the oldest entries go first).
    finished_order: BTreeMap<u64, TaskId>,
    next_finish_seq: u64,
    models: BTreeMap<ModelVersion, ModelRecord>,
    current_model: Option<ModelVersion>,
    next_model_version: u64,
}

impl Default for StateMachine {
    fn default() -> Self {
        StateMachine::new()
    }
}

fn check_text(what: &'static str, text: &str, max: usize) -> Result<(), CommandError> {
    if text.len() > max {
        return Err(CommandError::TooLong { what: what.to_owned(), len: text.len(), max });
    }
    Ok(())
}

impl StateMachine {
    pub fn new() -> Self {
        StateMachine {
            limits: Limits::default(),
            tasks: BTreeMap::new(),
            next_task_id: 1,
            idempotency: BTreeMap::new(),
            dependents: BTreeMap::new(),
            now_unix_ms: 0,
            pending: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            executors: BTreeMap::new(),
            next_executor_id: 1,
            next_fencing_token: 1,
            join_tokens: BTreeMap::new(),
            ca: None,
            finished_order: BTreeMap::new(),
            next_finish_seq: 1,
            models: BTreeMap::new(),
            current_model: None,
            next_model_version: 1,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The replicated clock: the largest `now` any applied proposal carried.
    pub fn now_unix_ms(&self) -> u64 {
        self.now_unix_ms
    }

    /// Applies every command of a proposal in order; each succeeds or fails on its own.
    pub fn apply_proposal(&mut self, proposal: &Proposal) -> Vec<Result<Outcome, CommandError>> {
        self.now_unix_ms = self.now_unix_ms.max(proposal.now_unix_ms);
        if proposal.commands.len() > self.limits.batch_commands_max {
            let error = CommandError::BatchTooLarge { count: proposal.commands.len(), max: self.limits.batch_commands_max };
            return proposal.commands.iter().map(|_| Err(error.clone())).collect();
        }
        proposal.commands.iter().map(|command| self.apply(command)).collect()
    }

    /// Applies one command at the replicated clock's current time.
    pub fn apply(&mut self, command: &Command) -> Result<Outcome, CommandError> {
        match command {
            Command::SubmitTask(spec) => self.submit(spec),
            Command::CancelTask { id, reason } => self.cancel(*id, reason),
            Command::InitCa(ca) => self.init_ca(ca),
            Command::CreateJoinToken { secret_hash, expires_unix_ms } => self.create_join_token(*secret_hash, *expires_unix_ms),
            Command::AdmitExecutor { secret_hash, expected_id, name, cert_fingerprint } => {
                self.admit_executor(secret_hash, *expected_id, name, *cert_fingerprint)
            }
            Command::RegisterExecutor { id, spec } => self.register_executor(*id, spec),
            Command::MarkExecutorDown { id, reason } => self.mark_executor_down(*id, reason),
            Command::DrainExecutor { id, deadline_unix_ms } => self.drain_executor(*id, *deadline_unix_ms),
            Command::PlaceTasks { placements, unschedulable } => self.place_tasks(placements, unschedulable),
            Command::Report { executor, task, token, status } => self.report(*executor, *task, *token, status),
            Command::ExpireTasks { ids } => Ok(self.expire_tasks(ids)),
            Command::PublishModel { device, feature_schema, weights, metrics } => self.publish_model(device, feature_schema, weights, metrics),
            Command::RollbackModel { version } => self.rollback_model(*version),
            Command::EvictTasks { ids, reason } => self.evict_tasks(ids, reason),
        }
    }

    fn submit(&mut self, spec: &TaskSpec) -> Result<Outcome, CommandError> {
        spec.validate(&self.limits)?;
        let now = self.now_unix_ms;
        if let Some(key) = &spec.idempotency_key {
            if let Some(&existing) = self.idempotency.get(key) {
                let task = self.task(existing)?;
                if &task.spec != spec {
                    return Err(CommandError::IdempotencyConflict { key: key.clone(), existing });
                }
                return Ok(Outcome::Submitted { task: task.clone(), existing: true });
            }
        }
        if let Some(deadline) = spec.deadline_unix_ms {
            if deadline <= now {
                return Err(CommandError::DeadlinePassed { deadline_unix_ms: deadline, now_unix_ms: now });
            }
        }
        let mut waiting = false;
        for &dependency in &spec.dependencies {
            let dep = self.tasks.get(&dependency).ok_or(CommandError::UnknownDependency(dependency))?;
            match dep.state {
                TaskState::Succeeded => {}
                state if state.is_finished() => {
                    return Err(CommandError::DependencyEnded { dependency, state });
                }
                _ => waiting = true,
            }
        }

        // Every check has passed: from here on the command only changes state.
        let id = TaskId(self.next_task_id);
        self.next_task_id += 1;
        let task = Task {
            id,
            spec: spec.clone(),
            state: if waiting { TaskState::Blocked } else { TaskState::Pending },
            attempt: 0,
            retries_used: 0,
            fencing_token: None,
            executor: None,
            not_before_unix_ms: 0,
            started_unix_ms: None,
            exit_code: None,
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            peak_memory_bytes: None,
            finish_seq: None,
            allocated: Resources::default(),
            created_unix_ms: now,
            updated_unix_ms: now,
            finished_unix_ms: None,
            reason: None,
        };
        for &dependency in &spec.dependencies {
            self.dependents.entry(dependency).or_default().insert(id);
        }
        if let Some(key) = &spec.idempotency_key {
            self.idempotency.insert(key.clone(), id);
        }
        if let Some(key) = pending_key(&task) {
            self.pending.insert(key);
        }
        if let Some(key) = deadline_key(&task) {
            self.deadlines.insert(key);
        }
        self.tasks.insert(id, task.clone());
        Ok(Outcome::Submitted { task, existing: false })
    }

    fn cancel(&mut self, id: TaskId, reason: &str) -> Result<Outcome, CommandError> {
        let task = self.task(id)?;
        if task.state.is_finished() {
            return Err(CommandError::AlreadyFinished { id, state: task.state });
        }
        check_text("reason", reason, self.limits.message_bytes_max)?;
        let reason = if reason.is_empty() { "cancelled by request".to_owned() } else { reason.to_owned() };
        let cascaded = self.end(id, TaskState::Cancelled, Some(reason));
        let task = self.task(id)?.clone();
        Ok(Outcome::Cancelled { task, cascaded })
    }

    fn init_ca(&mut self, ca: &ClusterCaRecord) -> Result<Outcome, CommandError> {
        if self.ca.is_some() {
            return Err(CommandError::CaExists);
        }
        check_text("CA certificate", &ca.cert_pem, self.limits.pem_bytes_max)?;
        check_text("CA key", &ca.key_pem, self.limits.pem_bytes_max)?;
        self.ca = Some(ca.clone());
        Ok(Outcome::CaInitialized)
    }

    fn create_join_token(&mut self, secret_hash: [u8; 32], expires_unix_ms: u64) -> Result<Outcome, CommandError> {
        let now = self.now_unix_ms;
        if expires_unix_ms <= now {
            return Err(CommandError::DeadlinePassed { deadline_unix_ms: expires_unix_ms, now_unix_ms: now });
        }
        let live = self.join_tokens.values().filter(|t| t.expires_unix_ms > now).count();
        if live >= self.limits.join_tokens_max {
            return Err(CommandError::TooMany { what: "join tokens".to_owned(), max: self.limits.join_tokens_max });
        }
        self.join_tokens.retain(|_, t| t.expires_unix_ms > now);
        self.join_tokens.insert(secret_hash, JoinTokenRecord { created_unix_ms: now, expires_unix_ms });
        Ok(Outcome::TokenCreated)
    }

    /// Whether a join token's secret hash names a live token.
    pub fn join_token_valid(&self, secret_hash: &[u8; 32]) -> bool {
        self.join_tokens.get(secret_hash).is_some_and(|t| t.expires_unix_ms > self.now_unix_ms)
    }

    fn admit_executor(
        &mut self,
        secret_hash: &[u8; 32],
        expected_id: ExecutorId,
        name: &str,
        cert_fingerprint: [u8; 32],
    ) -> Result<Outcome, CommandError> {
        if !self.join_token_valid(secret_hash) {
            return Err(CommandError::InvalidJoinToken);
        }
        crate::task::check_name("executor name", name, self.limits.name_bytes_max)?;
        if self.executors.len() >= self.limits.executors_max {
            return Err(CommandError::TooMany { what: "executors".to_owned(), max: self.limits.executors_max });
        }
        if expected_id.0 != self.next_executor_id {
            return Err(CommandError::AdmissionRaced { expected: expected_id });
        }
        let now = self.now_unix_ms;
        self.next_executor_id += 1;
        let spec = ExecutorSpec { name: name.to_owned(), capacity: Default::default(), labels: BTreeMap::new(), capabilities: BTreeSet::new() };
        let executor = Executor {
            id: expected_id,
            spec,
            cert_fingerprint,
            state: ExecutorState::Admitted,
            allocated: Default::default(),
            tasks: BTreeSet::new(),
            drain_deadline_unix_ms: None,
            admitted_unix_ms: now,
            updated_unix_ms: now,
            reason: None,
        };
        self.executors.insert(expected_id, executor);
        Ok(Outcome::Admitted { id: expected_id })
    }

    fn register_executor(&mut self, id: ExecutorId, spec: &ExecutorSpec) -> Result<Outcome, CommandError> {
        spec.validate(&self.limits)?;
        let now = self.now_unix_ms;
        let executor = self.executors.get_mut(&id).ok_or(CommandError::UnknownExecutor(id))?;
        if !executor.allocated.fits_in(&spec.capacity) {
            return Err(CommandError::CapacityBelowAllocated {
                id,
                capacity: spec.capacity.to_string(),
                allocated: executor.allocated.to_string(),
            });
        }
        let state = match executor.state {
            ExecutorState::Admitted | ExecutorState::Down | ExecutorState::Up => ExecutorState::Up,
            ExecutorState::Draining => ExecutorState::Draining,
        };
        let changed = executor.state != state || &executor.spec != spec;
        if changed {
            executor.state = state;
            executor.spec = spec.clone();
            executor.updated_unix_ms = now;
            if state == ExecutorState::Up {
                executor.reason = None;
            }
        }
        Ok(Outcome::Registered { id, changed })
    }

    fn mark_executor_down(&mut self, id: ExecutorId, reason: &str) -> Result<Outcome, CommandError> {
        check_text("reason", reason, self.limits.message_bytes_max)?;
        let executor = self.executors.get(&id).ok_or(CommandError::UnknownExecutor(id))?;
        if !matches!(executor.state, ExecutorState::Up | ExecutorState::Draining) {
            return Err(CommandError::ExecutorState { id, state: executor.state });
        }
        let held: Vec<TaskId> = executor.tasks.iter().copied().collect();
        let (mut rescheduled, mut lost) = (Vec::new(), Vec::new());
        for task in held {
            if self.retry_or_end(task, true, format!("executor {id} went down: {reason}")) {
                rescheduled.push(task);
            } else {
                lost.push(task);
            }
        }
        let now = self.now_unix_ms;
        if let Some(executor) = self.executors.get_mut(&id) {
            executor.state = ExecutorState::Down;
            executor.reason = Some(reason.to_owned());
            executor.updated_unix_ms = now;
        }
        Ok(Outcome::MarkedDown { id, rescheduled, lost })
    }

    fn drain_executor(&mut self, id: ExecutorId, deadline_unix_ms: u64) -> Result<Outcome, CommandError> {
        let now = self.now_unix_ms;
        let executor = self.executors.get_mut(&id).ok_or(CommandError::UnknownExecutor(id))?;
        if executor.state != ExecutorState::Up {
            return Err(CommandError::ExecutorState { id, state: executor.state });
        }
        executor.state = ExecutorState::Draining;
        executor.drain_deadline_unix_ms = Some(deadline_unix_ms);
        executor.reason = Some("drained by request".to_owned());
        executor.updated_unix_ms = now;
        Ok(Outcome::Draining { id })
    }

    fn place_tasks(&mut self, placements: &[Placement], unschedulable: &[(TaskId, String)]) -> Result<Outcome, CommandError> {
        let count = placements.len() + unschedulable.len();
        if count > self.limits.placements_max {
            return Err(CommandError::TooMany { what: "placements".to_owned(), max: self.limits.placements_max });
        }
        for (_, reason) in unschedulable {
            check_text("reason", reason, self.limits.message_bytes_max)?;
        }
        let (mut assigned, mut evicted, mut rejected) = (Vec::new(), Vec::new(), Vec::new());
        for placement in placements {
            match self.check_placement(placement) {
                Ok(()) => {
                    for &victim in &placement.evict {
                        self.evict(victim, format!("preempted by task {}", placement.task));
                        evicted.push(victim);
                    }
                    assigned.push(self.assign(placement.task, placement.executor, placement.memory_bytes));
                }
                Err(why) => rejected.push((placement.task, why)),
            }
        }
        for (id, reason) in unschedulable {
            if let Some(task) = self.tasks.get_mut(id) {
                if task.state == TaskState::Pending && task.reason.as_deref() != Some(reason.as_str()) {
                    task.reason = Some(reason.clone());
                }
            }
        }
        Ok(Outcome::Placed { assigned, evicted, rejected })
    }

    /// Re-validates a placement against the state now: the leader planned it against an older
    /// state, and anything may have changed since.
    fn check_placement(&self, placement: &Placement) -> Result<(), String> {
        let task = self.tasks.get(&placement.task).ok_or_else(|| format!("task {} does not exist", placement.task))?;
        if task.state != TaskState::Pending {
            return Err(format!("task {} is {}", task.id, task.state));
        }
        if task.not_before_unix_ms > self.now_unix_ms {
            return Err(format!("task {} is backing off until {}", task.id, task.not_before_unix_ms));
        }
        let executor = self.executors.get(&placement.executor).ok_or_else(|| format!("executor {} does not exist", placement.executor))?;
        if executor.state != ExecutorState::Up {
            return Err(format!("executor {} is {}", executor.id, executor.state));
        }
        if let Some(why) = constraint_mismatch(&task.spec, &executor.spec) {
            return Err(why);
        }
        let wanted = self.allocation_for(task, placement.memory_bytes)?;
        let mut free = executor.free();
        let mut seen = BTreeSet::new();
        for victim in &placement.evict {
            let held = executor.tasks.contains(victim) && seen.insert(*victim);
            let victim_task = self.tasks.get(victim).filter(|_| held).ok_or_else(|| format!("task {victim} is not held by executor {}", executor.id))?;
            if victim_task.spec.priority >= task.spec.priority {
                return Err(format!("task {victim} has priority {}, not below {}", victim_task.spec.priority, task.spec.priority));
            }
            free.add(&victim_task.allocated);
        }
        if !wanted.fits_in(&free) {
            return Err(format!("executor {} no longer has room for task {}", executor.id, task.id));
        }
        Ok(())
    }

    /// What a placement gives the task: its declared resources, with the planner's memory for a
    /// `memory_auto` task (at least the floor). A sized memory for any other task is refused.
    fn allocation_for(&self, task: &Task, memory_bytes: Option<u64>) -> Result<Resources, String> {
        let mut wanted = task.spec.resources.clone();
        match (task.spec.memory_auto, memory_bytes) {
            (false, None) => {}
            (false, Some(_)) => return Err(format!("task {} declares its memory; a placement cannot size it", task.id)),
            (true, None) => return Err(format!("task {} has memory auto; the placement must size it", task.id)),
            (true, Some(bytes)) if bytes < self.limits.memory_auto_floor_bytes => {
                return Err(format!("sized memory {bytes} is below the floor {}", self.limits.memory_auto_floor_bytes))
            }
            (true, Some(bytes)) => wanted.memory_bytes = bytes,
        }
        Ok(wanted)
    }

    fn assign(&mut self, id: TaskId, executor_id: ExecutorId, memory_bytes: Option<u64>) -> Assignment {
        let token = FencingToken(self.next_fencing_token);
        self.next_fencing_token += 1;
        self.set_state(id, TaskState::Assigned);
        let task = self.tasks.get_mut(&id).expect("assign is called only after check_placement found the task");
        task.attempt += 1;
        task.fencing_token = Some(token);
        task.executor = Some(executor_id);
        task.started_unix_ms = None;
        task.reason = None;
        if let Some(bytes) = memory_bytes.filter(|_| task.spec.memory_auto) {
            task.allocated = Resources { memory_bytes: bytes, ..task.spec.resources.clone() };
        } else {
            task.allocated = task.spec.resources.clone();
        }
        let (attempt, resources) = (task.attempt, task.allocated.clone());
        let executor = self.executors.get_mut(&executor_id).expect("assign is called only after check_placement found the executor");
        executor.tasks.insert(id);
        executor.allocated.add(&resources);
        assert!(executor.allocated.fits_in(&executor.spec.capacity), "executor {executor_id} over capacity after placing {id}");
        Assignment { task: id, executor: executor_id, attempt, token }
    }

    fn report(&mut self, executor: ExecutorId, id: TaskId, token: FencingToken, status: &AttemptStatus) -> Result<Outcome, CommandError> {
        if !self.executors.contains_key(&executor) {
            return Err(CommandError::UnknownExecutor(executor));
        }
        let task = self.task(id)?;
        let current = task.executor == Some(executor) && task.fencing_token == Some(token) && holds_resources(task.state);
        if !current {
            return Err(CommandError::StaleReport { task: id, executor, token });
        }
        let now = self.now_unix_ms;
        match status {
            AttemptStatus::Started => {
                if task.state == TaskState::Assigned {
                    self.set_state(id, TaskState::Running);
                    if let Some(task) = self.tasks.get_mut(&id) {
                        task.started_unix_ms = Some(now);
                    }
                }
            }
            AttemptStatus::Finished(result) => {
                check_text("stdout tail", &result.stdout_tail, self.limits.output_tail_bytes_max)?;
                check_text("stderr tail", &result.stderr_tail, self.limits.output_tail_bytes_max)?;
                check_text("message", &result.message, self.limits.message_bytes_max)?;
                if let Some(task) = self.tasks.get_mut(&id) {
                    task.exit_code = result.exit_code;
                    task.stdout_tail = result.stdout_tail.clone();
                    task.stderr_tail = result.stderr_tail.clone();
                    task.peak_memory_bytes = result.peak_memory_bytes;
                    task.started_unix_ms.get_or_insert(now);
                }
                let why = |default: String| if result.message.is_empty() { default } else { result.message.clone() };
                match result.outcome {
                    AttemptOutcome::Succeeded => {
                        self.end(id, TaskState::Succeeded, None);
                    }
                    AttemptOutcome::Failed => {
                        let default = result.exit_code.map_or_else(|| "attempt failed".to_owned(), |code| format!("exited with code {code}"));
                        self.retry_or_end(id, false, why(default));
                    }
                    AttemptOutcome::TimedOut => {
                        self.end(id, TaskState::TimedOut, Some(why("killed at its timeout".to_owned())));
                    }
                }
            }
        }
        Ok(Outcome::Reported { task: id, state: self.task(id)?.state })
    }

    fn expire_tasks(&mut self, ids: &[TaskId]) -> Outcome {
        let now = self.now_unix_ms;
        let mut expired = Vec::new();
        for &id in ids {
            let due = self
                .tasks
                .get(&id)
                .is_some_and(|t| matches!(t.state, TaskState::Blocked | TaskState::Pending) && t.spec.deadline_unix_ms.is_some_and(|d| d <= now));
            if due {
                self.end(id, TaskState::TimedOut, Some("not started by its deadline".to_owned()));
                expired.push(id);
            }
        }
        Outcome::Expired { ids: expired }
    }

    fn evict_tasks(&mut self, ids: &[TaskId], reason: &str) -> Result<Outcome, CommandError> {
        if ids.len() > self.limits.placements_max {
            return Err(CommandError::TooMany { what: "evictions".to_owned(), max: self.limits.placements_max });
        }
        check_text("reason", reason, self.limits.message_bytes_max)?;
        let mut evicted = Vec::new();
        for &id in ids {
            if self.tasks.get(&id).is_some_and(|t| holds_resources(t.state)) {
                self.evict(id, reason.to_owned());
                evicted.push(id);
            }
        }
        Ok(Outcome::Evicted { ids: evicted })
    }

    fn publish_model(&mut self, device: &str, feature_schema: &str, weights: &[u8], metrics: &ModelMetrics) -> Result<Outcome, CommandError> {
        check_text("device", device, self.limits.name_bytes_max)?;
        check_text("feature schema", feature_schema, self.limits.name_bytes_max)?;
        if weights.is_empty() || weights.len() > self.limits.model_weights_bytes_max {
            return Err(CommandError::TooLong { what: "model weights".to_owned(), len: weights.len(), max: self.limits.model_weights_bytes_max });
        }
        metrics.validate().map_err(CommandError::InvalidModel)?;
        let version = ModelVersion(self.next_model_version);
        self.next_model_version += 1;
        let record = ModelRecord {
            version,
            created_unix_ms: self.now_unix_ms,
            device: device.to_owned(),
            feature_schema: feature_schema.to_owned(),
            weights: weights.to_vec(),
            metrics: metrics.clone(),
        };
        self.models.insert(version, record);
        self.current_model = Some(version);
        while self.models.len() > self.limits.models_kept_max {
            let oldest = self.models.keys().copied().find(|v| Some(*v) != self.current_model);
            match oldest {
                Some(oldest) => self.models.remove(&oldest),
                None => break,
            };
        }
        Ok(Outcome::ModelPublished { version })
    }

    fn rollback_model(&mut self, version: ModelVersion) -> Result<Outcome, CommandError> {
        if !self.models.contains_key(&version) {
            return Err(CommandError::UnknownModel(version));
        }
        self.current_model = Some(version);
        Ok(Outcome::ModelRolledBack { version })
    }

    /// Moves a task between states, keeping the pending and deadline indexes exact.
    fn set_state(&mut self, id: TaskId, state: TaskState) {
        let now = self.now_unix_ms;
        let Some(task) = self.tasks.get_mut(&id) else { return };
        assert!(!task.state.is_finished(), "task {id} changed state after finishing: {} then {state}", task.state);
        if let Some(key) = pending_key(task) {
            self.pending.remove(&key);
        }
        if let Some(key) = deadline_key(task) {
            self.deadlines.remove(&key);
        }
        task.state = state;
        task.updated_unix_ms = now;
        if state.is_finished() {
            let seq = self.next_finish_seq;
            self.next_finish_seq += 1;
            task.finish_seq = Some(seq);
            self.finished_order.insert(seq, id);
            while self.finished_order.len() > self.limits.finished_order_kept_max {
                self.finished_order.pop_first();
            }
        }
        if let Some(key) = pending_key(task) {
            self.pending.insert(key);
        }
        if let Some(key) = deadline_key(task) {
            self.deadlines.insert(key);
        }
    }

    /// Gives back what the task's current attempt holds on its executor.
    fn release(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else { return };
        if !holds_resources(task.state) {
            return;
        }
        if let Some(executor) = task.executor.and_then(|e| self.executors.get_mut(&e)) {
            if executor.tasks.remove(&id) {
                executor.allocated.sub(&task.allocated);
            }
        }
    }

    /// Stops the current attempt and returns the task to pending without spending a retry.
    fn evict(&mut self, id: TaskId, reason: String) {
        self.release(id);
        self.set_state(id, TaskState::Pending);
        if let Some(task) = self.tasks.get_mut(&id) {
            task.reason = Some(reason);
        }
    }

    /// After a failed or lost attempt: back to pending after a backoff if retries remain
    /// (returns true), else the task ends failed or lost.
    fn retry_or_end(&mut self, id: TaskId, lost: bool, reason: String) -> bool {
        let Some(task) = self.tasks.get(&id) else { return false };
        if task.retries_used >= task.spec.max_retries {
            let state = if lost { TaskState::Lost } else { TaskState::Failed };
            self.end(id, state, Some(reason));
            return false;
        }
        let retries_used = task.retries_used + 1;
        let shift = (retries_used - 1).min(20);
        let backoff = self.limits.retry_backoff_ms_base.saturating_mul(1 << shift).min(self.limits.retry_backoff_ms_max);
        let now = self.now_unix_ms;
        self.release(id);
        self.set_state(id, TaskState::Pending);
        if let Some(task) = self.tasks.get_mut(&id) {
            task.retries_used = retries_used;
            task.not_before_unix_ms = now.saturating_add(backoff);
            task.reason = Some(format!("retry {retries_used} of {}: {reason}", task.spec.max_retries));
        }
        true
    }

    /// Ends a task. Success releases dependents whose dependencies have all succeeded; any other
    /// end cancels every unfinished dependent, transitively. Returns the tasks cancelled so.
    fn end(&mut self, id: TaskId, state: TaskState, reason: Option<String>) -> Vec<TaskId> {
        self.release(id);
        self.set_state(id, state);
        let now = self.now_unix_ms;
        if let Some(task) = self.tasks.get_mut(&id) {
            task.finished_unix_ms = Some(now);
            task.reason = reason;
        }
        let mut cascaded = Vec::new();
        if state == TaskState::Succeeded {
            let dependents: Vec<TaskId> = self.dependents.get(&id).into_iter().flatten().copied().collect();
            for dependent in dependents {
                let ready = self.tasks.get(&dependent).is_some_and(|t| {
                    t.state == TaskState::Blocked
                        && t.spec.dependencies.iter().all(|d| self.tasks.get(d).is_some_and(|d| d.state == TaskState::Succeeded))
                });
                if ready {
                    self.set_state(dependent, TaskState::Pending);
                }
            }
            return cascaded;
        }
        let mut queue: VecDeque<TaskId> = VecDeque::from([id]);
        while let Some(ended) = queue.pop_front() {
            let dependents: Vec<TaskId> = self.dependents.get(&ended).into_iter().flatten().copied().collect();
            for dependent in dependents {
                let unfinished = self.tasks.get(&dependent).is_some_and(|t| !t.state.is_finished());
                if unfinished {
                    self.release(dependent);
                    self.set_state(dependent, TaskState::Cancelled);
                    if let Some(task) = self.tasks.get_mut(&dependent) {
                        task.finished_unix_ms = Some(now);
                        let how = if ended == id { state } else { TaskState::Cancelled };
                        task.reason = Some(format!("dependency {ended} ended {how}"));
                    }
                    cascaded.push(dependent);
                    queue.push_back(dependent);
                }
            }
        }
        cascaded
    }

    fn task(&self, id: TaskId) -> Result<&Task, CommandError> {
        self.tasks.get(&id).ok_or(CommandError::UnknownTask(id))
    }

    pub fn get_task(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id)
    }

    pub fn get_executor(&self, id: ExecutorId) -> Option<&Executor> {
        self.executors.get(&id)
    }

    pub fn executors(&self) -> impl Iterator<Item = &Executor> {
        self.executors.values()
    }

    pub fn executor_count(&self) -> usize {
        self.executors.len()
    }

    /// The id the next admitted executor gets.
    pub fn next_executor_id(&self) -> ExecutorId {
        ExecutorId(self.next_executor_id)
    }

    pub fn ca(&self) -> Option<&ClusterCaRecord> {
        self.ca.as_ref()
    }

    pub fn models(&self) -> impl Iterator<Item = &ModelRecord> {
        self.models.values()
    }

    pub fn model(&self, version: ModelVersion) -> Option<&ModelRecord> {
        self.models.get(&version)
    }

    pub fn current_model(&self) -> Option<&ModelRecord> {
        self.current_model.and_then(|v| self.models.get(&v))
    }

    /// Finished tasks after finish sequence number `after_seq`, in the order they finished.
    pub fn finished_after(&self, after_seq: u64) -> impl Iterator<Item = (u64, &Task)> + '_ {
        self.finished_order.range(after_seq.saturating_add(1)..).filter_map(|(&seq, id)| self.tasks.get(id).map(|t| (seq, t)))
    }

    /// Pending tasks in scheduling order.
    pub fn pending(&self) -> impl Iterator<Item = &Task> {
        self.pending.iter().filter_map(|key| self.tasks.get(&key.id))
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Blocked or pending tasks whose deadline is at or before `now_unix_ms`.
    pub fn overdue(&self, now_unix_ms: u64) -> impl Iterator<Item = TaskId> + '_ {
        self.deadlines.range(..=(now_unix_ms, TaskId(u64::MAX))).map(|&(_, id)| id)
    }

    /// Tasks in id order, filtered and paged.
    pub fn list_tasks(&self, filter: &TaskFilter) -> Vec<Task> {
        let start = filter.after.map_or(0, |after| after.0.saturating_add(1));
        self.tasks
            .range(TaskId(start)..)
            .map(|(_, task)| task)
            .filter(|task| filter.state.is_none_or(|state| task.state == state))
            .take(filter.limit)
            .cloned()
            .collect()
    }

    /// Tasks whose dependents are listed, for `task get`.
    pub fn dependents_of(&self, id: TaskId) -> impl Iterator<Item = TaskId> + '_ {
        self.dependents.get(&id).into_iter().flatten().copied()
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// How many tasks are in each state (every state present, zero or not).
    pub fn count_by_state(&self) -> BTreeMap<TaskState, u64> {
        let mut counts: BTreeMap<TaskState, u64> = TaskState::ALL.iter().map(|&s| (s, 0)).collect();
        for task in self.tasks.values() {
            *counts.entry(task.state).or_default() += 1;
        }
        counts
    }

    /// Checks every invariant over the whole state; tests call it after every command.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (&id, task) in &self.tasks {
            if id != task.id {
                return Err(format!("task stored under {id} has id {}", task.id));
            }
            if id.0 == 0 || id.0 >= self.next_task_id {
                return Err(format!("task {id} is outside 1..{}", self.next_task_id));
            }
            let mut unfinished_dependency = false;
            for dep in &task.spec.dependencies {
                let Some(dependency) = self.tasks.get(dep) else {
                    return Err(format!("task {id} depends on missing task {dep}"));
                };
                if dep >= &id {
                    return Err(format!("task {id} depends on later task {dep}: a cycle is possible"));
                }
                if !self.dependents.get(dep).is_some_and(|set| set.contains(&id)) {
                    return Err(format!("dependents index misses {dep} -> {id}"));
                }
                if dependency.state != TaskState::Succeeded {
                    unfinished_dependency = true;
                }
                let dependency_failed = dependency.state.is_finished() && dependency.state != TaskState::Succeeded;
                if dependency_failed && !task.state.is_finished() {
                    return Err(format!("task {id} is {} but its dependency {dep} ended {}", task.state, dependency.state));
                }
            }
            match task.state {
                TaskState::Blocked if !unfinished_dependency => {
                    return Err(format!("task {id} is blocked with every dependency succeeded"));
                }
                TaskState::Pending | TaskState::Assigned | TaskState::Running if unfinished_dependency => {
                    return Err(format!("task {id} is {} before its dependencies succeeded", task.state));
                }
                _ => {}
            }
            if task.state.is_finished() != task.finished_unix_ms.is_some() {
                return Err(format!("task {id} is {} with finished time {:?}", task.state, task.finished_unix_ms));
            }
            if task.updated_unix_ms > self.now_unix_ms || task.created_unix_ms > task.updated_unix_ms {
                return Err(format!("task {id} has times from the future"));
            }
        }
        self.check_indexes()?;
        self.check_executors()?;
        for (key, id) in &self.idempotency {
            let matches = self.tasks.get(id).is_some_and(|t| t.spec.idempotency_key.as_deref() == Some(key));
            if !matches {
                return Err(format!("idempotency key {key:?} points at {id}, which does not carry it"));
            }
        }
        for (dep, dependents) in &self.dependents {
            for dependent in dependents {
                let named = self.tasks.get(dependent).is_some_and(|t| t.spec.dependencies.contains(dep));
                if !named {
                    return Err(format!("dependents index has {dep} -> {dependent}, which the task does not name"));
                }
            }
        }
        Ok(())
    }

    fn check_indexes(&self) -> Result<(), String> {
        let pending: BTreeSet<PendingKey> = self.tasks.values().filter_map(pending_key).collect();
        if pending != self.pending {
            return Err(format!("pending index has {} entries for {} pending tasks", self.pending.len(), pending.len()));
        }
        let deadlines: BTreeSet<(u64, TaskId)> = self.tasks.values().filter_map(deadline_key).collect();
        if deadlines != self.deadlines {
            return Err("deadline index differs from the tasks".to_owned());
        }
        Ok(())
    }

    /// Per executor: allocated is exactly the sum of what its tasks hold and never more than
    /// its capacity; every assigned or running task is held by exactly the executor it names.
    fn check_executors(&self) -> Result<(), String> {
        for (&id, executor) in &self.executors {
            if id != executor.id || id.0 == 0 || id.0 >= self.next_executor_id {
                return Err(format!("executor stored under {id} has id {}", executor.id));
            }
            let mut sum = crate::resources::Resources::default();
            for task_id in &executor.tasks {
                let task = self.tasks.get(task_id).ok_or_else(|| format!("executor {id} holds missing task {task_id}"))?;
                if !holds_resources(task.state) || task.executor != Some(id) {
                    return Err(format!("executor {id} holds task {task_id}, which is {} on {:?}", task.state, task.executor));
                }
                sum.add(&task.allocated);
            }
            if sum != executor.allocated {
                return Err(format!("executor {id} records {} allocated but its tasks hold {sum}", executor.allocated));
            }
            if !executor.allocated.fits_in(&executor.spec.capacity) {
                return Err(format!("executor {id} is over capacity: {} allocated of {}", executor.allocated, executor.spec.capacity));
            }
            if matches!(executor.state, ExecutorState::Down | ExecutorState::Admitted) && !executor.tasks.is_empty() {
                return Err(format!("executor {id} is {} but holds tasks", executor.state));
            }
        }
        for (&id, task) in &self.tasks {
            if let Some(token) = task.fencing_token {
                if token.0 == 0 || token.0 >= self.next_fencing_token {
                    return Err(format!("task {id} has token {token} outside 1..{}", self.next_fencing_token));
                }
            }
            if holds_resources(task.state) {
                let held = task.executor.and_then(|e| self.executors.get(&e)).is_some_and(|e| e.tasks.contains(&id));
                if !held || task.fencing_token.is_none() {
                    return Err(format!("task {id} is {} but no executor holds it", task.state));
                }
            }
        }
        Ok(())
    }
}

/// Why an executor can never run a task, whatever it holds: a missing capability or label.
pub fn constraint_mismatch(task: &TaskSpec, executor: &ExecutorSpec) -> Option<String> {
    if let Some(capability) = task.capabilities.iter().find(|c| !executor.capabilities.contains(*c)) {
        return Some(format!("capability {capability}"));
    }
    task.labels
        .iter()
        .find(|(key, value)| executor.labels.get(*key) != Some(*value))
        .map(|(key, value)| format!("label {key}={value}"))
}
