//! Workflows: a DAG of named steps submitted as one command, each step's outputs flowing into later
//! steps' inputs.
//!
//! A `WorkflowSpec` is checked whole before anything is created (`validate`): names and sizes,
//! that every `after`, input and `for_each` names a declared output of a step upstream, and that
//! the steps form no cycle. Each error names the step. The state machine then creates a step's
//! tasks only once every step it runs after has ended (`state_machine::workflows`), so a step
//! never starts before its inputs exist.
//!
//! These types are persisted with bincode, which is not self-describing: no `skip_serializing_if`,
//! `flatten` or internally tagged enums here.

use crate::ids::{TaskId, WorkflowId};
use crate::limits::Limits;
use crate::task::{check_count, check_len, check_name, TaskSpec};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The input a step of a `for_each` gets its item under.
pub const ITEM_INPUT: &str = "item";

/// Bounds on workflows, their outputs and what one step receives. Named, so an error can say
/// which one was passed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowLimits {
    pub steps_max: usize,
    pub params_max: usize,
    /// All of a workflow's strings together (every step's task spec included).
    pub spec_bytes_max: usize,
    pub inputs_per_step_max: usize,
    pub outputs_per_step_max: usize,
    /// One output of one task.
    pub output_bytes_max: usize,
    /// All outputs of one task.
    pub step_output_bytes_max: usize,
    /// All outputs of a workflow's current step runs.
    pub workflow_output_bytes_max: u64,
    /// Everything one task receives as inputs (they travel in its assignment).
    pub step_input_bytes_max: usize,
    /// Instances of one `for_each` step.
    pub for_each_items_max: usize,
}

impl Default for WorkflowLimits {
    fn default() -> Self {
        WorkflowLimits {
            steps_max: 64,
            params_max: 64,
            spec_bytes_max: 1 << 20,
            inputs_per_step_max: 32,
            outputs_per_step_max: 32,
            output_bytes_max: 256 << 10,
            step_output_bytes_max: 1 << 20,
            workflow_output_bytes_max: 16 << 20,
            step_input_bytes_max: 4 << 20,
            for_each_items_max: 256,
        }
    }
}

/// What to suggest when an output is too large.
pub const LARGE_OUTPUT_HINT: &str = "write large data to external storage (an object store, a shared volume) and pass a reference to it (a URL or path) as the output instead";

impl WorkflowLimits {
    /// Checks one task's outputs, by name and size, against the per-output and per-task limits:
    /// `Err` says which output, how large, and the limit. The executor checks before it sends,
    /// the server before it proposes, the state machine when it applies.
    pub fn check_outputs<'a>(
        &self,
        name_bytes_max: usize,
        outputs: impl IntoIterator<Item = (&'a str, usize)>,
    ) -> Result<(), String> {
        let mut count = 0usize;
        let mut total = 0usize;
        for (name, bytes) in outputs {
            count += 1;
            if count > self.outputs_per_step_max {
                return Err(format!(
                    "more than {} outputs (outputs_per_step_max)",
                    self.outputs_per_step_max
                ));
            }
            check_name("output name", name, name_bytes_max).map_err(|e| e.to_string())?;
            if bytes > self.output_bytes_max {
                return Err(format!(
                    "output {name} is {bytes} bytes; the limit is {} bytes per output (output_bytes_max): {LARGE_OUTPUT_HINT}",
                    self.output_bytes_max
                ));
            }
            total += bytes;
        }
        if total > self.step_output_bytes_max {
            return Err(format!(
                "outputs total {total} bytes; the limit is {} bytes per task (step_output_bytes_max): {LARGE_OUTPUT_HINT}",
                self.step_output_bytes_max
            ));
        }
        Ok(())
    }
}

/// `step.output`: an output a step declares.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OutputRef {
    pub step: String,
    pub output: String,
}

impl fmt::Display for OutputRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.step, self.output)
    }
}

/// Where an input comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputSource {
    /// An upstream step's output; for a `for_each` step, a JSON list of every instance's.
    Output(OutputRef),
    /// A workflow parameter's value.
    Param(String),
}

impl InputSource {
    /// Reads `step.output` or `params.NAME`.
    pub fn parse(text: &str) -> Result<InputSource, String> {
        match text.split_once('.') {
            Some(("params", name)) if !name.is_empty() => Ok(InputSource::Param(name.to_owned())),
            Some((step, output)) if !step.is_empty() && !output.is_empty() => {
                Ok(InputSource::Output(OutputRef {
                    step: step.to_owned(),
                    output: output.to_owned(),
                }))
            }
            _ => Err(format!("{text:?} is neither STEP.OUTPUT nor params.NAME")),
        }
    }
}

impl fmt::Display for InputSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputSource::Output(output) => output.fmt(f),
            InputSource::Param(name) => write!(f, "params.{name}"),
        }
    }
}

/// One named step: a task spec, and how it fits in the DAG.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    pub name: String,
    /// What each of the step's tasks runs. The state machine names the tasks
    /// `WORKFLOW/STEP` (`WORKFLOW/STEP/INDEX` for a `for_each`) in the workflow's namespace; the
    /// workflow orders steps, so the spec has no dependencies of its own.
    pub task: TaskSpec,
    /// Steps that must have ended first.
    pub after: BTreeSet<String>,
    /// Files the step finds in `$COLONY_INPUT_DIR`, by name.
    pub inputs: BTreeMap<String, InputSource>,
    /// Files the step must write to `$COLONY_OUTPUT_DIR` when it succeeds.
    pub outputs: BTreeSet<String>,
    /// Run once per item of this JSON list output; each instance gets its item as input `item`.
    pub for_each: Option<OutputRef>,
    /// A failure of this step does not fail the workflow; later steps run without its outputs.
    pub allow_failure: bool,
}

impl StepSpec {
    /// Every step this one waits for: `after`, and the steps its inputs and `for_each` name.
    pub fn upstream_direct(&self) -> impl Iterator<Item = &str> {
        let inputs = self.inputs.values().filter_map(|source| match source {
            InputSource::Output(output) => Some(output.step.as_str()),
            InputSource::Param(_) => None,
        });
        self.after
            .iter()
            .map(String::as_str)
            .chain(inputs)
            .chain(self.for_each.iter().map(|f| f.step.as_str()))
    }
}

/// Everything a user says about a workflow when submitting it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowSpec {
    pub name: String,
    pub namespace: String,
    /// Parameter values, defaults already overridden by the submitter's.
    pub params: BTreeMap<String, String>,
    pub steps: Vec<StepSpec>,
}

/// Why a workflow was refused before anything was created.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WorkflowError {
    #[error("workflow: {0}")]
    Spec(String),
    #[error("step {step}: {problem}")]
    Step { step: String, problem: String },
    #[error("steps form a cycle: {0}")]
    Cycle(String),
}

fn step_error(step: &str, problem: impl Into<String>) -> WorkflowError {
    WorkflowError::Step { step: step.to_owned(), problem: problem.into() }
}

/// Names a reference can use (`step.output`, an input file): no dots, no slashes.
fn check_plain_name(field: &'static str, value: &str, max: usize) -> Result<(), String> {
    check_name(field, value, max).map_err(|e| e.to_string())?;
    if value.contains(['.', '/']) {
        return Err(format!("{field} {value:?} may contain only letters, digits, '-' and '_'"));
    }
    Ok(())
}

impl WorkflowSpec {
    /// The bytes of every string the workflow carries.
    pub fn size_bytes(&self) -> usize {
        let params: usize = self.params.iter().map(|(k, v)| k.len() + v.len()).sum();
        let steps: usize = self
            .steps
            .iter()
            .map(|s| {
                s.name.len()
                    + s.task.size_bytes()
                    + s.after.iter().map(String::len).sum::<usize>()
                    + s.inputs.iter().map(|(k, v)| k.len() + v.to_string().len()).sum::<usize>()
                    + s.outputs.iter().map(String::len).sum::<usize>()
                    + s.for_each.as_ref().map_or(0, |f| f.to_string().len())
            })
            .sum();
        self.name.len() + self.namespace.len() + params + steps
    }

    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// The task name of a step's task (`index`: the instance of a `for_each`).
    pub fn task_name(&self, step: usize, index: Option<usize>) -> String {
        let step = self.steps.get(step).map_or("?", |s| s.name.as_str());
        match index {
            None => format!("{}/{step}", self.name),
            Some(i) => format!("{}/{step}/{i}", self.name),
        }
    }

    /// Checks the whole workflow: nothing is created unless this passes.
    pub fn validate(&self, limits: &Limits, wf: &WorkflowLimits) -> Result<(), WorkflowError> {
        let spec = |e: String| WorkflowError::Spec(e);
        check_name("workflow name", &self.name, limits.name_bytes_max)
            .map_err(|e| spec(e.to_string()))?;
        check_name("namespace", &self.namespace, limits.name_bytes_max)
            .map_err(|e| spec(e.to_string()))?;
        let size = self.size_bytes();
        if size > wf.spec_bytes_max {
            return Err(spec(format!(
                "the workflow is {size} bytes; the limit is {}",
                wf.spec_bytes_max
            )));
        }
        if self.steps.is_empty() {
            return Err(spec("a workflow needs at least one step".to_owned()));
        }
        if self.steps.len() > wf.steps_max {
            return Err(spec(format!(
                "{} steps; the limit is {} (steps_max)",
                self.steps.len(),
                wf.steps_max
            )));
        }
        check_count("parameters", self.params.len(), wf.params_max)
            .map_err(|e| spec(e.to_string()))?;
        for (name, value) in &self.params {
            check_plain_name("parameter name", name, limits.name_bytes_max).map_err(spec)?;
            check_len("parameter value", value, limits.arg_bytes_max)
                .map_err(|e| spec(format!("parameter {name}: {e}")))?;
        }
        let mut names = BTreeSet::new();
        for step in &self.steps {
            check_plain_name("step name", &step.name, limits.name_bytes_max).map_err(spec)?;
            if !names.insert(step.name.as_str()) {
                return Err(step_error(&step.name, "a second step has this name"));
            }
        }
        for step in &self.steps {
            for after in &step.after {
                if self.step_index(after).is_none() {
                    return Err(step_error(&step.name, format!("after: unknown step {after:?}")));
                }
                if after == &step.name {
                    return Err(step_error(&step.name, "a step cannot run after itself"));
                }
            }
        }
        // Cycles through `after` first: every later check walks what is upstream.
        self.order_by(|s| s.after.iter().map(String::as_str).collect())?;
        for (index, step) in self.steps.iter().enumerate() {
            self.validate_step(index, step, limits, wf)?;
        }
        self.order().map(|_| ())
    }

    fn validate_step(
        &self,
        index: usize,
        step: &StepSpec,
        limits: &Limits,
        wf: &WorkflowLimits,
    ) -> Result<(), WorkflowError> {
        let fail = |problem: String| step_error(&step.name, problem);
        // The task is checked as it will be created: named and placed by the workflow.
        let instance = step.for_each.as_ref().map(|_| wf.for_each_items_max.saturating_sub(1));
        let mut task = step.task.clone();
        task.name = self.task_name(index, instance);
        task.namespace = self.namespace.clone();
        task.validate(limits).map_err(|e| fail(e.to_string()))?;
        if !step.task.dependencies.is_empty() {
            return Err(fail(
                "a step's task has no dependencies of its own: use after:".to_owned(),
            ));
        }
        if step.task.idempotency_key.is_some() {
            return Err(fail("a step's task has no idempotency key".to_owned()));
        }
        check_count("outputs", step.outputs.len(), wf.outputs_per_step_max)
            .map_err(|e| fail(e.to_string()))?;
        for output in &step.outputs {
            check_plain_name("output name", output, limits.name_bytes_max).map_err(fail)?;
        }
        check_count("inputs", step.inputs.len(), wf.inputs_per_step_max)
            .map_err(|e| fail(e.to_string()))?;
        for (name, source) in &step.inputs {
            check_plain_name("input name", name, limits.name_bytes_max).map_err(fail)?;
            if name == ITEM_INPUT && step.for_each.is_some() {
                return Err(fail(format!(
                    "input {ITEM_INPUT:?} is the for_each item; name this input otherwise"
                )));
            }
            match source {
                InputSource::Param(param) => {
                    if !self.params.contains_key(param) {
                        return Err(fail(format!("input {name}: unknown parameter {param:?}")));
                    }
                }
                InputSource::Output(output) => {
                    self.check_output_ref(step, output)
                        .map_err(|e| fail(format!("input {name}: {e}")))?;
                }
            }
        }
        if let Some(items) = &step.for_each {
            self.check_output_ref(step, items).map_err(|e| fail(format!("for_each: {e}")))?;
            let source = self.step_index(&items.step).and_then(|i| self.steps.get(i));
            if source.is_some_and(|s| s.for_each.is_some()) {
                return Err(fail(format!(
                    "for_each: step {} is itself a for_each; a fan-out over a fan-out is not supported",
                    items.step
                )));
            }
        }
        Ok(())
    }

    /// A reference from `step` must name a declared output of a step upstream of it (before it in
    /// `after`, transitively).
    fn check_output_ref(&self, step: &StepSpec, output: &OutputRef) -> Result<(), String> {
        let Some(source) = self.step_index(&output.step).and_then(|i| self.steps.get(i)) else {
            return Err(format!("unknown step {:?} in {output}", output.step));
        };
        if !source.outputs.contains(&output.output) {
            let declared: Vec<&str> = source.outputs.iter().map(String::as_str).collect();
            return Err(format!(
                "step {} declares no output {:?} (it declares: {})",
                source.name,
                output.output,
                if declared.is_empty() { "none".to_owned() } else { declared.join(", ") }
            ));
        }
        if !self.upstream_of(&step.name).contains(output.step.as_str()) {
            return Err(format!(
                "{output} names step {}, which is not upstream of {} (add it to after:)",
                output.step, step.name
            ));
        }
        Ok(())
    }

    /// The steps `name` runs after, transitively, through `after` alone.
    pub fn upstream_of(&self, name: &str) -> BTreeSet<&str> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&str> = vec![name];
        while let Some(current) = stack.pop() {
            let Some(step) = self.step_index(current).and_then(|i| self.steps.get(i)) else {
                continue;
            };
            for after in &step.after {
                if seen.insert(after.as_str()) {
                    stack.push(after.as_str());
                }
            }
        }
        seen
    }

    /// The step indexes in an order where every step comes after what it waits for, or the cycle.
    pub fn order(&self) -> Result<Vec<usize>, WorkflowError> {
        self.order_by(|s| s.upstream_direct().collect())
    }

    /// `order`, with `waits_for` saying which steps each one waits for.
    fn order_by(
        &self,
        waits_for: impl Fn(&StepSpec) -> Vec<&str>,
    ) -> Result<Vec<usize>, WorkflowError> {
        let count = self.steps.len();
        let mut waits: Vec<BTreeSet<usize>> = self
            .steps
            .iter()
            .map(|s| waits_for(s).into_iter().filter_map(|u| self.step_index(u)).collect())
            .collect();
        let mut order = Vec::with_capacity(count);
        let mut done = vec![false; count];
        while order.len() < count {
            let Some(next) = (0..count).find(|&i| !done[i] && waits[i].is_empty()) else {
                return Err(WorkflowError::Cycle(self.describe_cycle(&done)));
            };
            done[next] = true;
            order.push(next);
            for wait in &mut waits {
                wait.remove(&next);
            }
        }
        Ok(order)
    }

    /// One cycle among the steps not `done`, as `a -> b -> a`.
    fn describe_cycle(&self, done: &[bool]) -> String {
        let Some(start) = done.iter().position(|d| !d) else {
            return String::new();
        };
        // Every remaining step waits for a remaining step: walk back until a step repeats.
        let mut path = vec![start];
        while let Some(&current) = path.last() {
            let next = self.steps[current]
                .upstream_direct()
                .filter_map(|u| self.step_index(u))
                .find(|&u| !done[u]);
            let Some(next) = next else { break };
            if let Some(at) = path.iter().position(|&p| p == next) {
                let mut cycle: Vec<&str> =
                    path[at..].iter().rev().map(|&i| self.steps[i].name.as_str()).collect();
                cycle.push(self.steps[next].name.as_str());
                return cycle.join(" -> ");
            }
            path.push(next);
        }
        path.iter().map(|&i| self.steps[i].name.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// Where a workflow is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl WorkflowState {
    pub const ALL: [WorkflowState; 4] = [
        WorkflowState::Running,
        WorkflowState::Succeeded,
        WorkflowState::Failed,
        WorkflowState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowState::Running => "running",
            WorkflowState::Succeeded => "succeeded",
            WorkflowState::Failed => "failed",
            WorkflowState::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(self) -> bool {
        self != WorkflowState::Running
    }
}

impl fmt::Display for WorkflowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for WorkflowState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WorkflowState::ALL.into_iter().find(|state| state.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = WorkflowState::ALL.iter().map(|s| s.as_str()).collect();
            format!("unknown workflow state {s:?} (one of: {})", names.join(", "))
        })
    }
}

/// Where one step of a workflow is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Its upstream steps have not all ended; it has no tasks yet.
    Waiting,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Waiting => "waiting",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, StepState::Succeeded | StepState::Failed | StepState::Cancelled)
    }
}

impl fmt::Display for StepState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The current run of one step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRun {
    pub state: StepState,
    /// This run's tasks: one, or one per item of a `for_each`, in item order.
    pub tasks: Vec<TaskId>,
    /// How many times the step was started (a workflow retry starts it again).
    pub runs: u32,
    pub started_unix_ms: Option<u64>,
    pub finished_unix_ms: Option<u64>,
    pub reason: Option<String>,
}

impl StepRun {
    pub fn waiting() -> StepRun {
        StepRun {
            state: StepState::Waiting,
            tasks: Vec::new(),
            runs: 0,
            started_unix_ms: None,
            finished_unix_ms: None,
            reason: None,
        }
    }
}

/// The replicated record of one workflow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workflow {
    pub id: WorkflowId,
    pub spec: WorkflowSpec,
    pub state: WorkflowState,
    /// By step index, as in `spec.steps`.
    pub steps: Vec<StepRun>,
    /// Bytes of the outputs of the current step runs' tasks.
    pub output_bytes: u64,
    /// Tasks of this workflow (of any run) still kept; the workflow is forgotten with its last.
    pub tasks_kept: u64,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub finished_unix_ms: Option<u64>,
    pub reason: Option<String>,
}

/// A `for_each` instance's item: its place in the list and its value (a string item as it is,
/// anything else as JSON text).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub index: u32,
    pub value: String,
}

/// Which workflow step a task runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepTask {
    pub workflow: WorkflowId,
    pub step: u32,
    pub item: Option<Item>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that cannot set up or whose check fails should panic.
mod tests {
    use super::*;
    use crate::task::{PlacementPolicy, RunSpec};
    use crate::Resources;

    fn task() -> TaskSpec {
        TaskSpec {
            name: String::new(),
            namespace: String::new(),
            labels: BTreeMap::new(),
            capabilities: BTreeSet::new(),
            resources: Resources::default(),
            priority: 0,
            deadline_unix_ms: None,
            timeout_ms: None,
            max_retries: 0,
            dependencies: BTreeSet::new(),
            run: RunSpec::Builtin { handler: "echo".into(), input: String::new() },
            idempotency_key: None,
            placement: PlacementPolicy::BinPack,
            memory_auto: false,
        }
    }

    fn step(name: &str, after: &[&str], inputs: &[(&str, &str)], outputs: &[&str]) -> StepSpec {
        StepSpec {
            name: name.into(),
            task: task(),
            after: after.iter().map(|s| s.to_string()).collect(),
            inputs: inputs
                .iter()
                .map(|(k, v)| (k.to_string(), InputSource::parse(v).unwrap()))
                .collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            for_each: None,
            allow_failure: false,
        }
    }

    fn workflow(steps: Vec<StepSpec>) -> WorkflowSpec {
        WorkflowSpec {
            name: "research".into(),
            namespace: "default".into(),
            params: BTreeMap::from([("topic".to_owned(), "raft".to_owned())]),
            steps,
        }
    }

    fn check(w: &WorkflowSpec) -> Result<(), String> {
        w.validate(&Limits::default(), &WorkflowLimits::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_pipeline_with_a_fan_out_is_valid_and_ordered() {
        let mut analyze = step("analyze", &["plan"], &[("topic", "params.topic")], &["summary"]);
        analyze.for_each = Some(OutputRef { step: "plan".into(), output: "topics".into() });
        let w = workflow(vec![
            step("report", &["analyze"], &[("summaries", "analyze.summary")], &["report"]),
            analyze,
            step("plan", &[], &[], &["topics"]),
        ]);
        check(&w).unwrap();
        assert_eq!(w.order().unwrap(), vec![2, 1, 0]);
    }

    #[test]
    fn bad_workflows_are_refused_naming_the_step() {
        let cases: Vec<(WorkflowSpec, &str)> = vec![
            (workflow(vec![]), "at least one step"),
            (
                workflow(vec![step("a", &[], &[], &[]), step("a", &[], &[], &[])]),
                "step a: a second step",
            ),
            (
                workflow(vec![step("a", &["ghost"], &[], &[])]),
                "step a: after: unknown step \"ghost\"",
            ),
            (
                workflow(vec![
                    step("a", &["b"], &[], &[]),
                    step("b", &["c"], &[], &[]),
                    step("c", &["a"], &[], &[]),
                ]),
                "cycle: ",
            ),
            (
                workflow(vec![
                    step("a", &[], &[], &["x"]),
                    step("b", &["a"], &[("i", "a.y")], &[]),
                ]),
                "step b: input i: step a declares no output \"y\" (it declares: x)",
            ),
            (
                workflow(vec![step("a", &[], &[], &["x"]), step("b", &[], &[("i", "a.x")], &[])]),
                "not upstream of b (add it to after:)",
            ),
            (
                workflow(vec![step("a", &[], &[("i", "params.nope")], &[])]),
                "step a: input i: unknown parameter \"nope\"",
            ),
            (workflow(vec![step("a.b", &[], &[], &[])]), "step name \"a.b\""),
        ];
        for (w, expected) in cases {
            let error = check(&w).expect_err(expected);
            assert!(error.contains(expected), "{error:?} should contain {expected:?}");
        }
        let too_many: Vec<StepSpec> =
            (0..65).map(|i| step(&format!("s{i}"), &[], &[], &[])).collect();
        assert!(check(&workflow(too_many)).unwrap_err().contains("steps_max"));
    }

    #[test]
    fn a_cycle_is_named() {
        let w = workflow(vec![
            step("start", &[], &[], &[]),
            step("a", &["start", "c"], &[], &[]),
            step("b", &["a"], &[], &[]),
            step("c", &["b"], &[], &[]),
        ]);
        let error = check(&w).unwrap_err();
        assert!(error.contains("a -> ") && error.contains("b") && error.contains("c"), "{error}");
    }

    #[test]
    fn input_sources_parse() {
        assert_eq!(InputSource::parse("params.topic"), Ok(InputSource::Param("topic".into())));
        assert_eq!(
            InputSource::parse("plan.topics"),
            Ok(InputSource::Output(OutputRef { step: "plan".into(), output: "topics".into() }))
        );
        assert!(InputSource::parse("plan").is_err());
        assert!(InputSource::parse(".x").is_err());
    }
}
