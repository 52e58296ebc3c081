//! The executor aggregate: registration (what an executor offers), the failure detector's
//! verdict and drains. Admission, which needs a join token, is in `security`.

use super::{check_text, StateMachine};
use super::{CommandError, Outcome};
use crate::executor::{ExecutorSpec, ExecutorState};
use crate::ids::{ExecutorId, TaskId};

impl StateMachine {
    pub(super) fn register_executor(
        &mut self,
        id: ExecutorId,
        spec: &ExecutorSpec,
    ) -> Result<Outcome, CommandError> {
        spec.validate(&self.limits)?;
        let now = self.now_unix_ms;
        let executor = self.executors.get_mut(&id).ok_or(CommandError::UnknownExecutor(id))?;
        if !executor.allocated.fits_in(&spec.capacity) {
            return Err(CommandError::CapacityBelowAllocated {
                id,
                capacity: spec.capacity.clone(),
                allocated: executor.allocated.clone(),
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

    pub(super) fn mark_executor_down(
        &mut self,
        id: ExecutorId,
        reason: &str,
    ) -> Result<Outcome, CommandError> {
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

    pub(super) fn drain_executor(
        &mut self,
        id: ExecutorId,
        deadline_unix_ms: u64,
    ) -> Result<Outcome, CommandError> {
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

    /// Ends a drain: the executor takes new placements again; what it still runs keeps running.
    pub(super) fn undrain_executor(&mut self, id: ExecutorId) -> Result<Outcome, CommandError> {
        let now = self.now_unix_ms;
        let executor = self.executors.get_mut(&id).ok_or(CommandError::UnknownExecutor(id))?;
        if executor.state != ExecutorState::Draining {
            return Err(CommandError::ExecutorState { id, state: executor.state });
        }
        executor.state = ExecutorState::Up;
        executor.drain_deadline_unix_ms = None;
        executor.reason = None;
        executor.updated_unix_ms = now;
        Ok(Outcome::Undrained { id })
    }
}
