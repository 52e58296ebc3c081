//! Conversions between agent proto messages and colony-core's agent spec. A message that cannot
//! become a valid core value is an error naming the field, never a panic.

use crate::messaging::namespace_or_default;
use crate::pb;
use colony_core::{AgentSpec, HealthCheck, Probe, RestartPolicy, TaskSpec};

/// Restarts wait this long at first, and at most this long, unless the spec says.
pub const BACKOFF_MS_BASE_DEFAULT: u64 = 1_000;
pub const BACKOFF_MS_MAX_DEFAULT: u64 = 60_000;
/// A health check runs this often, each run given this long, and this many failures in a row
/// make an instance unhealthy, unless the spec says.
pub const HEALTH_INTERVAL_MS_DEFAULT: u64 = 10_000;
pub const HEALTH_TIMEOUT_MS_DEFAULT: u64 = 2_000;
pub const HEALTH_FAILURES_DEFAULT: u32 = 3;

impl TryFrom<pb::HealthCheck> for HealthCheck {
    type Error = String;

    fn try_from(h: pb::HealthCheck) -> Result<Self, Self::Error> {
        let probe = match (h.command.split_first(), h.http_path.is_empty()) {
            (Some((program, args)), true) => {
                Probe::Command { program: program.clone(), args: args.to_vec() }
            }
            (None, false) => Probe::Http { path: h.http_path },
            (Some(_), false) => {
                return Err("a health check is a command or an HTTP path, not both".to_owned())
            }
            (None, true) => return Err("a health check needs a command or an HTTP path".to_owned()),
        };
        let or = |v: u64, default: u64| if v == 0 { default } else { v };
        Ok(HealthCheck {
            probe,
            interval_ms: or(h.interval_ms, HEALTH_INTERVAL_MS_DEFAULT),
            timeout_ms: or(h.timeout_ms, HEALTH_TIMEOUT_MS_DEFAULT),
            failures: if h.failures == 0 { HEALTH_FAILURES_DEFAULT } else { h.failures },
        })
    }
}

impl From<&HealthCheck> for pb::HealthCheck {
    fn from(h: &HealthCheck) -> Self {
        let (command, http_path) = match &h.probe {
            Probe::Command { program, args } => {
                (std::iter::once(program).chain(args).cloned().collect(), String::new())
            }
            Probe::Http { path } => (Vec::new(), path.clone()),
        };
        pb::HealthCheck {
            command,
            http_path,
            interval_ms: h.interval_ms,
            timeout_ms: h.timeout_ms,
            failures: h.failures,
        }
    }
}

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
            port: a.port,
            health: a
                .health
                .map(HealthCheck::try_from)
                .transpose()
                .map_err(|e| format!("health: {e}"))?,
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
            port: a.port,
            health: a.health.as_ref().map(pb::HealthCheck::from),
        }
    }
}
