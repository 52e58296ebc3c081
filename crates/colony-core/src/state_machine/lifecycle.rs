//! Task lifecycle moves every command goes through: `set_state` keeps the pending and deadline
//! indexes and the finish order exact, `release` gives back what an attempt holds, and `end`
//! cascades a task's end to its dependents.

use super::{deadline_key, holds_resources, pending_key, CommandError, StateMachine};
use crate::ids::TaskId;
use crate::task::{Task, TaskState};
use std::collections::VecDeque;

impl StateMachine {
    /// Moves a task between states, keeping the pending and deadline indexes exact.
    pub(super) fn set_state(&mut self, id: TaskId, state: TaskState) {
        let now = self.now_unix_ms;
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        assert!(
            !task.state.is_finished(),
            "task {id} changed state after finishing: {} then {state}",
            task.state
        );
        if let Some(key) = pending_key(task) {
            self.pending.remove(&key);
        }
        if let Some(key) = deadline_key(task) {
            self.deadlines.remove(&key);
        }
        let from = task.state;
        task.state = state;
        task.updated_unix_ms = now;
        if state.is_finished() {
            let seq = self.next_finish_seq;
            self.next_finish_seq += 1;
            task.finish_seq = Some(seq);
            self.finished_order.insert(seq, id);
        }
        if let Some(key) = pending_key(task) {
            self.pending.insert(key);
        }
        if let Some(key) = deadline_key(task) {
            self.deadlines.insert(key);
        }
        self.index_state(id, Some(from), Some(state));
        if from == TaskState::Running && state != TaskState::Running {
            // However it stops running (an end, an eviction, a retry), it serves no more.
            self.agents.endpoints.remove(&id);
        }
    }

    /// Gives back what the task's current attempt holds on its executor.
    fn release(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
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
    pub(super) fn evict(&mut self, id: TaskId, reason: String) {
        self.release(id);
        self.set_state(id, TaskState::Pending);
        if let Some(task) = self.tasks.get_mut(&id) {
            task.reason = Some(reason);
        }
    }

    /// After a failed or lost attempt: back to pending after a backoff if retries remain
    /// (returns true), else the task ends failed or lost.
    pub(super) fn retry_or_end(&mut self, id: TaskId, lost: bool, reason: String) -> bool {
        let Some(task) = self.tasks.get(&id) else {
            return false;
        };
        if task.retries_used >= task.spec.max_retries {
            let state = if lost { TaskState::Lost } else { TaskState::Failed };
            self.end(id, state, Some(reason));
            return false;
        }
        let retries_used = task.retries_used + 1;
        let shift = (retries_used - 1).min(20);
        let backoff = self
            .limits
            .retry_backoff_ms_base
            .saturating_mul(1 << shift)
            .min(self.limits.retry_backoff_ms_max);
        let now = self.now_unix_ms;
        self.release(id);
        self.set_state(id, TaskState::Pending);
        if let Some(task) = self.tasks.get_mut(&id) {
            task.retries_used = retries_used;
            task.not_before_unix_ms = now.saturating_add(backoff);
            task.reason =
                Some(format!("retry {retries_used} of {}: {reason}", task.spec.max_retries));
        }
        true
    }

    /// Ends a task. Success releases dependents whose dependencies have all succeeded; any other
    /// end cancels every unfinished dependent, transitively. Returns the tasks cancelled so.
    pub(super) fn end(
        &mut self,
        id: TaskId,
        state: TaskState,
        reason: Option<String>,
    ) -> Vec<TaskId> {
        self.release(id);
        self.set_state(id, state);
        let now = self.now_unix_ms;
        if let Some(task) = self.tasks.get_mut(&id) {
            task.finished_unix_ms = Some(now);
            task.reason = reason;
        }
        // A workflow's step moves on with its task (this may start later steps, or stop the
        // workflow and end its other tasks).
        self.step_task_ended(id);
        // An agent's instance gets a new task.
        self.agent_task_ended(id, state);
        let mut cascaded = Vec::new();
        if state == TaskState::Succeeded {
            let dependents: Vec<TaskId> =
                self.dependents.get(&id).into_iter().flatten().copied().collect();
            for dependent in dependents {
                let ready = self.tasks.get(&dependent).is_some_and(|t| {
                    t.state == TaskState::Blocked
                        && t.spec.dependencies.iter().all(|d| {
                            self.tasks.get(d).is_some_and(|d| d.state == TaskState::Succeeded)
                        })
                });
                if ready {
                    self.set_state(dependent, TaskState::Pending);
                }
            }
            return cascaded;
        }
        let mut queue: VecDeque<TaskId> = VecDeque::from([id]);
        while let Some(ended) = queue.pop_front() {
            let dependents: Vec<TaskId> =
                self.dependents.get(&ended).into_iter().flatten().copied().collect();
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

    pub(super) fn task(&self, id: TaskId) -> Result<&Task, CommandError> {
        self.tasks.get(&id).ok_or(CommandError::UnknownTask(id))
    }
}
