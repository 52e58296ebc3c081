//! Colony's deterministic heart: domain types and the replicated state machine.
//!
//! This crate does no I/O, reads no clock and has no async: it takes commands and returns results,
//! so every replica that applies the same log reaches byte-identical state. It must never depend
//! on tokio, tonic, quinn, rocksdb, prometheus or cudarc.

pub mod acl;
pub mod agent;
pub mod executor;
pub mod ids;
pub mod leader;
pub mod limits;
pub mod messaging;
pub mod model;
pub mod resources;
pub mod scheduler;
pub mod state_machine;
pub mod task;
pub mod workflow;

pub use acl::{AclToken, Grant, JoinKind, Permission, Role, DEFAULT_NAMESPACE};
pub use agent::{
    Agent, AgentKey, AgentLimits, AgentSpec, AgentState, Endpoint, HealthCheck, Instance, Probe,
    RestartPolicy,
};
pub use executor::{ClusterCaRecord, Executor, ExecutorSpec, ExecutorState, JoinTokenRecord};
pub use ids::{ExecutorId, FencingToken, ModelVersion, NodeId, TaskId, WorkflowId};
pub use limits::Limits;
pub use messaging::{
    Acked, DeadLetter, Delivered, DeliveryRef, Message, MessageError, MessageLimits, MessageTotals,
    Messaging, PublishSpec, Published, ReceiveSpec, Received, Topic, TopicKey, TopicPolicy,
    TopicSummary, WhenFull,
};
pub use model::{ModelMetrics, ModelRecord};
pub use resources::{
    parse_cpu_millis, parse_memory_bytes, QuantityError, ResourceKind, Resources, Shortfall,
};
pub use state_machine::{
    AgentSpecV5, Assignment, AttemptOutcome, AttemptResult, AttemptStatus, Collected, Command,
    CommandError, ConstraintMismatch, InvariantViolation, Outcome, Outputs, Placement,
    PlacementRejection, Proposal, Restored, Retention, StateMachine, StateMachineV2,
    StateMachineV3, StateMachineV4, StateMachineV5, TaskFilter, RESTORE_TOKEN_EPOCH,
};
pub use task::{PlacementPolicy, RunSpec, SpecError, Task, TaskSpec, TaskState};
pub use workflow::{
    InputSource, Item, OutputRef, StepRun, StepSpec, StepState, StepTask, Workflow, WorkflowError,
    WorkflowLimits, WorkflowSpec, WorkflowState,
};
