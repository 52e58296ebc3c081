//! Training examples: a finished task from the cluster's feed turned into (features, targets),
//! or the reason it cannot be one, and the bounded buffer the learner keeps them in.

use std::collections::VecDeque;

use colony_core::{ExecutorSpec, Resources, TaskSpec};
use colony_model::features::{self, FEATURES, PEAK_MEMORY_BYTES_MAX, RUNTIME_MS_MAX, TARGETS};
use colony_proto::pb;
use thiserror::Error;

/// The most examples the learner keeps; the oldest go first.
pub const EXAMPLES_MAX: usize = 50_000;

/// One observed run.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Its position in the cluster's finish order.
    pub seq: u64,
    pub task_id: u64,
    /// [`features::kind`] of the task, for the baseline.
    pub kind: String,
    pub features: [f32; FEATURES],
    pub targets: [f32; TARGETS],
}

/// Why a finished task is not a training example. Failed and cancelled tasks are the common,
/// expected case; the rest indicate a bug or a broken measurement somewhere upstream.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum Rejected {
    #[error("the record holds no task")]
    MissingTask,
    #[error("the task's spec is missing or invalid: {reason}")]
    BadSpec { reason: String },
    #[error("the task did not succeed (state {state})")]
    NotSucceeded { state: i32 },
    #[error("the task has no start or finish time")]
    MissingTimes,
    #[error("the task finished at {finished_unix_ms} but started at {started_unix_ms}")]
    RuntimeNotPositive { started_unix_ms: u64, finished_unix_ms: u64 },
    #[error("a runtime of {runtime_ms} ms exceeds the limit of {max} ms")]
    RuntimeTooLong { runtime_ms: u64, max: u64 },
    #[error("the task has no peak memory measurement")]
    MissingMemory,
    #[error("the task's peak memory is 0 bytes")]
    MemoryZero,
    #[error("a peak memory of {bytes} bytes exceeds the limit of {max}")]
    MemoryTooLarge { bytes: u64, max: u64 },
    #[error("feature {index} is {value}, not a finite number")]
    NonFiniteFeature { index: usize, value: f32 },
}

impl Rejected {
    /// Every value [`Rejected::reason`] returns, so the metric's series exist from the start.
    pub const REASONS: [&'static str; 10] = [
        "missing_task",
        "bad_spec",
        "not_succeeded",
        "missing_times",
        "runtime_not_positive",
        "runtime_too_long",
        "missing_memory",
        "memory_zero",
        "memory_too_large",
        "non_finite_feature",
    ];

    /// The metric label of this reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejected::MissingTask => "missing_task",
            Rejected::BadSpec { .. } => "bad_spec",
            Rejected::NotSucceeded { .. } => "not_succeeded",
            Rejected::MissingTimes => "missing_times",
            Rejected::RuntimeNotPositive { .. } => "runtime_not_positive",
            Rejected::RuntimeTooLong { .. } => "runtime_too_long",
            Rejected::MissingMemory => "missing_memory",
            Rejected::MemoryZero => "memory_zero",
            Rejected::MemoryTooLarge { .. } => "memory_too_large",
            Rejected::NonFiniteFeature { .. } => "non_finite_feature",
        }
    }
}

/// The executor as the model sees it; only what [`features::features`] reads matters.
pub fn executor_spec(executor: &pb::Executor) -> ExecutorSpec {
    ExecutorSpec {
        name: executor.name.clone(),
        capacity: executor.capacity.clone().map(Resources::from).unwrap_or_default(),
        labels: executor.labels.iter().map(|(key, value)| (key.clone(), value.clone())).collect(),
        capabilities: executor.capabilities.iter().cloned().collect(),
    }
}

/// The example a finished task makes, or why it makes none.
pub fn example(finished: &pb::FinishedTask) -> Result<Example, Rejected> {
    let task = finished.task.as_ref().ok_or(Rejected::MissingTask)?;
    if task.state != pb::TaskState::Succeeded as i32 {
        return Err(Rejected::NotSucceeded { state: task.state });
    }
    let spec =
        task.spec.clone().ok_or_else(|| Rejected::BadSpec { reason: "missing".to_owned() })?;
    let spec = TaskSpec::try_from(spec)
        .map_err(|error| Rejected::BadSpec { reason: error.to_string() })?;
    let (Some(started_unix_ms), Some(finished_unix_ms)) =
        (task.started_unix_ms, task.finished_unix_ms)
    else {
        return Err(Rejected::MissingTimes);
    };
    let runtime_ms = match finished_unix_ms.checked_sub(started_unix_ms) {
        Some(runtime_ms) if runtime_ms > 0 => runtime_ms,
        _ => return Err(Rejected::RuntimeNotPositive { started_unix_ms, finished_unix_ms }),
    };
    if runtime_ms > RUNTIME_MS_MAX {
        return Err(Rejected::RuntimeTooLong { runtime_ms, max: RUNTIME_MS_MAX });
    }
    let bytes = task.peak_memory_bytes.ok_or(Rejected::MissingMemory)?;
    if bytes == 0 {
        return Err(Rejected::MemoryZero);
    }
    if bytes > PEAK_MEMORY_BYTES_MAX {
        return Err(Rejected::MemoryTooLarge { bytes, max: PEAK_MEMORY_BYTES_MAX });
    }
    let executor = finished.executor.as_ref().map(executor_spec);
    let features = features::features(&spec, executor.as_ref());
    if let Some((index, &value)) = features.iter().enumerate().find(|(_, value)| !value.is_finite())
    {
        return Err(Rejected::NonFiniteFeature { index, value });
    }
    Ok(Example {
        seq: finished.seq,
        task_id: task.id,
        kind: features::kind(&spec),
        features,
        targets: features::targets(runtime_ms as f64, bytes as f64),
    })
}

/// The most recent examples, at most a fixed number, oldest first.
#[derive(Debug)]
pub struct Examples {
    items: VecDeque<Example>,
    capacity: usize,
}

impl Default for Examples {
    fn default() -> Self {
        Self::with_limit(EXAMPLES_MAX)
    }
}

impl Examples {
    /// A buffer of at most `capacity` examples (at least one).
    pub fn with_limit(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self { items: VecDeque::with_capacity(capacity.min(EXAMPLES_MAX)), capacity }
    }

    /// Adds an example, dropping the oldest when full.
    pub fn push(&mut self, example: Example) {
        if self.items.len() == self.capacity {
            self.items.pop_front();
        }
        self.items.push_back(example);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The highest finish sequence number held, if any.
    pub fn last_seq(&self) -> Option<u64> {
        self.items.back().map(|example| example.seq)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Example> {
        self.items.iter()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use colony_model::fixtures::process_task;

    /// A succeeded task that ran `runtime_ms` and peaked at `bytes`.
    pub(crate) fn finished(
        seq: u64,
        spec: &TaskSpec,
        runtime_ms: u64,
        bytes: Option<u64>,
    ) -> pb::FinishedTask {
        pb::FinishedTask {
            seq,
            task: Some(pb::Task {
                id: seq + 1000,
                spec: Some(spec.into()),
                state: pb::TaskState::Succeeded as i32,
                started_unix_ms: Some(1_000_000),
                finished_unix_ms: Some(1_000_000 + runtime_ms),
                peak_memory_bytes: bytes,
                finish_seq: Some(seq),
                ..pb::Task::default()
            }),
            executor: Some(pb::Executor {
                name: "exec-1".to_owned(),
                capacity: Some(pb::Resources {
                    cpu_millis: 4000,
                    memory_bytes: 8 << 30,
                    ..pb::Resources::default()
                }),
                ..pb::Executor::default()
            }),
        }
    }

    #[test]
    fn a_good_record_becomes_an_example() -> Result<(), Rejected> {
        let spec = process_task("etl-4", &["a"]);
        let record = finished(7, &spec, 1500, Some(64 << 20));
        let example = example(&record)?;
        assert_eq!((example.seq, example.task_id), (7, 1007));
        assert_eq!(example.kind, "etl");
        assert_eq!(example.targets, features::targets(1500.0, (64u64 << 20) as f64));
        let executor = record.executor.as_ref().map(executor_spec);
        assert_eq!(example.features, features::features(&spec, executor.as_ref()));
        Ok(())
    }

    #[test]
    fn bad_records_are_rejected_with_their_reason() {
        let spec = process_task("etl-4", &[]);
        let good = finished(1, &spec, 1500, Some(1 << 20));
        let with = |change: &dyn Fn(&mut pb::Task)| {
            let mut record = good.clone();
            if let Some(task) = record.task.as_mut() {
                change(task);
            }
            example(&record).map(|_| ()).map_err(|error| error.reason())
        };
        assert_eq!(with(&|_| {}), Ok(()));
        assert_eq!(with(&|t| t.state = pb::TaskState::Failed as i32), Err("not_succeeded"));
        assert_eq!(with(&|t| t.spec = None), Err("bad_spec"));
        assert_eq!(
            with(&|t| if let Some(spec) = t.spec.as_mut() {
                spec.priority = 5000;
            }),
            Err("bad_spec")
        );
        assert_eq!(with(&|t| t.started_unix_ms = None), Err("missing_times"));
        assert_eq!(with(&|t| t.finished_unix_ms = None), Err("missing_times"));
        assert_eq!(with(&|t| t.finished_unix_ms = t.started_unix_ms), Err("runtime_not_positive"));
        assert_eq!(with(&|t| t.finished_unix_ms = Some(1)), Err("runtime_not_positive"));
        assert_eq!(
            with(&|t| t.finished_unix_ms = Some(1_000_000 + RUNTIME_MS_MAX + 1)),
            Err("runtime_too_long")
        );
        assert_eq!(with(&|t| t.finished_unix_ms = Some(1_000_000 + RUNTIME_MS_MAX)), Ok(()));
        assert_eq!(with(&|t| t.peak_memory_bytes = None), Err("missing_memory"));
        assert_eq!(with(&|t| t.peak_memory_bytes = Some(0)), Err("memory_zero"));
        assert_eq!(
            with(&|t| t.peak_memory_bytes = Some(PEAK_MEMORY_BYTES_MAX + 1)),
            Err("memory_too_large")
        );
        assert_eq!(
            example(&pb::FinishedTask::default()).map_err(|e| e.reason()),
            Err("missing_task")
        );
        let message = match example(&finished(1, &spec, 1500, Some(0))) {
            Err(error) => error.to_string(),
            Ok(example) => panic!("accepted {example:?}"),
        };
        assert_eq!(message, "the task's peak memory is 0 bytes");
    }

    #[test]
    fn every_reason_is_listed() {
        let all = [
            Rejected::MissingTask,
            Rejected::BadSpec { reason: String::new() },
            Rejected::NotSucceeded { state: 0 },
            Rejected::MissingTimes,
            Rejected::RuntimeNotPositive { started_unix_ms: 0, finished_unix_ms: 0 },
            Rejected::RuntimeTooLong { runtime_ms: 0, max: 0 },
            Rejected::MissingMemory,
            Rejected::MemoryZero,
            Rejected::MemoryTooLarge { bytes: 0, max: 0 },
            Rejected::NonFiniteFeature { index: 0, value: f32::NAN },
        ];
        let reasons: Vec<&str> = all.iter().map(Rejected::reason).collect();
        assert_eq!(reasons, Rejected::REASONS);
    }

    #[test]
    fn the_buffer_keeps_the_newest() -> Result<(), Rejected> {
        let spec = process_task("etl-4", &[]);
        let mut examples = Examples::with_limit(3);
        assert_eq!(examples.last_seq(), None);
        for seq in 1..=5 {
            examples.push(example(&finished(seq, &spec, 10, Some(1 << 20)))?);
        }
        assert_eq!(examples.len(), 3);
        let seqs: Vec<u64> = examples.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!(examples.last_seq(), Some(5));
        Ok(())
    }
}
