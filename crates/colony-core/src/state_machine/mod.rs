//! The replicated state machine: `apply(command) -> result`, deterministic on every replica.
//!
//! Time comes in with the proposal (`now_unix_ms`, stamped by the leader); nothing here reads a
//! clock, a random number generator or a file. A command that would break an invariant is
//! rejected with a typed error and changes nothing.
//!
//! This file holds the state and the dispatch; each aggregate's commands live in their own file
//! (`tasks`, `placement`, `executors`, `security` for the CA, join tokens, ACL tokens and admission,
//! `models`, `workflows`, `messages`, `agents`) over the state moves they share (`lifecycle`), with the read accessors in `queries`
//! and the whole-state check in `invariants`.

mod agents;
mod command;
mod executors;
mod invariants;
mod lifecycle;
mod messages;
mod models;
mod placement;
mod queries;
mod restore;
mod retention;
mod security;
mod tasks;
mod upgrade;
mod workflows;

pub use command::{
    Assignment, AttemptOutcome, AttemptResult, AttemptStatus, Command, CommandError, Outcome,
    Placement, Proposal,
};
pub use invariants::InvariantViolation;
pub use placement::{constraint_mismatch, ConstraintMismatch, PlacementRejection};
pub use queries::TaskFilter;
pub use restore::{Restored, RESTORE_TOKEN_EPOCH};
pub use retention::{Collected, Retention};
pub use upgrade::{AgentSpecV5, StateMachineV2, StateMachineV3, StateMachineV4, StateMachineV5};
pub use workflows::Outputs;

use crate::acl::AclToken;
use crate::agent::Agents;
use crate::executor::{ClusterCaRecord, Executor, JoinTokenRecord};
use crate::ids::{ExecutorId, ModelVersion, TaskId, WorkflowId};
use crate::limits::Limits;
use crate::messaging::Messaging;
use crate::model::ModelRecord;
use crate::task::{Task, TaskState};
use crate::workflow::{StepTask, Workflow, WorkflowLimits};
use imbl::{OrdMap, OrdSet};
use serde::{Deserialize, Serialize};

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

impl StateMachine {
    /// Keeps the state index and counts exact as a task enters `to` from `from` (`None`: it is
    /// new) or leaves the state machine (`to` is `None`).
    fn index_state(&mut self, id: TaskId, from: Option<TaskState>, to: Option<TaskState>) {
        if let Some(from) = from {
            self.by_state.remove(&(from, id));
            self.state_counts[from as usize] -= 1;
        }
        if let Some(to) = to {
            self.by_state.insert((to, id));
            self.state_counts[to as usize] += 1;
        }
    }
}

fn holds_resources(state: TaskState) -> bool {
    matches!(state, TaskState::Assigned | TaskState::Running)
}

fn check_text(what: &'static str, text: &str, max: usize) -> Result<(), CommandError> {
    if text.len() > max {
        return Err(CommandError::TooLong { what: what.to_owned(), len: text.len(), max });
    }
    Ok(())
}

/// The authoritative state of the cluster, identical on every replica at the same applied index.
// Persisted in snapshots with bincode: the field order, names and types are a format, frozen by
// colony-store's tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMachine {
    limits: Limits,
    tasks: OrdMap<TaskId, Task>,
    /// The id the next submitted task gets; ids start at 1 and are never reused.
    next_task_id: u64,
    idempotency: OrdMap<String, TaskId>,
    /// For each task, the unfinished-or-not tasks that named it as a dependency.
    dependents: OrdMap<TaskId, OrdSet<TaskId>>,
    /// The latest time any proposal carried: time on the replicated clock never goes backwards,
    /// even when a new leader's wall clock is behind the old one's.
    now_unix_ms: u64,
    /// Exactly the pending tasks, in scheduling order.
    pending: OrdSet<PendingKey>,
    /// Exactly the blocked or pending tasks that have a deadline.
    deadlines: OrdSet<(u64, TaskId)>,
    executors: OrdMap<ExecutorId, Executor>,
    next_executor_id: u64,
    /// The token the next assignment gets: tokens only grow, across every task.
    next_fencing_token: u64,
    /// Keyed by the SHA-256 of the token's secret; the secret itself is never stored.
    join_tokens: OrdMap<[u8; 32], JoinTokenRecord>,
    ca: Option<ClusterCaRecord>,
    /// The finished tasks kept, by the order they finished in.
    finished_order: OrdMap<u64, TaskId>,
    next_finish_seq: u64,
    models: OrdMap<ModelVersion, ModelRecord>,
    current_model: Option<ModelVersion>,
    next_model_version: u64,
    /// Whether the first management token was created (`BootstrapAcl` is refused after).
    acl_bootstrapped: bool,
    /// ACL tokens by accessor.
    acl_tokens: OrdMap<String, AclToken>,
    /// Accessors by the SHA-256 of the token's secret: exactly `acl_tokens`, inverted.
    acl_by_secret: OrdMap<[u8; 32], String>,
    /// The highest finish sequence number retention removed (0: none).
    finished_removed_through: u64,
    /// Every task by its state: a list filtered by state walks only that state's tasks.
    by_state: OrdSet<(TaskState, TaskId)>,
    /// How many tasks are in each state, indexed by `TaskState as usize`.
    state_counts: [u64; TaskState::ALL.len()],
    workflow_limits: WorkflowLimits,
    workflows: OrdMap<WorkflowId, Workflow>,
    /// The id the next submitted workflow gets; ids start at 1 and are never reused.
    next_workflow_id: u64,
    /// The workflow step each workflow task runs.
    task_steps: OrdMap<TaskId, StepTask>,
    /// What successful tasks wrote to `$COLONY_OUTPUT_DIR`; forgotten with the task.
    outputs: OrdMap<TaskId, Outputs>,
    /// Topics and mailboxes with their messages and consumers.
    messaging: Messaging,
    agents: Agents,
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
            tasks: OrdMap::new(),
            next_task_id: 1,
            idempotency: OrdMap::new(),
            dependents: OrdMap::new(),
            now_unix_ms: 0,
            pending: OrdSet::new(),
            deadlines: OrdSet::new(),
            executors: OrdMap::new(),
            next_executor_id: 1,
            next_fencing_token: 1,
            join_tokens: OrdMap::new(),
            ca: None,
            finished_order: OrdMap::new(),
            next_finish_seq: 1,
            models: OrdMap::new(),
            current_model: None,
            next_model_version: 1,
            acl_bootstrapped: false,
            acl_tokens: OrdMap::new(),
            acl_by_secret: OrdMap::new(),
            finished_removed_through: 0,
            by_state: OrdSet::new(),
            state_counts: [0; TaskState::ALL.len()],
            workflow_limits: WorkflowLimits::default(),
            workflows: OrdMap::new(),
            next_workflow_id: 1,
            task_steps: OrdMap::new(),
            outputs: OrdMap::new(),
            messaging: Messaging::default(),
            agents: Agents::default(),
        }
    }

    /// Applies every command of a proposal in order; each succeeds or fails on its own.
    pub fn apply_proposal(&mut self, proposal: &Proposal) -> Vec<Result<Outcome, CommandError>> {
        self.now_unix_ms = self.now_unix_ms.max(proposal.now_unix_ms);
        if proposal.commands.len() > self.limits.batch_commands_max {
            let error = CommandError::BatchTooLarge {
                count: proposal.commands.len(),
                max: self.limits.batch_commands_max,
            };
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
            Command::CreateJoinToken { secret_hash, expires_unix_ms, kind } => {
                self.create_join_token(*secret_hash, *expires_unix_ms, *kind)
            }
            Command::BootstrapAcl(token) => self.bootstrap_acl(token),
            Command::CreateAclToken(token) => self.create_acl_token(token),
            Command::RevokeAclToken { accessor } => self.revoke_acl_token(accessor),
            Command::UndrainExecutor { id } => self.undrain_executor(*id),
            Command::AdmitExecutor { secret_hash, expected_id, name, cert_fingerprint } => {
                self.admit_executor(secret_hash, *expected_id, name, *cert_fingerprint)
            }
            Command::RegisterExecutor { id, spec } => self.register_executor(*id, spec),
            Command::MarkExecutorDown { id, reason } => self.mark_executor_down(*id, reason),
            Command::DrainExecutor { id, deadline_unix_ms } => {
                self.drain_executor(*id, *deadline_unix_ms)
            }
            Command::PlaceTasks { placements, unschedulable } => {
                self.place_tasks(placements, unschedulable)
            }
            Command::Report { executor, task, token, status } => {
                self.report(*executor, *task, *token, status)
            }
            Command::ExpireTasks { ids } => Ok(self.expire_tasks(ids)),
            Command::PublishModel { device, feature_schema, weights, metrics } => {
                self.publish_model(device, feature_schema, weights, metrics)
            }
            Command::RollbackModel { version } => self.rollback_model(*version),
            Command::EvictTasks { ids, reason } => self.evict_tasks(ids, reason),
            Command::Collect(retention) => self.collect(retention),
            Command::SubmitWorkflow(spec) => self.submit_workflow(spec),
            Command::CancelWorkflow { id, reason } => self.cancel_workflow(*id, reason),
            Command::RetryWorkflow { id } => self.retry_workflow(*id),
            Command::Publish(spec) => self.publish(spec),
            Command::Receive(spec) => self.receive(spec),
            Command::Ack { topic, consumer, deliveries } => self.ack(topic, consumer, deliveries),
            Command::CreateTopic { topic, policy, delete_after_unix_ms } => {
                self.create_topic(topic, policy, *delete_after_unix_ms)
            }
            Command::DeleteTopic { topic } => self.delete_topic(topic),
            Command::RunAgent(spec) => self.run_agent(spec),
            Command::RunAgentV5(spec) => self.run_agent(&spec.clone().into()),
            Command::AsAttempt { task, token, command } => self.as_attempt(*task, *token, command),
            Command::ScaleAgent { agent, replicas } => self.scale_agent(agent, *replicas),
            Command::StopAgent { agent } => self.stop_agent(agent),
        }
    }
}
