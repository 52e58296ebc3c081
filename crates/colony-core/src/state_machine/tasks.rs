//! The task aggregate: submission, cancellation, an attempt's reports, expiry and eviction. The
//! moves between states they share with the other aggregates are in `lifecycle`.

use super::workflows::Outputs;
use super::{check_text, deadline_key, holds_resources, pending_key, StateMachine};
use super::{AttemptOutcome, AttemptResult, AttemptStatus, CommandError, Outcome};
use crate::ids::{ExecutorId, FencingToken, TaskId};
use crate::resources::Resources;
use crate::task::{Task, TaskSpec, TaskState};

impl StateMachine {
    pub(super) fn submit(&mut self, spec: &TaskSpec) -> Result<Outcome, CommandError> {
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
                return Err(CommandError::DeadlinePassed {
                    deadline_unix_ms: deadline,
                    now_unix_ms: now,
                });
            }
        }
        let mut waiting = false;
        for &dependency in &spec.dependencies {
            let dep =
                self.tasks.get(&dependency).ok_or(CommandError::UnknownDependency(dependency))?;
            match dep.state {
                TaskState::Succeeded => {}
                state if state.is_finished() => {
                    return Err(CommandError::DependencyEnded { dependency, state });
                }
                _ => waiting = true,
            }
        }

        // Every check has passed: from here on the command only changes state.
        let id = self.insert_task(spec.clone(), waiting);
        let task = self.task(id)?.clone();
        Ok(Outcome::Submitted { task, existing: false })
    }

    /// Creates a task from a checked spec, blocked (`waiting`) or pending, with every index kept.
    pub(super) fn insert_task(&mut self, spec: TaskSpec, waiting: bool) -> TaskId {
        let now = self.now_unix_ms;
        let id = TaskId(self.next_task_id);
        self.next_task_id += 1;
        for &dependency in &spec.dependencies {
            self.dependents.entry(dependency).or_default().insert(id);
        }
        if let Some(key) = &spec.idempotency_key {
            self.idempotency.insert(key.clone(), id);
        }
        let task = Task {
            id,
            spec,
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
        if let Some(key) = pending_key(&task) {
            self.pending.insert(key);
        }
        if let Some(key) = deadline_key(&task) {
            self.deadlines.insert(key);
        }
        self.index_state(id, None, Some(task.state));
        self.tasks.insert(id, task);
        id
    }

    pub(super) fn cancel(&mut self, id: TaskId, reason: &str) -> Result<Outcome, CommandError> {
        let task = self.task(id)?;
        if task.state.is_finished() {
            return Err(CommandError::AlreadyFinished { id, state: task.state });
        }
        check_text("reason", reason, self.limits.message_bytes_max)?;
        let reason =
            if reason.is_empty() { "cancelled by request".to_owned() } else { reason.to_owned() };
        let cascaded = self.end(id, TaskState::Cancelled, Some(reason));
        let task = self.task(id)?.clone();
        Ok(Outcome::Cancelled { task, cascaded })
    }

    pub(super) fn report(
        &mut self,
        executor: ExecutorId,
        id: TaskId,
        token: FencingToken,
        status: &AttemptStatus,
    ) -> Result<Outcome, CommandError> {
        if !self.executors.contains_key(&executor) {
            return Err(CommandError::UnknownExecutor(executor));
        }
        let task = self.task(id)?;
        let current = task.executor == Some(executor)
            && task.fencing_token == Some(token)
            && holds_resources(task.state);
        if !current {
            return Err(CommandError::StaleReport { task: id, executor, token });
        }
        match status {
            AttemptStatus::Started => {
                self.mark_started(id);
            }
            AttemptStatus::Finished(result) => self.finish_attempt(id, result, &Outputs::new())?,
            AttemptStatus::FinishedWithOutputs(result, outputs) => {
                self.finish_attempt(id, result, outputs)?
            }
            AttemptStatus::Health { healthy, address } => {
                let stopped = self.agent_task_health(id, *healthy, address)?;
                return Ok(Outcome::Reported { task: id, state: TaskState::Running, stopped });
            }
        }
        let mut stopped = self.workflow_tasks_if_stopped(id);
        if matches!(status, AttemptStatus::Started) {
            // A new version of an agent's instance runs: the old one stops.
            stopped.extend(self.agent_task_started(id));
        }
        stopped.retain(|&t| t != id);
        Ok(Outcome::Reported { task: id, state: self.task(id)?.state, stopped })
    }

    /// An assigned attempt is running, from now; returns whether it was still assigned.
    pub(super) fn mark_started(&mut self, id: TaskId) -> bool {
        if self.tasks.get(&id).map(|t| t.state) != Some(TaskState::Assigned) {
            return false;
        }
        self.set_state(id, TaskState::Running);
        let now = self.now_unix_ms;
        if let Some(task) = self.tasks.get_mut(&id) {
            task.started_unix_ms = Some(now);
        }
        true
    }

    /// An attempt's end: its texts kept, then success (its outputs checked and kept), a retry,
    /// or the end it reports.
    fn finish_attempt(
        &mut self,
        id: TaskId,
        result: &AttemptResult,
        outputs: &Outputs,
    ) -> Result<(), CommandError> {
        let now = self.now_unix_ms;
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
        let why = |default: String| {
            if result.message.is_empty() {
                default
            } else {
                result.message.clone()
            }
        };
        match result.outcome {
            AttemptOutcome::Succeeded => match self.check_outputs(id, outputs) {
                Ok(()) => {
                    self.store_outputs(id, outputs);
                    self.end(id, TaskState::Succeeded, None);
                }
                Err(reason) => {
                    self.retry_or_end(id, false, reason);
                }
            },
            AttemptOutcome::Failed => {
                let default = result.exit_code.map_or_else(
                    || "attempt failed".to_owned(),
                    |code| format!("exited with code {code}"),
                );
                self.retry_or_end(id, false, why(default));
            }
            AttemptOutcome::OomKilled => {
                let reason = match result.message.starts_with("oom_killed") {
                    true => result.message.clone(),
                    false => format!("oom_killed: {}", result.message),
                };
                self.retry_or_end(id, false, reason);
            }
            AttemptOutcome::TimedOut => {
                self.end(id, TaskState::TimedOut, Some(why("killed at its timeout".to_owned())));
            }
        }
        Ok(())
    }

    pub(super) fn expire_tasks(&mut self, ids: &[TaskId]) -> Outcome {
        let now = self.now_unix_ms;
        let mut expired = Vec::new();
        for &id in ids {
            let due = self.tasks.get(&id).is_some_and(|t| {
                matches!(t.state, TaskState::Blocked | TaskState::Pending)
                    && t.spec.deadline_unix_ms.is_some_and(|d| d <= now)
            });
            if due {
                self.end(id, TaskState::TimedOut, Some("not started by its deadline".to_owned()));
                expired.push(id);
            }
        }
        Outcome::Expired { ids: expired }
    }

    pub(super) fn evict_tasks(
        &mut self,
        ids: &[TaskId],
        reason: &str,
    ) -> Result<Outcome, CommandError> {
        if ids.len() > self.limits.placements_max {
            return Err(CommandError::TooMany {
                what: "evictions".to_owned(),
                max: self.limits.placements_max,
            });
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
}
