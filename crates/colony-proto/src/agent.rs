//! Conversions between agent proto messages and colony-core's agent spec. A message that cannot
//! become a valid core value is an error naming the field, never a panic.

use crate::messaging::namespace_or_default;
use crate::pb;
use colony_core::{AgentSpec, RestartPolicy, TaskSpec};

/// Restarts wait this long at first, and at most this long, unless the spec says.
pub const BACKOFF_MS_BASE_DEFAULT: u64 = 1_000;
pub const BACKOFF_MS_MAX_DEFAULT: u64 = 60_000;

impl TryFrom<pb::AgentSpec> for AgentSpec {
    type Error = String;

    fn try_from(a: pb::AgentSpec) -> Result<Self, Self::Error> {
        let task = a.task.ok_or("the agent spec has no task")?;
        let task = TaskSpec::try_from(task).map_err(|e| format!("task: {e}"))?;
        let restart = match a.restart.as_str() {
            "" => RestartPolicy::OnFailure,
            other => other.parse()?,
        };
        Ok(AgentSpec {
            name: a.name,
            namespace: namespace_or_default(&a.namespace),
            task,
            replicas: a.replicas,
            restart,
            backoff_ms_base: if a.backoff_ms_base == 0 {
                BACKOFF_MS_BASE_DEFAULT
            } else {
                a.backoff_ms_base
            },
            backoff_ms_max: if a.backoff_ms_max == 0 {
                BACKOFF_MS_MAX_DEFAULT
            } else {
                a.backoff_ms_max
            },
        })
    }
}

impl From<&AgentSpec> for pb::AgentSpec {
    fn from(a: &AgentSpec) -> Self {
        pb::AgentSpec {
            name: a.name.clone(),
            namespace: a.namespace.clone(),
            task: Some(pb::TaskSpec::from(&a.task)),
            replicas: a.replicas,
            restart: a.restart.as_str().to_owned(),
            backoff_ms_base: a.backoff_ms_base,
            backoff_ms_max: a.backoff_ms_max,
        }
    }
}
