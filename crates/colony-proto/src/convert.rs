//! Conversions between proto messages and colony-core types. A message that cannot become a valid
//! core value is a `ConversionError`, never a panic.

use crate::pb;
use colony_core::{
    Executor, ExecutorId, ExecutorSpec, FencingToken, ModelMetrics, ModelRecord, PlacementPolicy,
    Resources, RunSpec, Task, TaskId, TaskSpec, TaskState,
};

/// A proto message that does not describe a valid core value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("priority {0} is out of range 0..=1000")]
    Priority(u32),
    #[error("unknown task state {0}")]
    State(i32),
    #[error("unknown placement policy {0}")]
    Placement(i32),
    #[error("unknown attempt outcome {0}")]
    AttemptOutcome(i32),
    #[error("{field} is {bytes} bytes; the limit is {max}")]
    TooLong { field: &'static str, bytes: usize, max: usize },
}

impl From<&Resources> for pb::Resources {
    fn from(r: &Resources) -> Self {
        pb::Resources {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            gpus: r.gpus,
            custom: r.custom.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

impl From<pb::Resources> for Resources {
    fn from(r: pb::Resources) -> Self {
        Resources {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            gpus: r.gpus,
            custom: r.custom.into_iter().collect(),
        }
    }
}

impl From<&TaskSpec> for pb::TaskSpec {
    fn from(s: &TaskSpec) -> Self {
        let run = match &s.run {
            RunSpec::Process { program, args, env } => {
                pb::task_spec::Run::Process(pb::ProcessRun {
                    program: program.clone(),
                    args: args.clone(),
                    env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                })
            }
            RunSpec::Builtin { handler, input } => pb::task_spec::Run::Builtin(pb::BuiltinRun {
                handler: handler.clone(),
                input: input.clone(),
            }),
        };
        pb::TaskSpec {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            labels: s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            capabilities: s.capabilities.iter().cloned().collect(),
            resources: Some((&s.resources).into()),
            priority: u32::from(s.priority),
            deadline_unix_ms: s.deadline_unix_ms,
            timeout_ms: s.timeout_ms,
            max_retries: s.max_retries,
            dependencies: s.dependencies.iter().map(|d| d.0).collect(),
            run: Some(run),
            idempotency_key: s.idempotency_key.clone(),
            memory_auto: s.memory_auto,
            placement: match s.placement {
                PlacementPolicy::BinPack => pb::PlacementPolicy::BinPack,
                PlacementPolicy::Spread => pb::PlacementPolicy::Spread,
            } as i32,
        }
    }
}

impl TryFrom<pb::TaskSpec> for TaskSpec {
    type Error = ConversionError;

    fn try_from(s: pb::TaskSpec) -> Result<Self, Self::Error> {
        let run = match s.run.ok_or(ConversionError::Missing("spec.run"))? {
            pb::task_spec::Run::Process(p) => RunSpec::Process {
                program: p.program,
                args: p.args,
                env: p.env.into_iter().collect(),
            },
            pb::task_spec::Run::Builtin(b) => {
                RunSpec::Builtin { handler: b.handler, input: b.input }
            }
        };
        let priority = u16::try_from(s.priority)
            .ok()
            .filter(|p| *p <= 1000)
            .ok_or(ConversionError::Priority(s.priority))?;
        let placement = match pb::PlacementPolicy::try_from(s.placement)
            .map_err(|_| ConversionError::Placement(s.placement))?
        {
            pb::PlacementPolicy::Unspecified | pb::PlacementPolicy::BinPack => {
                PlacementPolicy::BinPack
            }
            pb::PlacementPolicy::Spread => PlacementPolicy::Spread,
        };
        // A client that leaves the namespace out (proto3's empty string) means the default one.
        let namespace = match s.namespace.is_empty() {
            true => colony_core::DEFAULT_NAMESPACE.to_owned(),
            false => s.namespace,
        };
        Ok(TaskSpec {
            name: s.name,
            namespace,
            labels: s.labels.into_iter().collect(),
            capabilities: s.capabilities.into_iter().collect(),
            resources: s.resources.map(Resources::from).unwrap_or_default(),
            priority,
            deadline_unix_ms: s.deadline_unix_ms,
            timeout_ms: s.timeout_ms,
            max_retries: s.max_retries,
            dependencies: s.dependencies.into_iter().map(TaskId).collect(),
            run,
            idempotency_key: s.idempotency_key,
            placement,
            memory_auto: s.memory_auto,
        })
    }
}

/// What a reader without the right to see secrets gets instead of an environment value.
pub const REDACTED: &str = "<redacted>";

/// Replaces every environment value of a task's process with [`REDACTED`], keeping the keys.
pub fn redact_env(task: &mut pb::Task) {
    if let Some(pb::task_spec::Run::Process(process)) =
        task.spec.as_mut().and_then(|spec| spec.run.as_mut())
    {
        for value in process.env.values_mut() {
            *value = REDACTED.to_owned();
        }
    }
}

impl From<TaskState> for pb::TaskState {
    fn from(s: TaskState) -> Self {
        match s {
            TaskState::Blocked => pb::TaskState::Blocked,
            TaskState::Pending => pb::TaskState::Pending,
            TaskState::Assigned => pb::TaskState::Assigned,
            TaskState::Running => pb::TaskState::Running,
            TaskState::Succeeded => pb::TaskState::Succeeded,
            TaskState::Failed => pb::TaskState::Failed,
            TaskState::Cancelled => pb::TaskState::Cancelled,
            TaskState::TimedOut => pb::TaskState::TimedOut,
            TaskState::Lost => pb::TaskState::Lost,
        }
    }
}

/// The core state of a proto enum value; `Ok(None)` for UNSPECIFIED (meaning "any").
pub fn task_state_from_proto(value: i32) -> Result<Option<TaskState>, ConversionError> {
    let state = pb::TaskState::try_from(value).map_err(|_| ConversionError::State(value))?;
    Ok(match state {
        pb::TaskState::Unspecified => None,
        pb::TaskState::Blocked => Some(TaskState::Blocked),
        pb::TaskState::Pending => Some(TaskState::Pending),
        pb::TaskState::Assigned => Some(TaskState::Assigned),
        pb::TaskState::Running => Some(TaskState::Running),
        pb::TaskState::Succeeded => Some(TaskState::Succeeded),
        pb::TaskState::Failed => Some(TaskState::Failed),
        pb::TaskState::Cancelled => Some(TaskState::Cancelled),
        pb::TaskState::TimedOut => Some(TaskState::TimedOut),
        pb::TaskState::Lost => Some(TaskState::Lost),
    })
}

impl From<&Task> for pb::Task {
    fn from(t: &Task) -> Self {
        pb::Task {
            id: t.id.0,
            spec: Some((&t.spec).into()),
            state: pb::TaskState::from(t.state) as i32,
            attempt: t.attempt,
            fencing_token: t.fencing_token.map(|f| f.0),
            created_unix_ms: t.created_unix_ms,
            updated_unix_ms: t.updated_unix_ms,
            finished_unix_ms: t.finished_unix_ms,
            reason: t.reason.clone(),
            retries_used: t.retries_used,
            executor_id: t.executor.map(|e| e.0),
            not_before_unix_ms: t.not_before_unix_ms,
            started_unix_ms: t.started_unix_ms,
            exit_code: t.exit_code,
            stdout_tail: t.stdout_tail.clone(),
            stderr_tail: t.stderr_tail.clone(),
            peak_memory_bytes: t.peak_memory_bytes,
            finish_seq: t.finish_seq,
            allocated: Some((&t.allocated).into()),
        }
    }
}

impl TryFrom<pb::Task> for Task {
    type Error = ConversionError;

    fn try_from(t: pb::Task) -> Result<Self, Self::Error> {
        let state =
            task_state_from_proto(t.state)?.ok_or(ConversionError::Missing("task.state"))?;
        Ok(Task {
            id: TaskId(t.id),
            spec: t.spec.ok_or(ConversionError::Missing("task.spec"))?.try_into()?,
            state,
            attempt: t.attempt,
            fencing_token: t.fencing_token.map(FencingToken),
            created_unix_ms: t.created_unix_ms,
            updated_unix_ms: t.updated_unix_ms,
            finished_unix_ms: t.finished_unix_ms,
            reason: t.reason,
            retries_used: t.retries_used,
            executor: t.executor_id.map(ExecutorId),
            not_before_unix_ms: t.not_before_unix_ms,
            started_unix_ms: t.started_unix_ms,
            exit_code: t.exit_code,
            stdout_tail: t.stdout_tail,
            stderr_tail: t.stderr_tail,
            peak_memory_bytes: t.peak_memory_bytes,
            finish_seq: t.finish_seq,
            allocated: t.allocated.map(Resources::from).unwrap_or_default(),
        })
    }
}

/// An executor as operators see it; `heartbeat_age_ms` comes from the leader's memory.
pub fn executor_to_proto(e: &Executor, heartbeat_age_ms: Option<u64>) -> pb::Executor {
    pb::Executor {
        id: e.id.0,
        name: e.spec.name.clone(),
        state: e.state.as_str().to_owned(),
        capacity: Some((&e.spec.capacity).into()),
        allocated: Some((&e.allocated).into()),
        labels: e.spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        capabilities: e.spec.capabilities.iter().cloned().collect(),
        tasks: e.tasks.iter().map(|t| t.0).collect(),
        drain_deadline_unix_ms: e.drain_deadline_unix_ms,
        reason: e.reason.clone(),
        admitted_unix_ms: e.admitted_unix_ms,
        updated_unix_ms: e.updated_unix_ms,
        heartbeat_age_ms,
    }
}

/// A registry entry as operators see it; the weights only when asked for (they can be megabytes).
pub fn model_to_proto(m: &ModelRecord, current: bool, with_weights: bool) -> pb::Model {
    pb::Model {
        version: m.version.0,
        created_unix_ms: m.created_unix_ms,
        device: m.device.clone(),
        feature_schema: m.feature_schema.clone(),
        weights: if with_weights { m.weights.clone() } else { Vec::new() },
        metrics: Some(pb::ModelMetrics {
            holdout_mse: m.metrics.holdout_mse,
            baseline_mse: m.metrics.baseline_mse,
            previous_mse: m.metrics.previous_mse,
            train_rows: m.metrics.train_rows,
            holdout_rows: m.metrics.holdout_rows,
        }),
        current,
        weights_bytes: m.weights.len() as u64,
    }
}

/// A published model's metrics, as the registry stores them.
pub fn model_metrics_from_proto(m: &pb::ModelMetrics) -> ModelMetrics {
    ModelMetrics {
        holdout_mse: m.holdout_mse,
        baseline_mse: m.baseline_mse,
        previous_mse: m.previous_mse,
        train_rows: m.train_rows,
        holdout_rows: m.holdout_rows,
    }
}

/// What an executor's `Hello` offers, as the spec the cluster registers.
pub fn executor_spec_from_hello(hello: &pb::Hello) -> ExecutorSpec {
    ExecutorSpec {
        name: hello.name.clone(),
        capacity: hello.capacity.clone().map(Resources::from).unwrap_or_default(),
        labels: hello.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        capabilities: hello.capabilities.iter().cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn task_round_trips_through_proto() {
        let task = Task {
            id: TaskId(7),
            spec: TaskSpec {
                name: "build".into(),
                namespace: "default".into(),
                labels: BTreeMap::from([("zone".into(), "a".into())]),
                capabilities: ["shell".to_owned()].into(),
                resources: Resources {
                    cpu_millis: 250,
                    memory_bytes: 64 << 20,
                    gpus: 1,
                    custom: BTreeMap::from([("lic".into(), 2)]),
                },
                priority: 10,
                deadline_unix_ms: Some(99),
                timeout_ms: Some(1000),
                max_retries: 2,
                dependencies: [TaskId(3)].into(),
                run: RunSpec::Process {
                    program: "/bin/echo".into(),
                    args: vec!["hi".into()],
                    env: BTreeMap::from([("A".into(), "1".into())]),
                },
                idempotency_key: Some("k".into()),
                placement: PlacementPolicy::Spread,
                memory_auto: true,
            },
            state: TaskState::TimedOut,
            attempt: 1,
            retries_used: 1,
            fencing_token: Some(FencingToken(4)),
            executor: Some(ExecutorId(2)),
            not_before_unix_ms: 5,
            started_unix_ms: Some(6),
            exit_code: Some(-1),
            stdout_tail: "out".into(),
            stderr_tail: "err".into(),
            peak_memory_bytes: Some(3 << 20),
            finish_seq: Some(9),
            allocated: Resources {
                cpu_millis: 250,
                memory_bytes: 96 << 20,
                gpus: 1,
                custom: BTreeMap::from([("lic".into(), 2)]),
            },
            created_unix_ms: 1,
            updated_unix_ms: 2,
            finished_unix_ms: Some(2),
            reason: Some("late".into()),
        };
        let back = Task::try_from(pb::Task::from(&task));
        assert_eq!(back, Ok(task.clone()));
        let mut redacted = pb::Task::from(&task);
        redact_env(&mut redacted);
        let Ok(Task { spec: TaskSpec { run: RunSpec::Process { env, .. }, .. }, .. }) =
            Task::try_from(redacted)
        else {
            panic!("a redacted task still converts");
        };
        assert_eq!(env, BTreeMap::from([("A".to_owned(), REDACTED.to_owned())]));
    }

    #[test]
    fn a_spec_without_a_namespace_is_in_the_default_one() {
        let spec = pb::TaskSpec {
            name: "x".into(),
            run: Some(pb::task_spec::Run::Builtin(pb::BuiltinRun::default())),
            ..Default::default()
        };
        assert_eq!(TaskSpec::try_from(spec).map(|s| s.namespace), Ok("default".to_owned()));
    }

    #[test]
    fn malformed_messages_are_errors() {
        let spec = pb::TaskSpec {
            name: "x".into(),
            priority: 70_000,
            run: Some(pb::task_spec::Run::Builtin(pb::BuiltinRun::default())),
            ..Default::default()
        };
        assert_eq!(TaskSpec::try_from(spec), Err(ConversionError::Priority(70_000)));
        assert_eq!(
            TaskSpec::try_from(pb::TaskSpec::default()),
            Err(ConversionError::Missing("spec.run"))
        );
        assert_eq!(task_state_from_proto(42), Err(ConversionError::State(42)));
    }
}
