//! Retention: what the cluster forgets, and when. The leader proposes `Command::Collect` with its
//! policy; every replica applies it at the proposal's time, so every replica forgets the same
//! things.
//!
//! - A finished task goes once it finished more than `task_retention_ms` ago, or when more than
//!   `finished_tasks_max` finished tasks are kept (the oldest first), with its idempotency key and
//!   its place in the dependency index and its outputs. A finished task that an unfinished task
//!   depends on, or whose workflow is still running, stays until that ends too; a workflow goes
//!   with its last task.
//! - An executor down (or admitted and never connected) for `executor_gc_after_ms` goes; if it
//!   comes back, it must join again.
//! - Expired join tokens go, and ACL tokens an hour after they expired (until then a caller
//!   still using one is told it expired, not that it is unknown).
//! - Messages older than their topic's age bound go, and temporary mailboxes past their time.
//!
//! One command looks at no more than `scan_max` finished tasks, so applying it stays short; the
//! outcome says when there is `more`, and the leader proposes again.

use super::{CommandError, Outcome, StateMachine};
use crate::executor::ExecutorState;
use crate::ids::{ExecutorId, TaskId};
use serde::{Deserialize, Serialize};

/// How long an expired ACL token is kept, so its holder hears "expired" rather than "unknown".
pub const EXPIRED_ACL_TOKEN_KEPT_MS: u64 = 3_600_000;

/// What to forget, as the leader's flags say. It travels in the command, so replicas started with
/// other flags still agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub task_retention_ms: u64,
    pub finished_tasks_max: u64,
    pub executor_gc_after_ms: u64,
    /// The most finished tasks one command looks at.
    pub scan_max: u32,
}

impl Retention {
    /// Nomad-like defaults: finished work for three days (at most a million tasks), executors
    /// down for a day.
    pub const DEFAULT: Retention = Retention {
        task_retention_ms: 72 * 3_600_000,
        finished_tasks_max: 1_000_000,
        executor_gc_after_ms: 24 * 3_600_000,
        scan_max: 20_000,
    };
}

/// What one `Collect` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collected {
    pub tasks: Vec<TaskId>,
    /// Finished tasks due to go but kept for an unfinished dependent.
    pub held: u64,
    pub executors: Vec<ExecutorId>,
    pub acl_tokens: u64,
    pub join_tokens: u64,
    /// Messages past their topic's age, and temporary mailboxes past their time.
    pub messages: u64,
    pub topics: u64,
    /// The scan stopped at `scan_max` with more due: propose again.
    pub more: bool,
}

impl Collected {
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
            && self.executors.is_empty()
            && self.acl_tokens == 0
            && self.join_tokens == 0
            && self.messages == 0
            && self.topics == 0
    }
}

/// What a collection at `now` would remove, found without changing anything.
struct Plan {
    tasks: Vec<(u64, TaskId)>,
    held: u64,
    executors: Vec<ExecutorId>,
    acl_tokens: Vec<(String, [u8; 32])>,
    join_tokens: Vec<[u8; 32]>,
    more: bool,
}

impl StateMachine {
    pub(super) fn collect(&mut self, retention: &Retention) -> Result<Outcome, CommandError> {
        if retention.task_retention_ms == 0
            || retention.finished_tasks_max == 0
            || retention.executor_gc_after_ms == 0
            || retention.scan_max == 0
        {
            return Err(CommandError::InvalidSpec(
                "a retention policy keeps something: every bound must be above zero".to_owned(),
            ));
        }
        let plan = self.plan_collection(retention, self.now_unix_ms);
        let mut collected = Collected {
            tasks: Vec::with_capacity(plan.tasks.len()),
            held: plan.held,
            executors: plan.executors.clone(),
            acl_tokens: plan.acl_tokens.len() as u64,
            join_tokens: plan.join_tokens.len() as u64,
            messages: 0,
            topics: 0,
            more: plan.more,
        };
        (collected.messages, collected.topics) = self.messaging.expire(self.now_unix_ms);
        for (seq, id) in plan.tasks {
            self.forget_task(seq, id);
            collected.tasks.push(id);
        }
        for id in plan.executors {
            self.executors.remove(&id);
        }
        for (accessor, secret_hash) in plan.acl_tokens {
            self.acl_tokens.remove(&accessor);
            self.acl_by_secret.remove(&secret_hash);
        }
        for secret_hash in plan.join_tokens {
            self.join_tokens.remove(&secret_hash);
        }
        Ok(Outcome::Collected(collected))
    }

    /// Whether a `Collect` with `retention` at `now_unix_ms` would remove anything: the leader
    /// asks before proposing one, so an idle cluster writes no entries.
    pub fn collectable(&self, retention: &Retention, now_unix_ms: u64) -> bool {
        let plan = self.plan_collection(retention, now_unix_ms.max(self.now_unix_ms));
        !plan.tasks.is_empty()
            || !plan.executors.is_empty()
            || !plan.acl_tokens.is_empty()
            || !plan.join_tokens.is_empty()
            || self.messaging.expirable(now_unix_ms.max(self.now_unix_ms))
    }

    /// Finish sequence numbers at or below this were removed by retention (0: none yet). A
    /// follower of the finished-task feed whose cursor is below it has missed records.
    pub fn finished_removed_through(&self) -> u64 {
        self.finished_removed_through
    }

    /// Finished tasks kept now.
    pub fn finished_count(&self) -> usize {
        self.finished_order.len()
    }

    fn plan_collection(&self, retention: &Retention, now: u64) -> Plan {
        let cutoff = now.saturating_sub(retention.task_retention_ms);
        let mut plan = Plan {
            tasks: Vec::new(),
            held: 0,
            executors: Vec::new(),
            acl_tokens: Vec::new(),
            join_tokens: Vec::new(),
            more: false,
        };
        let kept = self.finished_order.len() as u64;
        let mut scanned = 0u32;
        // Tasks finish in time order (the replicated clock never goes back), so the first task
        // that is neither too old nor beyond the count ends the scan.
        for (&seq, &id) in &self.finished_order {
            let Some(task) = self.tasks.get(&id) else { continue };
            let finished = task.finished_unix_ms.unwrap_or(task.updated_unix_ms);
            let too_old = finished <= cutoff;
            let beyond_count = kept - plan.tasks.len() as u64 > retention.finished_tasks_max;
            if !too_old && !beyond_count {
                break;
            }
            if scanned == retention.scan_max {
                plan.more = true;
                break;
            }
            scanned += 1;
            if self.has_unfinished_dependents(id) || self.held_by_workflow(id) {
                plan.held += 1;
            } else {
                plan.tasks.push((seq, id));
            }
        }
        let gc_cutoff = now.saturating_sub(retention.executor_gc_after_ms);
        plan.executors = self
            .executors
            .values()
            .filter(|e| e.tasks.is_empty())
            .filter(|e| match e.state {
                ExecutorState::Down => e.updated_unix_ms <= gc_cutoff,
                ExecutorState::Admitted => e.admitted_unix_ms <= gc_cutoff,
                ExecutorState::Up | ExecutorState::Draining => false,
            })
            .map(|e| e.id)
            .collect();
        plan.acl_tokens = self
            .acl_tokens
            .values()
            .filter(|t| !t.live_at(now.saturating_sub(EXPIRED_ACL_TOKEN_KEPT_MS)))
            .map(|t| (t.accessor.clone(), t.secret_hash))
            .collect();
        plan.join_tokens = self
            .join_tokens
            .iter()
            .filter(|(_, t)| t.expires_unix_ms <= now)
            .map(|(hash, _)| *hash)
            .collect();
        plan
    }

    fn has_unfinished_dependents(&self, id: TaskId) -> bool {
        self.dependents_of(id)
            .any(|dependent| self.tasks.get(&dependent).is_some_and(|t| !t.state.is_finished()))
    }

    /// Removes a finished task and everything that names it: its finish-order entry, its
    /// idempotency key, and its entries in the dependency index.
    fn forget_task(&mut self, seq: u64, id: TaskId) {
        self.finished_order.remove(&seq);
        self.finished_removed_through = self.finished_removed_through.max(seq);
        let Some(task) = self.tasks.remove(&id) else { return };
        self.index_state(id, Some(task.state), None);
        self.forget_task_outputs(id);
        if let Some(key) = &task.spec.idempotency_key {
            if self.idempotency.get(key) == Some(&id) {
                self.idempotency.remove(key);
            }
        }
        // Its dependents are all finished (or it would be held); they keep their own records.
        self.dependents.remove(&id);
        for dependency in &task.spec.dependencies {
            if let Some(dependents) = self.dependents.get_mut(dependency) {
                dependents.remove(&id);
                if dependents.is_empty() {
                    self.dependents.remove(dependency);
                }
            }
        }
    }
}
