//! Reading state that older releases persisted. Each older layout is declared here as it was,
//! field for field (bincode is not self-describing: the struct is the format), and converted to
//! today's `StateMachine`.
//!
//! - Format 2 (before retention): `Limits` had `finished_order_kept_max`, which dropped the
//!   oldest entries of the finish-order index (not the tasks), and there was no
//!   `finished_removed_through`, nor the index of tasks by state. The indexes are rebuilt from the
//!   tasks, so every finished task is reachable by retention again.
//! - Format 3 (before workflows): no workflows, workflow limits, step links or task outputs.
//! - Format 4 (before messages): no topics or mailboxes.
//! - Format 5 (before discovery): agent specs had no port or health check, and there was no
//!   registry of healthy instances. A format 5 log entry running an agent is
//!   `Command::RunAgentV5`.

use super::Outputs;
use super::{PendingKey, StateMachine};
use crate::acl::AclToken;
use crate::agent::{
    Agent, AgentKey, AgentLimits, AgentSpec, AgentState, Agents, Instance, RestartPolicy,
};
use crate::executor::{ClusterCaRecord, Executor, JoinTokenRecord};
use crate::ids::WorkflowId;
use crate::ids::{ExecutorId, ModelVersion, TaskId};
use crate::limits::Limits;
use crate::messaging::Messaging;
use crate::model::ModelRecord;
use crate::task::TaskSpec;
use crate::task::{Task, TaskState};
use crate::workflow::{StepTask, Workflow, WorkflowLimits};
use imbl::{OrdMap, OrdSet};
use serde::Deserialize;

#[derive(Deserialize)]
struct LimitsV2 {
    name_bytes_max: usize,
    label_value_bytes_max: usize,
    labels_max: usize,
    custom_resources_max: usize,
    dependencies_max: usize,
    args_max: usize,
    arg_bytes_max: usize,
    env_max: usize,
    retries_max: u32,
    spec_bytes_max: usize,
    batch_commands_max: usize,
    placements_max: usize,
    output_tail_bytes_max: usize,
    message_bytes_max: usize,
    join_tokens_max: usize,
    acl_tokens_max: usize,
    description_bytes_max: usize,
    executors_max: usize,
    pem_bytes_max: usize,
    retry_backoff_ms_base: u64,
    retry_backoff_ms_max: u64,
    memory_auto_floor_bytes: u64,
    models_kept_max: usize,
    model_weights_bytes_max: usize,
    #[allow(dead_code)] // Read to keep the layout; retention replaced it.
    finished_order_kept_max: usize,
}

/// The state machine as format 2 stored it.
#[derive(Deserialize)]
pub struct StateMachineV2 {
    limits: LimitsV2,
    tasks: OrdMap<TaskId, Task>,
    next_task_id: u64,
    idempotency: OrdMap<String, TaskId>,
    dependents: OrdMap<TaskId, OrdSet<TaskId>>,
    now_unix_ms: u64,
    pending: OrdSet<PendingKey>,
    deadlines: OrdSet<(u64, TaskId)>,
    executors: OrdMap<ExecutorId, Executor>,
    next_executor_id: u64,
    next_fencing_token: u64,
    join_tokens: OrdMap<[u8; 32], JoinTokenRecord>,
    ca: Option<ClusterCaRecord>,
    #[allow(dead_code)] // Rebuilt from the tasks: format 2 may have dropped entries.
    finished_order: OrdMap<u64, TaskId>,
    next_finish_seq: u64,
    models: OrdMap<ModelVersion, ModelRecord>,
    current_model: Option<ModelVersion>,
    next_model_version: u64,
    acl_bootstrapped: bool,
    acl_tokens: OrdMap<String, AclToken>,
    acl_by_secret: OrdMap<[u8; 32], String>,
}

impl From<StateMachineV2> for StateMachine {
    fn from(old: StateMachineV2) -> StateMachine {
        let l = old.limits;
        let limits = Limits {
            name_bytes_max: l.name_bytes_max,
            label_value_bytes_max: l.label_value_bytes_max,
            labels_max: l.labels_max,
            custom_resources_max: l.custom_resources_max,
            dependencies_max: l.dependencies_max,
            args_max: l.args_max,
            arg_bytes_max: l.arg_bytes_max,
            env_max: l.env_max,
            retries_max: l.retries_max,
            spec_bytes_max: l.spec_bytes_max,
            batch_commands_max: l.batch_commands_max,
            placements_max: l.placements_max,
            output_tail_bytes_max: l.output_tail_bytes_max,
            message_bytes_max: l.message_bytes_max,
            join_tokens_max: l.join_tokens_max,
            acl_tokens_max: l.acl_tokens_max,
            description_bytes_max: l.description_bytes_max,
            executors_max: l.executors_max,
            pem_bytes_max: l.pem_bytes_max,
            retry_backoff_ms_base: l.retry_backoff_ms_base,
            retry_backoff_ms_max: l.retry_backoff_ms_max,
            memory_auto_floor_bytes: l.memory_auto_floor_bytes,
            models_kept_max: l.models_kept_max,
            model_weights_bytes_max: l.model_weights_bytes_max,
        };
        let finished_order =
            old.tasks.values().filter_map(|t| t.finish_seq.map(|seq| (seq, t.id))).collect();
        let by_state = old.tasks.values().map(|t| (t.state, t.id)).collect();
        let mut state_counts = [0; TaskState::ALL.len()];
        for task in old.tasks.values() {
            state_counts[task.state as usize] += 1;
        }
        StateMachine {
            limits,
            tasks: old.tasks,
            next_task_id: old.next_task_id,
            idempotency: old.idempotency,
            dependents: old.dependents,
            now_unix_ms: old.now_unix_ms,
            pending: old.pending,
            deadlines: old.deadlines,
            executors: old.executors,
            next_executor_id: old.next_executor_id,
            next_fencing_token: old.next_fencing_token,
            join_tokens: old.join_tokens,
            ca: old.ca,
            finished_order,
            next_finish_seq: old.next_finish_seq,
            models: old.models,
            current_model: old.current_model,
            next_model_version: old.next_model_version,
            acl_bootstrapped: old.acl_bootstrapped,
            acl_tokens: old.acl_tokens,
            acl_by_secret: old.acl_by_secret,
            finished_removed_through: 0,
            by_state,
            state_counts,
            workflow_limits: WorkflowLimits::default(),
            workflows: OrdMap::new(),
            next_workflow_id: 1,
            task_steps: OrdMap::new(),
            outputs: OrdMap::new(),
            messaging: Messaging::default(),
            agents: Agents::default(),
        }
    }
}

/// The state machine as format 3 stored it: today's, without anything of workflows.
#[derive(Deserialize)]
pub struct StateMachineV3 {
    limits: Limits,
    tasks: OrdMap<TaskId, Task>,
    next_task_id: u64,
    idempotency: OrdMap<String, TaskId>,
    dependents: OrdMap<TaskId, OrdSet<TaskId>>,
    now_unix_ms: u64,
    pending: OrdSet<PendingKey>,
    deadlines: OrdSet<(u64, TaskId)>,
    executors: OrdMap<ExecutorId, Executor>,
    next_executor_id: u64,
    next_fencing_token: u64,
    join_tokens: OrdMap<[u8; 32], JoinTokenRecord>,
    ca: Option<ClusterCaRecord>,
    finished_order: OrdMap<u64, TaskId>,
    next_finish_seq: u64,
    models: OrdMap<ModelVersion, ModelRecord>,
    current_model: Option<ModelVersion>,
    next_model_version: u64,
    acl_bootstrapped: bool,
    acl_tokens: OrdMap<String, AclToken>,
    acl_by_secret: OrdMap<[u8; 32], String>,
    finished_removed_through: u64,
    by_state: OrdSet<(TaskState, TaskId)>,
    state_counts: [u64; TaskState::ALL.len()],
}

impl From<StateMachineV3> for StateMachine {
    fn from(old: StateMachineV3) -> StateMachine {
        StateMachine {
            limits: old.limits,
            tasks: old.tasks,
            next_task_id: old.next_task_id,
            idempotency: old.idempotency,
            dependents: old.dependents,
            now_unix_ms: old.now_unix_ms,
            pending: old.pending,
            deadlines: old.deadlines,
            executors: old.executors,
            next_executor_id: old.next_executor_id,
            next_fencing_token: old.next_fencing_token,
            join_tokens: old.join_tokens,
            ca: old.ca,
            finished_order: old.finished_order,
            next_finish_seq: old.next_finish_seq,
            models: old.models,
            current_model: old.current_model,
            next_model_version: old.next_model_version,
            acl_bootstrapped: old.acl_bootstrapped,
            acl_tokens: old.acl_tokens,
            acl_by_secret: old.acl_by_secret,
            finished_removed_through: old.finished_removed_through,
            by_state: old.by_state,
            state_counts: old.state_counts,
            workflow_limits: WorkflowLimits::default(),
            workflows: OrdMap::new(),
            next_workflow_id: 1,
            task_steps: OrdMap::new(),
            outputs: OrdMap::new(),
            messaging: Messaging::default(),
            agents: Agents::default(),
        }
    }
}

/// The state machine as format 4 stored it: today's, without messaging.
#[derive(Deserialize)]
pub struct StateMachineV4 {
    limits: Limits,
    tasks: OrdMap<TaskId, Task>,
    next_task_id: u64,
    idempotency: OrdMap<String, TaskId>,
    dependents: OrdMap<TaskId, OrdSet<TaskId>>,
    now_unix_ms: u64,
    pending: OrdSet<PendingKey>,
    deadlines: OrdSet<(u64, TaskId)>,
    executors: OrdMap<ExecutorId, Executor>,
    next_executor_id: u64,
    next_fencing_token: u64,
    join_tokens: OrdMap<[u8; 32], JoinTokenRecord>,
    ca: Option<ClusterCaRecord>,
    finished_order: OrdMap<u64, TaskId>,
    next_finish_seq: u64,
    models: OrdMap<ModelVersion, ModelRecord>,
    current_model: Option<ModelVersion>,
    next_model_version: u64,
    acl_bootstrapped: bool,
    acl_tokens: OrdMap<String, AclToken>,
    acl_by_secret: OrdMap<[u8; 32], String>,
    finished_removed_through: u64,
    by_state: OrdSet<(TaskState, TaskId)>,
    state_counts: [u64; TaskState::ALL.len()],
    workflow_limits: WorkflowLimits,
    workflows: OrdMap<WorkflowId, Workflow>,
    next_workflow_id: u64,
    task_steps: OrdMap<TaskId, StepTask>,
    outputs: OrdMap<TaskId, Outputs>,
}

impl From<StateMachineV4> for StateMachine {
    fn from(old: StateMachineV4) -> StateMachine {
        StateMachine {
            limits: old.limits,
            tasks: old.tasks,
            next_task_id: old.next_task_id,
            idempotency: old.idempotency,
            dependents: old.dependents,
            now_unix_ms: old.now_unix_ms,
            pending: old.pending,
            deadlines: old.deadlines,
            executors: old.executors,
            next_executor_id: old.next_executor_id,
            next_fencing_token: old.next_fencing_token,
            join_tokens: old.join_tokens,
            ca: old.ca,
            finished_order: old.finished_order,
            next_finish_seq: old.next_finish_seq,
            models: old.models,
            current_model: old.current_model,
            next_model_version: old.next_model_version,
            acl_bootstrapped: old.acl_bootstrapped,
            acl_tokens: old.acl_tokens,
            acl_by_secret: old.acl_by_secret,
            finished_removed_through: old.finished_removed_through,
            by_state: old.by_state,
            state_counts: old.state_counts,
            workflow_limits: old.workflow_limits,
            workflows: old.workflows,
            next_workflow_id: old.next_workflow_id,
            task_steps: old.task_steps,
            outputs: old.outputs,
            messaging: Messaging::default(),
            agents: Agents::default(),
        }
    }
}

/// An agent spec as format 5 stored it: no port, no health check.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct AgentSpecV5 {
    pub name: String,
    pub namespace: String,
    pub task: TaskSpec,
    pub replicas: u32,
    pub restart: RestartPolicy,
    pub backoff_ms_base: u64,
    pub backoff_ms_max: u64,
}

impl From<AgentSpecV5> for AgentSpec {
    fn from(old: AgentSpecV5) -> AgentSpec {
        AgentSpec {
            name: old.name,
            namespace: old.namespace,
            task: old.task,
            replicas: old.replicas,
            restart: old.restart,
            backoff_ms_base: old.backoff_ms_base,
            backoff_ms_max: old.backoff_ms_max,
            port: false,
            health: None,
        }
    }
}

#[derive(Clone, Deserialize)]
struct AgentV5 {
    spec: AgentSpecV5,
    version: u64,
    state: AgentState,
    instances: OrdMap<u32, Instance>,
    created_unix_ms: u64,
    updated_unix_ms: u64,
    reason: Option<String>,
}

#[derive(Deserialize)]
struct AgentsV5 {
    limits: AgentLimits,
    agents: OrdMap<AgentKey, AgentV5>,
    tasks: OrdMap<TaskId, (AgentKey, u32)>,
}

impl From<AgentsV5> for Agents {
    fn from(old: AgentsV5) -> Agents {
        let agents = old
            .agents
            .into_iter()
            .map(|(key, a)| {
                let a = a.clone();
                let agent = Agent {
                    spec: a.spec.into(),
                    version: a.version,
                    state: a.state,
                    instances: a.instances,
                    created_unix_ms: a.created_unix_ms,
                    updated_unix_ms: a.updated_unix_ms,
                    reason: a.reason,
                };
                (key.clone(), agent)
            })
            .collect();
        // Nothing was registered: each running instance's executor reports its health again.
        Agents { limits: old.limits, agents, tasks: old.tasks, endpoints: OrdMap::new() }
    }
}

/// The state machine as format 5 stored it: agents without ports, health checks or registry.
#[derive(Deserialize)]
pub struct StateMachineV5 {
    limits: Limits,
    tasks: OrdMap<TaskId, Task>,
    next_task_id: u64,
    idempotency: OrdMap<String, TaskId>,
    dependents: OrdMap<TaskId, OrdSet<TaskId>>,
    now_unix_ms: u64,
    pending: OrdSet<PendingKey>,
    deadlines: OrdSet<(u64, TaskId)>,
    executors: OrdMap<ExecutorId, Executor>,
    next_executor_id: u64,
    next_fencing_token: u64,
    join_tokens: OrdMap<[u8; 32], JoinTokenRecord>,
    ca: Option<ClusterCaRecord>,
    finished_order: OrdMap<u64, TaskId>,
    next_finish_seq: u64,
    models: OrdMap<ModelVersion, ModelRecord>,
    current_model: Option<ModelVersion>,
    next_model_version: u64,
    acl_bootstrapped: bool,
    acl_tokens: OrdMap<String, AclToken>,
    acl_by_secret: OrdMap<[u8; 32], String>,
    finished_removed_through: u64,
    by_state: OrdSet<(TaskState, TaskId)>,
    state_counts: [u64; TaskState::ALL.len()],
    workflow_limits: WorkflowLimits,
    workflows: OrdMap<WorkflowId, Workflow>,
    next_workflow_id: u64,
    task_steps: OrdMap<TaskId, StepTask>,
    outputs: OrdMap<TaskId, Outputs>,
    messaging: Messaging,
    agents: AgentsV5,
}

impl From<StateMachineV5> for StateMachine {
    fn from(old: StateMachineV5) -> StateMachine {
        StateMachine {
            limits: old.limits,
            tasks: old.tasks,
            next_task_id: old.next_task_id,
            idempotency: old.idempotency,
            dependents: old.dependents,
            now_unix_ms: old.now_unix_ms,
            pending: old.pending,
            deadlines: old.deadlines,
            executors: old.executors,
            next_executor_id: old.next_executor_id,
            next_fencing_token: old.next_fencing_token,
            join_tokens: old.join_tokens,
            ca: old.ca,
            finished_order: old.finished_order,
            next_finish_seq: old.next_finish_seq,
            models: old.models,
            current_model: old.current_model,
            next_model_version: old.next_model_version,
            acl_bootstrapped: old.acl_bootstrapped,
            acl_tokens: old.acl_tokens,
            acl_by_secret: old.acl_by_secret,
            finished_removed_through: old.finished_removed_through,
            by_state: old.by_state,
            state_counts: old.state_counts,
            workflow_limits: old.workflow_limits,
            workflows: old.workflows,
            next_workflow_id: old.next_workflow_id,
            task_steps: old.task_steps,
            outputs: old.outputs,
            messaging: old.messaging,
            agents: old.agents.into(),
        }
    }
}
