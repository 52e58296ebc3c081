//! The Colony executor: joins the cluster over QUIC, keeps one connection to the leader, runs the
//! attempts it is assigned (child processes or built-in handlers) and reports how they went.
//!
//! Nothing here is replicated state: the truth about tasks lives in the servers' state machine,
//! and an executor only ever reports what it saw, fenced by each attempt's token. `sim` offers
//! simulated executors, which run nothing, for the scheduling benchmark.

mod agent;
mod attempt;
mod builtin;
mod cgroup;
mod config;
mod dial;
mod health;
mod identity;
mod join;
mod journal;
mod link;
mod local;
mod metrics;
#[cfg(test)]
mod protocol_tests;
mod runner;
mod sandbox;
pub mod sim;
mod step_io;

pub use agent::{run, AgentError};
pub use config::ExecutorConfig;
pub use health::PORT_RANGE_DEFAULT;
pub use identity::{Credentials, IdentityError};
pub use join::JoinError;
pub use link::LinkError;
pub use sandbox::{RUN_AS_DEFAULT, TASK_PIDS_MAX_DEFAULT};
