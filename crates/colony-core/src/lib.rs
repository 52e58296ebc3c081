//! Colony's deterministic heart: domain types and the replicated state machine.
//!
//! This crate does no I/O, reads no clock and has no async: it takes commands and returns results,
//! so every replica that applies the same log reaches byte-identical state. It must never depend
//! on tokio, tonic, quinn, rocksdb, prometheus or cudarc.

pub mod ids;
pub mod limits;
pub mod resources;
pub mod state_machine;
pub mod task;

pub use ids::{ExecutorId, FencingToken, ModelVersion, NodeId, TaskId};
pub use limits::Limits;
pub use resources::{parse_cpu_millis, parse_memory_bytes, QuantityError, Resources};
pub use state_machine::{Command, CommandError, Outcome, Proposal, StateMachine, TaskFilter};
pub use task::{RunSpec, SpecError, Task, TaskSpec, TaskState};
