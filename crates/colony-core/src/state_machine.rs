//! The replicated state machine: `apply(command) -> result`, deterministic on every replica.
//!
//! Time comes in with the proposal (`now_unix_ms`, stamped by the leader); nothing here reads a
//! clock, a random number generator or a file. A command that would break an invariant is
//! rejected with a typed error and changes nothing.

use crate::ids::TaskId;
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
}

impl Default for StateMachine {
    fn default() -> Self {
        StateMachine::new()
    }
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
            fencing_token: None,
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
        self.tasks.insert(id, task.clone());
        Ok(Outcome::Submitted { task, existing: false })
    }

    fn cancel(&mut self, id: TaskId, reason: &str) -> Result<Outcome, CommandError> {
        let task = self.task(id)?;
        if task.state.is_finished() {
            return Err(CommandError::AlreadyFinished { id, state: task.state });
        }
        let reason = if reason.is_empty() { "cancelled by request".to_owned() } else { reason.to_owned() };
        self.finish(id, TaskState::Cancelled, reason);
        let mut cascaded = Vec::new();
        let mut queue: VecDeque<TaskId> = VecDeque::from([id]);
        while let Some(ended) = queue.pop_front() {
            let dependents: Vec<TaskId> = self.dependents.get(&ended).into_iter().flatten().copied().collect();
            for dependent in dependents {
                let unfinished = self.tasks.get(&dependent).is_some_and(|t| !t.state.is_finished());
                if unfinished {
                    self.finish(dependent, TaskState::Cancelled, format!("dependency {ended} was cancelled"));
                    cascaded.push(dependent);
                    queue.push_back(dependent);
                }
            }
        }
        let task = self.task(id)?.clone();
        Ok(Outcome::Cancelled { task, cascaded })
    }

    fn finish(&mut self, id: TaskId, state: TaskState, reason: String) {
        let now = self.now_unix_ms;
        if let Some(task) = self.tasks.get_mut(&id) {
            assert!(!task.state.is_finished(), "task {id} finished twice: {} then {state}", task.state);
            task.state = state;
            task.updated_unix_ms = now;
            task.finished_unix_ms = Some(now);
            task.reason = Some(reason);
        }
    }

    fn task(&self, id: TaskId) -> Result<&Task, CommandError> {
        self.tasks.get(&id).ok_or(CommandError::UnknownTask(id))
    }

    pub fn get_task(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id)
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
}
