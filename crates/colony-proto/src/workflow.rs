//! Conversions between workflow proto messages and colony-core's workflow types. A message that
//! cannot become a valid core value is an error naming the step, never a panic.

use crate::convert::ConversionError;
use crate::pb;
use colony_core::{
    InputSource, OutputRef, StepRun, StepSpec, StepState, TaskSpec, Workflow, WorkflowSpec,
    WorkflowState,
};

/// A workflow message that does not describe a workflow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkflowConversionError {
    #[error("step {step}: {error}")]
    Step { step: String, error: String },
    #[error("workflow: {0}")]
    Workflow(String),
}

fn step_error(step: &str, error: impl ToString) -> WorkflowConversionError {
    WorkflowConversionError::Step { step: step.to_owned(), error: error.to_string() }
}

impl TryFrom<pb::WorkflowSpec> for WorkflowSpec {
    type Error = WorkflowConversionError;

    fn try_from(w: pb::WorkflowSpec) -> Result<Self, Self::Error> {
        let namespace = match w.namespace.is_empty() {
            true => colony_core::DEFAULT_NAMESPACE.to_owned(),
            false => w.namespace,
        };
        let steps = w
            .steps
            .into_iter()
            .map(|s| {
                let name = s.name;
                let task =
                    s.task.ok_or_else(|| step_error(&name, ConversionError::Missing("task")))?;
                let mut task = TaskSpec::try_from(task).map_err(|e| step_error(&name, e))?;
                task.namespace = namespace.clone();
                let inputs = s
                    .inputs
                    .into_iter()
                    .map(|(input, source)| {
                        InputSource::parse(&source)
                            .map(|source| (input.clone(), source))
                            .map_err(|e| step_error(&name, format!("input {input}: {e}")))
                    })
                    .collect::<Result<_, _>>()?;
                let for_each = match s.for_each.is_empty() {
                    true => None,
                    false => match InputSource::parse(&s.for_each) {
                        Ok(InputSource::Output(output)) => Some(output),
                        _ => {
                            return Err(step_error(
                                &name,
                                format!("for_each {:?} is not STEP.OUTPUT", s.for_each),
                            ))
                        }
                    },
                };
                Ok(StepSpec {
                    task,
                    after: s.after.into_iter().collect(),
                    inputs,
                    outputs: s.outputs.into_iter().collect(),
                    for_each,
                    allow_failure: s.allow_failure,
                    name,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(WorkflowSpec { name: w.name, namespace, params: w.params.into_iter().collect(), steps })
    }
}

impl From<&WorkflowSpec> for pb::WorkflowSpec {
    fn from(w: &WorkflowSpec) -> Self {
        pb::WorkflowSpec {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            params: w.params.clone().into_iter().collect(),
            steps: w
                .steps
                .iter()
                .map(|s| pb::WorkflowStep {
                    name: s.name.clone(),
                    task: Some(pb::TaskSpec::from(&s.task)),
                    after: s.after.iter().cloned().collect(),
                    inputs: s.inputs.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
                    outputs: s.outputs.iter().cloned().collect(),
                    for_each: s.for_each.as_ref().map(OutputRef::to_string).unwrap_or_default(),
                    allow_failure: s.allow_failure,
                })
                .collect(),
        }
    }
}

impl From<WorkflowState> for pb::WorkflowState {
    fn from(s: WorkflowState) -> Self {
        match s {
            WorkflowState::Running => pb::WorkflowState::Running,
            WorkflowState::Succeeded => pb::WorkflowState::Succeeded,
            WorkflowState::Failed => pb::WorkflowState::Failed,
            WorkflowState::Cancelled => pb::WorkflowState::Cancelled,
        }
    }
}

/// A list filter's state: `None` for unspecified (every state).
pub fn workflow_state_from_proto(value: i32) -> Result<Option<WorkflowState>, ConversionError> {
    let state = pb::WorkflowState::try_from(value).map_err(|_| ConversionError::State(value))?;
    Ok(match state {
        pb::WorkflowState::Unspecified => None,
        pb::WorkflowState::Running => Some(WorkflowState::Running),
        pb::WorkflowState::Succeeded => Some(WorkflowState::Succeeded),
        pb::WorkflowState::Failed => Some(WorkflowState::Failed),
        pb::WorkflowState::Cancelled => Some(WorkflowState::Cancelled),
    })
}

impl From<StepState> for pb::StepState {
    fn from(s: StepState) -> Self {
        match s {
            StepState::Waiting => pb::StepState::Waiting,
            StepState::Running => pb::StepState::Running,
            StepState::Succeeded => pb::StepState::Succeeded,
            StepState::Failed => pb::StepState::Failed,
            StepState::Cancelled => pb::StepState::Cancelled,
        }
    }
}

fn step_run_to_proto(name: &str, run: &StepRun) -> pb::StepRun {
    pb::StepRun {
        name: name.to_owned(),
        state: pb::StepState::from(run.state) as i32,
        tasks: run.tasks.iter().map(|t| t.0).collect(),
        runs: run.runs,
        started_unix_ms: run.started_unix_ms,
        finished_unix_ms: run.finished_unix_ms,
        reason: run.reason.clone().unwrap_or_default(),
    }
}

impl From<&Workflow> for pb::Workflow {
    fn from(w: &Workflow) -> Self {
        pb::Workflow {
            id: w.id.0,
            spec: Some(pb::WorkflowSpec::from(&w.spec)),
            state: pb::WorkflowState::from(w.state) as i32,
            steps: w
                .spec
                .steps
                .iter()
                .zip(&w.steps)
                .map(|(spec, run)| step_run_to_proto(&spec.name, run))
                .collect(),
            output_bytes: w.output_bytes,
            created_unix_ms: w.created_unix_ms,
            updated_unix_ms: w.updated_unix_ms,
            finished_unix_ms: w.finished_unix_ms,
            reason: w.reason.clone().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that cannot set up or whose check fails should panic.
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn task() -> pb::TaskSpec {
        pb::TaskSpec {
            run: Some(pb::task_spec::Run::Builtin(pb::BuiltinRun {
                handler: "echo".into(),
                input: String::new(),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn a_workflow_round_trips_through_proto() {
        let message = pb::WorkflowSpec {
            name: "research".into(),
            namespace: String::new(),
            params: HashMap::from([("topic".into(), "raft".into())]),
            steps: vec![
                pb::WorkflowStep {
                    name: "plan".into(),
                    task: Some(task()),
                    outputs: vec!["topics".into()],
                    ..Default::default()
                },
                pb::WorkflowStep {
                    name: "write".into(),
                    task: Some(task()),
                    after: vec!["plan".into()],
                    inputs: HashMap::from([("topic".into(), "params.topic".into())]),
                    for_each: "plan.topics".into(),
                    allow_failure: true,
                    ..Default::default()
                },
            ],
        };
        let spec = WorkflowSpec::try_from(message).unwrap();
        assert_eq!(spec.namespace, "default");
        assert_eq!(
            spec.steps[1].for_each.as_ref().map(|f| f.to_string()).as_deref(),
            Some("plan.topics")
        );
        assert_eq!(spec.steps[1].task.namespace, "default");
        let back = WorkflowSpec::try_from(pb::WorkflowSpec::from(&spec)).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn malformed_steps_are_named() {
        let bad = |step: pb::WorkflowStep| {
            let message =
                pb::WorkflowSpec { name: "w".into(), steps: vec![step], ..Default::default() };
            WorkflowSpec::try_from(message).unwrap_err().to_string()
        };
        let no_task = bad(pb::WorkflowStep { name: "a".into(), ..Default::default() });
        assert_eq!(no_task, "step a: missing field task");
        let bad_input = bad(pb::WorkflowStep {
            name: "b".into(),
            task: Some(task()),
            inputs: HashMap::from([("x".into(), "nodot".into())]),
            ..Default::default()
        });
        assert!(bad_input.starts_with("step b: input x:"), "{bad_input}");
        let bad_for_each = bad(pb::WorkflowStep {
            name: "c".into(),
            task: Some(task()),
            for_each: "params.topic".into(),
            ..Default::default()
        });
        assert!(
            bad_for_each.contains("for_each \"params.topic\" is not STEP.OUTPUT"),
            "{bad_for_each}"
        );
    }
}
