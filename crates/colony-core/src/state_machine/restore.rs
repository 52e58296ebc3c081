//! A backup restored into a new cluster. The snapshot is a moment of another cluster's life:
//! attempts it shows running may have ended since, executors may be gone, and the old cluster may
//! have issued fencing tokens after it. None of that may act on the restored cluster.

use super::StateMachine;
use crate::executor::ExecutorState;
use crate::ids::{ExecutorId, TaskId};
use crate::task::TaskState;

/// How far the fencing epoch moves on at a restore: tokens the old cluster issued after the
/// snapshot (fewer than this many) never match one the restored cluster issues.
pub const RESTORE_TOKEN_EPOCH: u64 = 1 << 32;

/// What a restore changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Attempts assigned or running in the snapshot, back to pending without spending a retry.
    pub requeued: Vec<TaskId>,
    /// Executors up or draining in the snapshot, now down until they register again.
    pub executors_down: usize,
    /// Message deliveries awaiting an ack in the snapshot, now due again.
    pub deliveries_expired: u64,
}

impl StateMachine {
    /// Prepares a restored state for its new cluster: every assigned or running attempt goes back
    /// to pending (its report can no longer match), every up or draining executor is down until it
    /// connects and registers again, every message delivery awaiting an ack is due again (an ack
    /// from before the snapshot is refused), and the next fencing token moves
    /// [`RESTORE_TOKEN_EPOCH`] ahead.
    pub fn prepare_restore(&mut self) -> Restored {
        const REASON: &str =
            "restored from a backup: the attempt from before the snapshot was stopped";
        let running: Vec<TaskId> = [TaskState::Assigned, TaskState::Running]
            .iter()
            .flat_map(|&state| {
                let keys = (state, TaskId(0))..=(state, TaskId(u64::MAX));
                self.by_state.range(keys).map(|&(_, id)| id)
            })
            .collect();
        for &id in &running {
            self.evict(id, REASON.to_owned());
        }
        let now = self.now_unix_ms;
        let mut executors_down = 0;
        let ids: Vec<ExecutorId> = self.executors.keys().copied().collect();
        for id in &ids {
            let Some(executor) = self.executors.get_mut(id) else { continue };
            if matches!(executor.state, ExecutorState::Up | ExecutorState::Draining) {
                executor.state = ExecutorState::Down;
                executor.drain_deadline_unix_ms = None;
                executor.reason = Some("restored from a backup: register again".to_owned());
                executor.updated_unix_ms = now;
                executors_down += 1;
            }
        }
        self.next_fencing_token = self.next_fencing_token.saturating_add(RESTORE_TOKEN_EPOCH);
        let deliveries_expired = self.messaging.expire_deliveries(now);
        Restored { requeued: running, executors_down, deliveries_expired }
    }
}
