//! Scheduling rounds as they commit: each placement is re-validated against the state at commit
//! time (the leader planned it against an older one), then its evictions and its assignment are
//! applied; a refused placement is reported with a typed `PlacementRejection` and changes nothing.

use super::{check_text, StateMachine};
use super::{Assignment, CommandError, Outcome, Placement};
use crate::executor::{ExecutorSpec, ExecutorState};
use crate::ids::{ExecutorId, FencingToken, TaskId};
use crate::resources::{format_memory_bytes, ResourceKind, Resources};
use crate::task::{Task, TaskSpec, TaskState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Why `apply` refused one placement of a scheduling round. The task stays as it was (pending, if
/// it was); the leader plans again against the newer state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PlacementRejection {
    #[error("task {task} does not exist")]
    UnknownTask { task: TaskId },
    #[error("task {task} is {state}")]
    TaskNotPending { task: TaskId, state: TaskState },
    #[error("task {task} is backing off until {not_before_unix_ms}")]
    BackingOff { task: TaskId, not_before_unix_ms: u64 },
    #[error("executor {executor} does not exist")]
    UnknownExecutor { executor: ExecutorId },
    #[error("executor {executor} is {state}")]
    ExecutorNotUp { executor: ExecutorId, state: ExecutorState },
    #[error("executor {executor} cannot run task {task}: it lacks {mismatch}")]
    ConstraintMismatch { task: TaskId, executor: ExecutorId, mismatch: ConstraintMismatch },
    #[error("task {victim} is not held by executor {executor}")]
    VictimNotHeld { victim: TaskId, executor: ExecutorId },
    #[error("task {victim} has priority {victim_priority}, not below {priority}")]
    VictimNotLower { victim: TaskId, victim_priority: u16, priority: u16 },
    #[error(
        "executor {executor} no longer has room for task {task}: it asks {} {resource}, {} free",
        .resource.format(*.requested),
        .resource.format(*.free)
    )]
    Insufficient {
        task: TaskId,
        executor: ExecutorId,
        resource: ResourceKind,
        requested: u64,
        free: u64,
    },
    #[error("task {task} declares its memory; a placement cannot size it")]
    MemorySizedButDeclared { task: TaskId },
    #[error("task {task} has memory auto; the placement must size it")]
    MemoryNotSized { task: TaskId },
    #[error("sized memory {} for task {task} is below the floor {}", format_memory_bytes(*.memory_bytes), format_memory_bytes(*.floor_bytes))]
    MemoryBelowFloor { task: TaskId, memory_bytes: u64, floor_bytes: u64 },
}

/// Why an executor can never run a task, whatever it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ConstraintMismatch {
    #[error("capability {capability}")]
    Capability { capability: String },
    #[error("label {key}={value}")]
    Label { key: String, value: String },
}

/// Why an executor can never run a task, whatever it holds: a missing capability or label.
pub fn constraint_mismatch(task: &TaskSpec, executor: &ExecutorSpec) -> Option<ConstraintMismatch> {
    if let Some(capability) = task.capabilities.iter().find(|c| !executor.capabilities.contains(*c))
    {
        return Some(ConstraintMismatch::Capability { capability: capability.clone() });
    }
    task.labels
        .iter()
        .find(|(key, value)| executor.labels.get(*key) != Some(*value))
        .map(|(key, value)| ConstraintMismatch::Label { key: key.clone(), value: value.clone() })
}

impl StateMachine {
    pub(super) fn place_tasks(
        &mut self,
        placements: &[Placement],
        unschedulable: &[(TaskId, String)],
    ) -> Result<Outcome, CommandError> {
        let count = placements.len() + unschedulable.len();
        if count > self.limits.placements_max {
            return Err(CommandError::TooMany {
                what: "placements".to_owned(),
                max: self.limits.placements_max,
            });
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
                    assigned.push(self.assign(
                        placement.task,
                        placement.executor,
                        placement.memory_bytes,
                    ));
                }
                Err(why) => rejected.push((placement.task, why)),
            }
        }
        for (id, reason) in unschedulable {
            if let Some(task) = self.tasks.get_mut(id) {
                if task.state == TaskState::Pending
                    && task.reason.as_deref() != Some(reason.as_str())
                {
                    task.reason = Some(reason.clone());
                }
            }
        }
        Ok(Outcome::Placed { assigned, evicted, rejected })
    }

    /// Re-validates a placement against the state now: the leader planned it against an older
    /// state, and anything may have changed since.
    fn check_placement(&self, placement: &Placement) -> Result<(), PlacementRejection> {
        let task = self
            .tasks
            .get(&placement.task)
            .ok_or(PlacementRejection::UnknownTask { task: placement.task })?;
        if task.state != TaskState::Pending {
            return Err(PlacementRejection::TaskNotPending { task: task.id, state: task.state });
        }
        if task.not_before_unix_ms > self.now_unix_ms {
            return Err(PlacementRejection::BackingOff {
                task: task.id,
                not_before_unix_ms: task.not_before_unix_ms,
            });
        }
        let executor = self
            .executors
            .get(&placement.executor)
            .ok_or(PlacementRejection::UnknownExecutor { executor: placement.executor })?;
        if executor.state != ExecutorState::Up {
            return Err(PlacementRejection::ExecutorNotUp {
                executor: executor.id,
                state: executor.state,
            });
        }
        if let Some(mismatch) = constraint_mismatch(&task.spec, &executor.spec) {
            return Err(PlacementRejection::ConstraintMismatch {
                task: task.id,
                executor: executor.id,
                mismatch,
            });
        }
        let wanted = self.allocation_for(task, placement.memory_bytes)?;
        let mut free = executor.free();
        let mut seen = BTreeSet::new();
        for &victim in &placement.evict {
            let held = executor.tasks.contains(&victim) && seen.insert(victim);
            let victim_task = self
                .tasks
                .get(&victim)
                .filter(|_| held)
                .ok_or(PlacementRejection::VictimNotHeld { victim, executor: executor.id })?;
            if victim_task.spec.priority >= task.spec.priority {
                return Err(PlacementRejection::VictimNotLower {
                    victim,
                    victim_priority: victim_task.spec.priority,
                    priority: task.spec.priority,
                });
            }
            free.add(&victim_task.allocated);
        }
        if let Some(shortfall) = wanted.first_shortfall(&free) {
            return Err(PlacementRejection::Insufficient {
                task: task.id,
                executor: executor.id,
                resource: shortfall.resource,
                requested: shortfall.requested,
                free: shortfall.available,
            });
        }
        Ok(())
    }

    /// What a placement gives the task: its declared resources, with the planner's memory for a
    /// `memory_auto` task (at least the floor). A sized memory for any other task is refused.
    fn allocation_for(
        &self,
        task: &Task,
        memory_bytes: Option<u64>,
    ) -> Result<Resources, PlacementRejection> {
        let mut wanted = task.spec.resources.clone();
        let floor_bytes = self.limits.memory_auto_floor_bytes;
        match (task.spec.memory_auto, memory_bytes) {
            (false, None) => {}
            (false, Some(_)) => {
                return Err(PlacementRejection::MemorySizedButDeclared { task: task.id })
            }
            (true, None) => return Err(PlacementRejection::MemoryNotSized { task: task.id }),
            (true, Some(memory_bytes)) if memory_bytes < floor_bytes => {
                return Err(PlacementRejection::MemoryBelowFloor {
                    task: task.id,
                    memory_bytes,
                    floor_bytes,
                })
            }
            (true, Some(bytes)) => wanted.memory_bytes = bytes,
        }
        Ok(wanted)
    }

    fn assign(
        &mut self,
        id: TaskId,
        executor_id: ExecutorId,
        memory_bytes: Option<u64>,
    ) -> Assignment {
        let token = FencingToken(self.next_fencing_token);
        self.next_fencing_token += 1;
        self.set_state(id, TaskState::Assigned);
        let task = self
            .tasks
            .get_mut(&id)
            .expect("assign is called only after check_placement found the task");
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
        let executor = self
            .executors
            .get_mut(&executor_id)
            .expect("assign is called only after check_placement found the executor");
        executor.tasks.insert(id);
        executor.allocated.add(&resources);
        assert!(
            executor.allocated.fits_in(&executor.spec.capacity),
            "executor {executor_id} over capacity after placing {id}"
        );
        Assignment { task: id, executor: executor_id, attempt, token }
    }
}
