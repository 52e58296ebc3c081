//! Long-running agents: a task spec kept running as a number of instances, restarted by a policy
//! with backoff, replaced when their executor is lost, and rolled one instance at a time onto a
//! new spec.
//!
//! Each instance is a task of the agent's namespace named `<agent>-<index>`; a task that ends is
//! replaced in the same apply by a new task for the same instance (unless the policy says it may
//! stay down, or the agent is stopped), not placed before its backoff passes.

use crate::ids::TaskId;
use crate::limits::Limits;
use crate::task::{RunSpec, SpecError, TaskSpec};
use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Set in every instance's environment.
pub const AGENT_NAME_ENV: &str = "COLONY_AGENT";
pub const AGENT_INSTANCE_ENV: &str = "COLONY_AGENT_INSTANCE";

/// When an instance that ended is started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Whatever the end: a success, a failure, a lost executor.
    Always,
    /// Unless it succeeded (exit 0): an instance that finished its work stays down.
    OnFailure,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
        }
    }
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(RestartPolicy::Always),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            other => {
                Err(format!("restart policy {other:?} is neither \"always\" nor \"on-failure\""))
            }
        }
    }
}

/// How an executor checks that an instance serves: a command that exits 0, or an HTTP GET of a
/// path on the instance's port that answers 2xx.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    Command { program: String, args: Vec<String> },
    Http { path: String },
}

/// A health check: run every `interval_ms`, each run given `timeout_ms` (a check that hangs
/// fails); an instance is healthy from its first passing check until `failures` fail in a row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub failures: u32,
}

/// A healthy instance's entry in the registry: where it serves, and since when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// `host:port` (the executor's advertised host and the instance's port), or the host alone
    /// when the instance asked for no port.
    pub address: String,
    pub healthy_since_unix_ms: u64,
}

/// The most an endpoint address may be.
pub const ENDPOINT_ADDRESS_BYTES_MAX: usize = 262;
/// Bounds on a health check, so a spec cannot ask an executor for absurd work.
pub const HEALTH_INTERVAL_MS_MIN: u64 = 100;
pub const HEALTH_INTERVAL_MS_MAX: u64 = 3_600_000;
pub const HEALTH_TIMEOUT_MS_MIN: u64 = 10;
pub const HEALTH_FAILURES_MAX: u32 = 100;
pub const HEALTH_PATH_BYTES_MAX: usize = 1024;

impl HealthCheck {
    fn validate(&self, port: bool, limits: &Limits) -> Result<(), String> {
        if !(HEALTH_INTERVAL_MS_MIN..=HEALTH_INTERVAL_MS_MAX).contains(&self.interval_ms) {
            return Err(format!(
                "health interval {} ms is outside {HEALTH_INTERVAL_MS_MIN}..={HEALTH_INTERVAL_MS_MAX} ms",
                self.interval_ms
            ));
        }
        if self.timeout_ms < HEALTH_TIMEOUT_MS_MIN || self.timeout_ms > self.interval_ms {
            return Err(format!(
                "health timeout {} ms must be at least {HEALTH_TIMEOUT_MS_MIN} ms and at most the interval ({} ms)",
                self.timeout_ms, self.interval_ms
            ));
        }
        if self.failures == 0 || self.failures > HEALTH_FAILURES_MAX {
            return Err(format!(
                "health failures {} is outside 1..={HEALTH_FAILURES_MAX}",
                self.failures
            ));
        }
        match &self.probe {
            Probe::Command { program, args } => {
                if program.is_empty() || program.len() > limits.arg_bytes_max {
                    return Err(format!(
                        "health command program must be 1..={} bytes",
                        limits.arg_bytes_max
                    ));
                }
                if args.len() > limits.args_max
                    || args.iter().any(|a| a.len() > limits.arg_bytes_max)
                {
                    return Err(format!(
                        "health command takes at most {} arguments of at most {} bytes",
                        limits.args_max, limits.arg_bytes_max
                    ));
                }
            }
            Probe::Http { path } => {
                if !port {
                    return Err(
                        "an HTTP health check needs the instance's port: ask for one (--port)"
                            .to_owned(),
                    );
                }
                if !path.starts_with('/')
                    || path.len() > HEALTH_PATH_BYTES_MAX
                    || !path.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(format!(
                        "health path {path:?} must start with / and be at most {HEALTH_PATH_BYTES_MAX} visible ASCII characters"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Bounds on agents. Named, so an error says which one was passed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentLimits {
    pub agents_max: usize,
    pub replicas_max: u32,
    pub backoff_ms_max: u64,
}

impl Default for AgentLimits {
    fn default() -> Self {
        AgentLimits { agents_max: 1_000, replicas_max: 100, backoff_ms_max: 3_600_000 }
    }
}

/// What a user asks to keep running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSpec {
    pub name: String,
    pub namespace: String,
    /// The template of every instance's task: what runs, where, with which resources. Its name,
    /// namespace, retries, timeout, deadline, dependencies and idempotency key are the agent's to
    /// set and must be left empty.
    pub task: TaskSpec,
    pub replicas: u32,
    pub restart: RestartPolicy,
    /// The first restart waits this long; each further one in a row twice as long, up to
    /// `backoff_ms_max`. An instance that ran a minute before it ended starts over at the first.
    pub backoff_ms_base: u64,
    pub backoff_ms_max: u64,
    /// Each instance gets a port of its executor's, in `COLONY_PORT`, registered with it.
    pub port: bool,
    /// Without one, an instance counts as healthy once it runs.
    pub health: Option<HealthCheck>,
}

/// How long an instance must have run for its next restart to count as the first in a row.
pub const RESTART_STREAK_RESET_MS: u64 = 60_000;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent: {0}")]
    Invalid(String),
    #[error("invalid agent task: {0}")]
    Task(#[from] SpecError),
}

impl AgentSpec {
    /// Checks the spec on its own: the name, the replica count and backoff within the limits, and
    /// an instance's task spec valid.
    pub fn validate(&self, limits: &Limits, agent_limits: &AgentLimits) -> Result<(), AgentError> {
        let invalid = |why: String| Err(AgentError::Invalid(why));
        if self.name.is_empty()
            || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return invalid(format!(
                "name {:?} must be letters, digits, - and _ (it names the instances' tasks)",
                self.name
            ));
        }
        if self.replicas == 0 || self.replicas > agent_limits.replicas_max {
            return invalid(format!(
                "replicas {} is outside 1..={} (stop the agent to run none)",
                self.replicas, agent_limits.replicas_max
            ));
        }
        if self.backoff_ms_base == 0
            || self.backoff_ms_base > self.backoff_ms_max
            || self.backoff_ms_max > agent_limits.backoff_ms_max
        {
            return invalid(format!(
                "backoff {} ms to {} ms must be above zero, in order and at most {} ms",
                self.backoff_ms_base, self.backoff_ms_max, agent_limits.backoff_ms_max
            ));
        }
        let t = &self.task;
        if !t.name.is_empty()
            || t.max_retries != 0
            || t.timeout_ms.is_some()
            || t.deadline_unix_ms.is_some()
            || !t.dependencies.is_empty()
            || t.idempotency_key.is_some()
        {
            return invalid(
                "an agent's task template sets no name, retries, timeout, deadline, dependencies or idempotency key: the agent sets them".to_owned(),
            );
        }
        if let Some(health) = &self.health {
            health.validate(self.port, limits).map_err(AgentError::Invalid)?;
        }
        self.instance_task(self.replicas - 1).validate(limits)?;
        Ok(())
    }

    /// The task spec of instance `index`.
    pub fn instance_task(&self, index: u32) -> TaskSpec {
        let mut task = self.task.clone();
        task.name = format!("{}-{index}", self.name);
        task.namespace = self.namespace.clone();
        if let RunSpec::Process { env, .. } = &mut task.run {
            env.insert(AGENT_NAME_ENV.to_owned(), self.name.clone());
            env.insert(AGENT_INSTANCE_ENV.to_owned(), index.to_string());
        }
        task
    }

    /// The wait before restart number `streak` in a row (1 is the first).
    pub fn backoff_ms(&self, streak: u32) -> u64 {
        let doublings = streak.saturating_sub(1).min(32);
        self.backoff_ms_base.saturating_mul(1u64 << doublings).min(self.backoff_ms_max)
    }
}

/// An agent's identity: its namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AgentKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One of an agent's instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The task running (or waiting to run) this instance.
    pub task: TaskId,
    /// The spec version the task runs.
    pub version: u64,
    /// During a rolling update: the older version's task, left running until `task` runs.
    pub replacing: Option<TaskId>,
    /// Restarts in a row without a minute of running.
    pub streak: u32,
    pub restarts: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentState {
    Running,
    Stopped,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Running => "running",
            AgentState::Stopped => "stopped",
        }
    }
}

/// An agent as the cluster keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    pub spec: AgentSpec,
    /// Starts at 1; each changed spec is the next version.
    pub version: u64,
    pub state: AgentState,
    /// Instances by index, `0..replicas`; an instance that stays down (a success under
    /// `on-failure`) is absent.
    pub instances: OrdMap<u32, Instance>,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// Why the agent is as it is, when something needs saying (an instance left down).
    pub reason: Option<String>,
}

/// Every agent, and the instance each current agent task runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agents {
    pub limits: AgentLimits,
    pub agents: OrdMap<AgentKey, Agent>,
    /// Exactly the unfinished tasks of agents' instances (current or being replaced).
    pub tasks: OrdMap<TaskId, (AgentKey, u32)>,
    /// The registry: every running instance task whose executor last said it is healthy.
    pub endpoints: OrdMap<TaskId, Endpoint>,
}
