//! Tasks: what a user submits (`TaskSpec`), its lifecycle (`TaskState`) and the replicated record (`Task`).
//!
//! These types are persisted with bincode, which is not self-describing: no `skip_serializing_if`,
//! `flatten` or internally tagged enums here (the CLI renders its own JSON view).

use crate::ids::{ExecutorId, FencingToken, TaskId};
use crate::limits::Limits;
use crate::resources::Resources;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What a task runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunSpec {
    /// A program started as a child process of the executor.
    Process { program: String, args: Vec<String>, env: BTreeMap<String, String> },
    /// A handler built into the executor, named, with an opaque input.
    Builtin { handler: String, input: String },
}

/// How the scheduler chooses among executors that fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementPolicy {
    /// The fullest executor that fits: keeps whole executors free for large tasks.
    #[default]
    BinPack,
    /// The emptiest executor that fits: spreads load and failure impact.
    Spread,
}

/// Everything a user says about a task when submitting it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub name: String,
    pub namespace: String,
    /// Executor labels the task requires (`zone=a`): all must match.
    pub labels: BTreeMap<String, String>,
    /// Executor capabilities the task requires (`shell`, `gpu`).
    pub capabilities: BTreeSet<String>,
    pub resources: Resources,
    /// 0..=1000; higher runs first.
    pub priority: u16,
    /// Wall-clock time (unix milliseconds) by which the task must have started.
    pub deadline_unix_ms: Option<u64>,
    /// How long one attempt may run before it is killed.
    pub timeout_ms: Option<u64>,
    pub max_retries: u32,
    /// Tasks that must succeed before this one may run.
    pub dependencies: BTreeSet<TaskId>,
    pub run: RunSpec,
    /// A client-chosen key: a second submission with the same key returns the first task.
    pub idempotency_key: Option<String>,
    pub placement: PlacementPolicy,
    /// Memory is sized at placement by the cluster's model (`resources.memory_bytes` is ignored).
    pub memory_auto: bool,
}

/// Where a task is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Blocked,
    Pending,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    Lost,
}

impl TaskState {
    pub const ALL: [TaskState; 9] = [
        TaskState::Blocked,
        TaskState::Pending,
        TaskState::Assigned,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::TimedOut,
        TaskState::Lost,
    ];

    /// A finished task never changes state again.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded
                | TaskState::Failed
                | TaskState::Cancelled
                | TaskState::TimedOut
                | TaskState::Lost
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Blocked => "blocked",
            TaskState::Pending => "pending",
            TaskState::Assigned => "assigned",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::TimedOut => "timed_out",
            TaskState::Lost => "lost",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskState::ALL.into_iter().find(|state| state.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
            format!("unknown task state {s:?} (one of: {})", names.join(", "))
        })
    }
}

/// The replicated record of one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub spec: TaskSpec,
    pub state: TaskState,
    /// How many attempts have been assigned (0 until first assigned).
    pub attempt: u32,
    /// Failed or lost attempts that were retried; evictions (preemption, drain) do not count.
    pub retries_used: u32,
    /// The fencing token of the current or last assignment, if any.
    pub fencing_token: Option<FencingToken>,
    /// The executor holding the current attempt (assigned or running), or the one that ran the
    /// last attempt once the task has finished.
    pub executor: Option<ExecutorId>,
    /// A retried task is not placed before this time (backoff).
    pub not_before_unix_ms: u64,
    pub started_unix_ms: Option<u64>,
    pub exit_code: Option<i32>,
    /// The last bytes of the last attempt's output, as the executor reported them.
    pub stdout_tail: String,
    pub stderr_tail: String,
    /// Peak resident memory of the last attempt, as its executor measured it.
    pub peak_memory_bytes: Option<u64>,
    /// Position in the order tasks finished, from 1; set once finished.
    pub finish_seq: Option<u64>,
    /// What the current or last attempt holds (the spec's resources, with memory sized by the
    /// model for `memory_auto`).
    pub allocated: Resources,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub finished_unix_ms: Option<u64>,
    /// Why the task ended the way it did, when it did not succeed.
    pub reason: Option<String>,
}

/// Why a spec was refused before it touched any state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes; the limit is {max}")]
    TooLong { field: &'static str, len: usize, max: usize },
    #[error("{field} has {count} entries; the limit is {max}")]
    TooMany { field: &'static str, count: usize, max: usize },
    #[error("{field} {value:?} may contain only letters, digits, '-', '_', '.' and '/'")]
    BadCharacters { field: &'static str, value: String },
    #[error("priority {0} is out of range 0..=1000")]
    Priority(u16),
    #[error("{field} must be greater than zero")]
    Zero { field: &'static str },
    #[error("{field} contains a NUL byte")]
    Nul { field: &'static str },
}

pub(crate) fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), SpecError> {
    if value.len() > max {
        return Err(SpecError::TooLong { field, len: value.len(), max });
    }
    if value.contains('\0') {
        return Err(SpecError::Nul { field });
    }
    Ok(())
}

pub(crate) fn check_name(field: &'static str, value: &str, max: usize) -> Result<(), SpecError> {
    if value.is_empty() {
        return Err(SpecError::Empty { field });
    }
    check_len(field, value, max)?;
    let ok = value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if !ok {
        return Err(SpecError::BadCharacters { field, value: value.to_owned() });
    }
    Ok(())
}

pub(crate) fn check_count(field: &'static str, count: usize, max: usize) -> Result<(), SpecError> {
    if count > max {
        return Err(SpecError::TooMany { field, count, max });
    }
    Ok(())
}

impl TaskSpec {
    /// The bytes of every string the spec carries, plus 8 per dependency.
    pub fn size_bytes(&self) -> usize {
        let pairs = |map: &BTreeMap<String, String>| {
            map.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        };
        let run = match &self.run {
            RunSpec::Process { program, args, env } => {
                program.len() + args.iter().map(String::len).sum::<usize>() + pairs(env)
            }
            RunSpec::Builtin { handler, input } => handler.len() + input.len(),
        };
        self.name.len()
            + self.namespace.len()
            + pairs(&self.labels)
            + self.capabilities.iter().map(String::len).sum::<usize>()
            + self.resources.custom.keys().map(String::len).sum::<usize>()
            + self.dependencies.len() * 8
            + self.idempotency_key.as_ref().map_or(0, String::len)
            + run
    }

    /// Checks everything that can be checked without the state: names, sizes, ranges.
    pub fn validate(&self, limits: &Limits) -> Result<(), SpecError> {
        let size = self.size_bytes();
        if size > limits.spec_bytes_max {
            return Err(SpecError::TooLong {
                field: "task spec",
                len: size,
                max: limits.spec_bytes_max,
            });
        }
        check_name("name", &self.name, limits.name_bytes_max)?;
        check_name("namespace", &self.namespace, limits.name_bytes_max)?;
        if self.priority > 1000 {
            return Err(SpecError::Priority(self.priority));
        }
        check_count("labels", self.labels.len(), limits.labels_max)?;
        for (key, value) in &self.labels {
            check_name("label key", key, limits.name_bytes_max)?;
            check_len("label value", value, limits.label_value_bytes_max)?;
        }
        check_count("capabilities", self.capabilities.len(), limits.labels_max)?;
        for capability in &self.capabilities {
            check_name("capability", capability, limits.name_bytes_max)?;
        }
        check_count("custom resources", self.resources.custom.len(), limits.custom_resources_max)?;
        for name in self.resources.custom.keys() {
            check_name("custom resource name", name, limits.name_bytes_max)?;
        }
        check_count("dependencies", self.dependencies.len(), limits.dependencies_max)?;
        if self.timeout_ms == Some(0) {
            return Err(SpecError::Zero { field: "timeout" });
        }
        if self.max_retries > limits.retries_max {
            return Err(SpecError::TooMany {
                field: "retries",
                count: self.max_retries as usize,
                max: limits.retries_max as usize,
            });
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() {
                return Err(SpecError::Empty { field: "idempotency key" });
            }
            check_len("idempotency key", key, limits.name_bytes_max)?;
        }
        match &self.run {
            RunSpec::Process { program, args, env } => {
                if program.is_empty() {
                    return Err(SpecError::Empty { field: "program" });
                }
                check_len("program", program, limits.arg_bytes_max)?;
                check_count("args", args.len(), limits.args_max)?;
                for arg in args {
                    check_len("argument", arg, limits.arg_bytes_max)?;
                }
                check_count("env", env.len(), limits.env_max)?;
                for (key, value) in env {
                    if key.is_empty() {
                        return Err(SpecError::Empty { field: "env name" });
                    }
                    check_len("env name", key, limits.name_bytes_max)?;
                    check_len("env value", value, limits.arg_bytes_max)?;
                }
            }
            RunSpec::Builtin { handler, input } => {
                check_name("handler", handler, limits.name_bytes_max)?;
                check_len("handler input", input, limits.arg_bytes_max)?;
            }
        }
        Ok(())
    }
}
