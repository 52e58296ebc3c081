//! The whole-state invariant check: every index exact, every executor's allocation the sum of what
//! its tasks hold, every counter ahead of what it numbered. It walks the whole state, so it runs
//! in tests and where a store turns it on, never on the ordinary release apply path.

use super::{deadline_key, holds_resources, pending_key, PendingKey, StateMachine};
use crate::executor::ExecutorState;
use crate::ids::{ExecutorId, FencingToken, ModelVersion, TaskId, WorkflowId};
use crate::resources::Resources;
use crate::task::TaskState;
use crate::workflow::{StepState, WorkflowState};
use imbl::{OrdMap, OrdSet};

/// A broken invariant: the state is corrupt, and whoever holds it must stop, not limp on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvariantViolation {
    #[error("messaging: {0}")]
    Messaging(String),
    #[error("agents: {0}")]
    Agents(String),
    #[error("the ACL token index does not mirror the tokens (accessor {accessor:?})")]
    AclIndex { accessor: String },
    #[error("task stored under {key} has id {id}")]
    TaskKey { key: TaskId, id: TaskId },
    #[error("task {id} is outside 1..{next}")]
    TaskIdRange { id: TaskId, next: u64 },
    #[error("task {task} depends on missing task {dependency}")]
    MissingDependency { task: TaskId, dependency: TaskId },
    #[error("task {task} depends on later task {dependency}: a cycle is possible")]
    LaterDependency { task: TaskId, dependency: TaskId },
    #[error("dependents index misses {dependency} -> {task}")]
    DependentMissing { dependency: TaskId, task: TaskId },
    #[error("dependents index has {dependency} -> {task}, which the task does not name")]
    DependentExtra { dependency: TaskId, task: TaskId },
    #[error("task {task} is {state} but its dependency {dependency} ended {dependency_state}")]
    DependencyEnded {
        task: TaskId,
        state: TaskState,
        dependency: TaskId,
        dependency_state: TaskState,
    },
    #[error("task {task} is blocked with every dependency succeeded")]
    BlockedForNothing { task: TaskId },
    #[error("task {task} is {state} before its dependencies succeeded")]
    RunnableTooEarly { task: TaskId, state: TaskState },
    #[error("task {task} is {state} with finished time {finished_unix_ms:?}")]
    FinishedTime { task: TaskId, state: TaskState, finished_unix_ms: Option<u64> },
    #[error("task {task} has times from the future (created {created_unix_ms}, updated {updated_unix_ms}, now {now_unix_ms})")]
    FutureTime { task: TaskId, created_unix_ms: u64, updated_unix_ms: u64, now_unix_ms: u64 },
    #[error("idempotency key {key:?} points at {task}, which does not carry it")]
    IdempotencyKey { key: String, task: TaskId },
    #[error("pending index has {indexed} entries for {pending} pending tasks")]
    PendingIndex { indexed: usize, pending: usize },
    #[error("deadline index has {indexed} entries for {waiting} waiting tasks with a deadline")]
    DeadlineIndex { indexed: usize, waiting: usize },
    #[error("state index or counts disagree with the tasks ({indexed} indexed, {tasks} tasks)")]
    StateIndex { indexed: usize, tasks: usize },
    #[error("finish-order index has {indexed} entries for {finished} finished tasks (next sequence number {next}, removed through {removed_through})")]
    FinishedIndex { indexed: usize, finished: usize, next: u64, removed_through: u64 },
    #[error("executor stored under {key} has id {id} (next id {next})")]
    ExecutorKey { key: ExecutorId, id: ExecutorId, next: u64 },
    #[error("executor {executor} holds missing task {task}")]
    HeldTaskMissing { executor: ExecutorId, task: TaskId },
    #[error("executor {executor} holds task {task}, which is {state} on {holder:?}")]
    HeldTaskElsewhere {
        executor: ExecutorId,
        task: TaskId,
        state: TaskState,
        holder: Option<ExecutorId>,
    },
    #[error("executor {executor} records {recorded} allocated but its tasks hold {held}")]
    Allocation { executor: ExecutorId, recorded: Resources, held: Resources },
    #[error("executor {executor} is over capacity: {allocated} allocated of {capacity}")]
    OverCapacity { executor: ExecutorId, allocated: Resources, capacity: Resources },
    #[error("executor {executor} is {state} but holds tasks")]
    IdleExecutorHolds { executor: ExecutorId, state: ExecutorState },
    #[error("task {task} has token {token} outside 1..{next}")]
    TokenRange { task: TaskId, token: FencingToken, next: u64 },
    #[error("task {task} is {state} but no executor holds it")]
    Unheld { task: TaskId, state: TaskState },
    #[error("model stored under {key} has version {version} (next version {next})")]
    ModelKey { key: ModelVersion, version: ModelVersion, next: u64 },
    #[error("the current model {version} is not in the registry")]
    CurrentModelMissing { version: ModelVersion },
    #[error("task {task} has outputs or a workflow step but is not kept")]
    OrphanTaskData { task: TaskId },
    #[error("task {task} runs a step of missing workflow {workflow}")]
    StepWorkflowMissing { task: TaskId, workflow: WorkflowId },
    #[error("workflow {workflow} counts {recorded} kept tasks but {linked} are linked to it")]
    WorkflowTaskCount { workflow: WorkflowId, recorded: u64, linked: u64 },
    #[error("workflow {workflow} is {state} but step {step} is {step_state}")]
    WorkflowStepState {
        workflow: WorkflowId,
        state: WorkflowState,
        step: String,
        step_state: StepState,
    },
    #[error("task {task} of a running workflow {workflow} has been forgotten")]
    WorkflowTaskForgotten { workflow: WorkflowId, task: TaskId },
}

impl StateMachine {
    /// Checks every invariant over the whole state. Tests call it after every command; a store
    /// that enables it calls it after every applied proposal.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        self.check_tasks()?;
        self.check_indexes()?;
        self.check_executors()?;
        self.check_models()?;
        self.check_workflows()?;
        self.messaging.check().map_err(InvariantViolation::Messaging)?;
        self.check_agents().map_err(InvariantViolation::Agents)?;
        self.check_acl()
    }

    fn check_workflows(&self) -> Result<(), InvariantViolation> {
        for &task in self.outputs.keys().chain(self.task_steps.keys()) {
            if !self.tasks.contains_key(&task) {
                return Err(InvariantViolation::OrphanTaskData { task });
            }
        }
        let mut linked: OrdMap<WorkflowId, u64> = OrdMap::new();
        for (&task, link) in &self.task_steps {
            if !self.workflows.contains_key(&link.workflow) {
                return Err(InvariantViolation::StepWorkflowMissing {
                    task,
                    workflow: link.workflow,
                });
            }
            *linked.entry(link.workflow).or_default() += 1;
        }
        for (&id, workflow) in &self.workflows {
            let count = linked.get(&id).copied().unwrap_or(0);
            if count != workflow.tasks_kept {
                return Err(InvariantViolation::WorkflowTaskCount {
                    workflow: id,
                    recorded: workflow.tasks_kept,
                    linked: count,
                });
            }
            for (step, run) in workflow.spec.steps.iter().zip(&workflow.steps) {
                // A finished workflow has no step still going; a running one keeps its tasks.
                let bad = match workflow.state {
                    WorkflowState::Running => false,
                    _ => !run.state.is_finished(),
                };
                if bad {
                    return Err(InvariantViolation::WorkflowStepState {
                        workflow: id,
                        state: workflow.state,
                        step: step.name.clone(),
                        step_state: run.state,
                    });
                }
                if workflow.state == WorkflowState::Running {
                    if let Some(&task) = run.tasks.iter().find(|t| !self.tasks.contains_key(*t)) {
                        return Err(InvariantViolation::WorkflowTaskForgotten {
                            workflow: id,
                            task,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn check_acl(&self) -> Result<(), InvariantViolation> {
        if self.acl_by_secret.len() != self.acl_tokens.len() {
            let accessor = String::from("<count differs>");
            return Err(InvariantViolation::AclIndex { accessor });
        }
        for (accessor, token) in &self.acl_tokens {
            if &token.accessor != accessor
                || self.acl_by_secret.get(&token.secret_hash) != Some(accessor)
            {
                return Err(InvariantViolation::AclIndex { accessor: accessor.clone() });
            }
        }
        Ok(())
    }

    fn check_tasks(&self) -> Result<(), InvariantViolation> {
        for (&id, task) in &self.tasks {
            if id != task.id {
                return Err(InvariantViolation::TaskKey { key: id, id: task.id });
            }
            if id.0 == 0 || id.0 >= self.next_task_id {
                return Err(InvariantViolation::TaskIdRange { id, next: self.next_task_id });
            }
            let mut unfinished_dependency = false;
            for &dep in &task.spec.dependencies {
                if dep >= id {
                    return Err(InvariantViolation::LaterDependency { task: id, dependency: dep });
                }
                let Some(dependency) = self.tasks.get(&dep) else {
                    // Retention removes a finished task once nothing unfinished depends on it.
                    if task.state.is_finished() {
                        continue;
                    }
                    return Err(InvariantViolation::MissingDependency {
                        task: id,
                        dependency: dep,
                    });
                };
                if !self.dependents.get(&dep).is_some_and(|set| set.contains(&id)) {
                    return Err(InvariantViolation::DependentMissing { dependency: dep, task: id });
                }
                if dependency.state != TaskState::Succeeded {
                    unfinished_dependency = true;
                }
                let dependency_failed =
                    dependency.state.is_finished() && dependency.state != TaskState::Succeeded;
                if dependency_failed && !task.state.is_finished() {
                    return Err(InvariantViolation::DependencyEnded {
                        task: id,
                        state: task.state,
                        dependency: dep,
                        dependency_state: dependency.state,
                    });
                }
            }
            match task.state {
                TaskState::Blocked if !unfinished_dependency => {
                    return Err(InvariantViolation::BlockedForNothing { task: id });
                }
                TaskState::Pending | TaskState::Assigned | TaskState::Running
                    if unfinished_dependency =>
                {
                    return Err(InvariantViolation::RunnableTooEarly {
                        task: id,
                        state: task.state,
                    });
                }
                _ => {}
            }
            if task.state.is_finished() != task.finished_unix_ms.is_some() {
                return Err(InvariantViolation::FinishedTime {
                    task: id,
                    state: task.state,
                    finished_unix_ms: task.finished_unix_ms,
                });
            }
            if task.updated_unix_ms > self.now_unix_ms
                || task.created_unix_ms > task.updated_unix_ms
            {
                return Err(InvariantViolation::FutureTime {
                    task: id,
                    created_unix_ms: task.created_unix_ms,
                    updated_unix_ms: task.updated_unix_ms,
                    now_unix_ms: self.now_unix_ms,
                });
            }
        }
        for (key, &id) in &self.idempotency {
            let matches =
                self.tasks.get(&id).is_some_and(|t| t.spec.idempotency_key.as_deref() == Some(key));
            if !matches {
                return Err(InvariantViolation::IdempotencyKey { key: key.clone(), task: id });
            }
        }
        for (&dep, dependents) in &self.dependents {
            for &dependent in dependents {
                let named =
                    self.tasks.get(&dependent).is_some_and(|t| t.spec.dependencies.contains(&dep));
                if !named {
                    return Err(InvariantViolation::DependentExtra {
                        dependency: dep,
                        task: dependent,
                    });
                }
            }
        }
        Ok(())
    }

    fn check_indexes(&self) -> Result<(), InvariantViolation> {
        let pending: OrdSet<PendingKey> = self.tasks.values().filter_map(pending_key).collect();
        if pending != self.pending {
            return Err(InvariantViolation::PendingIndex {
                indexed: self.pending.len(),
                pending: pending.len(),
            });
        }
        let deadlines: OrdSet<(u64, TaskId)> =
            self.tasks.values().filter_map(deadline_key).collect();
        if deadlines != self.deadlines {
            return Err(InvariantViolation::DeadlineIndex {
                indexed: self.deadlines.len(),
                waiting: deadlines.len(),
            });
        }
        let by_state: OrdSet<(TaskState, TaskId)> =
            self.tasks.values().map(|t| (t.state, t.id)).collect();
        let mut counts = [0u64; TaskState::ALL.len()];
        for task in self.tasks.values() {
            counts[task.state as usize] += 1;
        }
        if by_state != self.by_state || counts != self.state_counts {
            return Err(InvariantViolation::StateIndex {
                indexed: self.by_state.len(),
                tasks: self.tasks.len(),
            });
        }
        let finished: OrdMap<u64, TaskId> = self
            .tasks
            .values()
            .filter(|t| t.state.is_finished())
            .map(|t| (t.finish_seq.unwrap_or(0), t.id))
            .collect();
        let numbered = finished.keys().all(|&seq| seq > 0 && seq < self.next_finish_seq);
        if finished != self.finished_order
            || !numbered
            || self.finished_removed_through >= self.next_finish_seq
        {
            return Err(InvariantViolation::FinishedIndex {
                indexed: self.finished_order.len(),
                finished: finished.len(),
                next: self.next_finish_seq,
                removed_through: self.finished_removed_through,
            });
        }
        Ok(())
    }

    /// Per executor: allocated is exactly the sum of what its tasks hold and never more than
    /// its capacity; every assigned or running task is held by exactly the executor it names.
    fn check_executors(&self) -> Result<(), InvariantViolation> {
        for (&id, executor) in &self.executors {
            if id != executor.id || id.0 == 0 || id.0 >= self.next_executor_id {
                return Err(InvariantViolation::ExecutorKey {
                    key: id,
                    id: executor.id,
                    next: self.next_executor_id,
                });
            }
            let mut sum = Resources::default();
            for &task_id in &executor.tasks {
                let task = self
                    .tasks
                    .get(&task_id)
                    .ok_or(InvariantViolation::HeldTaskMissing { executor: id, task: task_id })?;
                if !holds_resources(task.state) || task.executor != Some(id) {
                    return Err(InvariantViolation::HeldTaskElsewhere {
                        executor: id,
                        task: task_id,
                        state: task.state,
                        holder: task.executor,
                    });
                }
                sum.add(&task.allocated);
            }
            if sum != executor.allocated {
                return Err(InvariantViolation::Allocation {
                    executor: id,
                    recorded: executor.allocated.clone(),
                    held: sum,
                });
            }
            if !executor.allocated.fits_in(&executor.spec.capacity) {
                return Err(InvariantViolation::OverCapacity {
                    executor: id,
                    allocated: executor.allocated.clone(),
                    capacity: executor.spec.capacity.clone(),
                });
            }
            if matches!(executor.state, ExecutorState::Down | ExecutorState::Admitted)
                && !executor.tasks.is_empty()
            {
                return Err(InvariantViolation::IdleExecutorHolds {
                    executor: id,
                    state: executor.state,
                });
            }
        }
        for (&id, task) in &self.tasks {
            if let Some(token) = task.fencing_token {
                if token.0 == 0 || token.0 >= self.next_fencing_token {
                    return Err(InvariantViolation::TokenRange {
                        task: id,
                        token,
                        next: self.next_fencing_token,
                    });
                }
            }
            if holds_resources(task.state) {
                let held = task
                    .executor
                    .and_then(|e| self.executors.get(&e))
                    .is_some_and(|e| e.tasks.contains(&id));
                if !held || task.fencing_token.is_none() {
                    return Err(InvariantViolation::Unheld { task: id, state: task.state });
                }
            }
        }
        Ok(())
    }

    /// Model versions come from one counter, and the current model is always one the registry
    /// keeps (pruning never removes it).
    fn check_models(&self) -> Result<(), InvariantViolation> {
        for (&version, model) in &self.models {
            if version != model.version || version.0 == 0 || version.0 >= self.next_model_version {
                return Err(InvariantViolation::ModelKey {
                    key: version,
                    version: model.version,
                    next: self.next_model_version,
                });
            }
        }
        match self.current_model {
            Some(version) if !self.models.contains_key(&version) => {
                Err(InvariantViolation::CurrentModelMissing { version })
            }
            _ => Ok(()),
        }
    }
}
