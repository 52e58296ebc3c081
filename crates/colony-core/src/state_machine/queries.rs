//! Read accessors: what the server's read path, the scheduler and the learner see of the state.

use super::StateMachine;
use crate::executor::{ClusterCaRecord, Executor};
use crate::ids::{ExecutorId, ModelVersion, TaskId};
use crate::limits::Limits;
use crate::model::ModelRecord;
use crate::task::{Task, TaskState};
use std::collections::BTreeMap;

/// Which tasks a listing returns.
#[derive(Clone, Debug, Default)]
pub struct TaskFilter {
    pub state: Option<TaskState>,
    /// Only tasks with an id greater than this (for paging).
    pub after: Option<TaskId>,
    pub limit: usize,
}

impl StateMachine {
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The replicated clock: the largest `now` any applied proposal carried.
    pub fn now_unix_ms(&self) -> u64 {
        self.now_unix_ms
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
        self.finished_order
            .range(after_seq.saturating_add(1)..)
            .filter_map(|(&seq, id)| self.tasks.get(id).map(|t| (seq, t)))
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
        self.list_tasks_where(filter, |_| true)
    }

    /// Like [`StateMachine::list_tasks`], counting only the tasks `visible` accepts (a caller's
    /// namespaces).
    pub fn list_tasks_where(
        &self,
        filter: &TaskFilter,
        visible: impl Fn(&Task) -> bool,
    ) -> Vec<Task> {
        let start = TaskId(filter.after.map_or(0, |after| after.0.saturating_add(1)));
        let tasks: Box<dyn Iterator<Item = &Task>> = match filter.state {
            None => Box::new(self.tasks.range(start..).map(|(_, task)| task)),
            // The index walks only this state's tasks, in id order.
            Some(state) => Box::new(
                self.by_state
                    .range((state, start)..=(state, TaskId(u64::MAX)))
                    .filter_map(|(_, id)| self.tasks.get(id)),
            ),
        };
        tasks.filter(|task| visible(task)).take(filter.limit).cloned().collect()
    }

    /// Tasks whose dependents are listed, for `task get`.
    pub fn dependents_of(&self, id: TaskId) -> impl Iterator<Item = TaskId> + '_ {
        self.dependents.get(&id).into_iter().flatten().copied()
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// How many tasks are in each state (every state present, zero or not), from counters kept
    /// on apply.
    pub fn count_by_state(&self) -> BTreeMap<TaskState, u64> {
        TaskState::ALL.iter().map(|&state| (state, self.state_counts[state as usize])).collect()
    }
}
