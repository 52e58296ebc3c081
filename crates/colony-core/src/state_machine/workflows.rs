//! The workflow aggregate: submission, the step engine, outputs, cancel and retry.
//!
//! A workflow's steps get tasks lazily: `advance` starts every waiting step whose upstream steps
//! have all ended (succeeded, or failed with `allow_failure`), creating one task (or one per item
//! of a `for_each`) in the same apply that ended the last of them. So a step never starts before
//! its inputs exist, and a hand-off costs no extra command. A task's end reaches its step through
//! `lifecycle::end` (`step_task_ended`); a step that fails without `allow_failure` fails the
//! workflow, which cancels everything still running.
//!
//! Outputs arrive with the report of a successful attempt and are checked here against the named
//! limits; outputs over a limit, or a declared output missing, turn the success into a failure
//! whose reason says which output, how large, and the limit.

use super::{CommandError, Outcome, StateMachine};
use crate::ids::{TaskId, WorkflowId};
use crate::task::TaskState;
use crate::workflow::{
    InputSource, Item, StepRun, StepState, StepTask, Workflow, WorkflowSpec, WorkflowState,
    ITEM_INPUT, LARGE_OUTPUT_HINT,
};
use std::collections::{BTreeMap, BTreeSet};

/// A task's outputs: file name to contents.
pub type Outputs = BTreeMap<String, Vec<u8>>;

impl StateMachine {
    pub(super) fn submit_workflow(&mut self, spec: &WorkflowSpec) -> Result<Outcome, CommandError> {
        spec.validate(&self.limits, &self.workflow_limits)
            .map_err(|e| CommandError::InvalidWorkflow(e.to_string()))?;
        let now = self.now_unix_ms;
        for step in &spec.steps {
            if let Some(deadline) = step.task.deadline_unix_ms.filter(|&d| d <= now) {
                return Err(CommandError::InvalidWorkflow(format!(
                    "step {}: deadline {deadline} is already past (now {now})",
                    step.name
                )));
            }
        }
        // Every check has passed: from here on the command only changes state.
        let id = WorkflowId(self.next_workflow_id);
        self.next_workflow_id += 1;
        let workflow = Workflow {
            id,
            spec: spec.clone(),
            state: WorkflowState::Running,
            steps: vec![StepRun::waiting(); spec.steps.len()],
            output_bytes: 0,
            tasks_kept: 0,
            created_unix_ms: now,
            updated_unix_ms: now,
            finished_unix_ms: None,
            reason: None,
        };
        self.workflows.insert(id, workflow);
        self.advance(id);
        Ok(Outcome::WorkflowSubmitted { workflow: self.workflow(id)?.clone() })
    }

    pub(super) fn cancel_workflow(
        &mut self,
        id: WorkflowId,
        reason: &str,
    ) -> Result<Outcome, CommandError> {
        let workflow = self.workflow(id)?;
        if workflow.state.is_finished() {
            return Err(CommandError::WorkflowFinished { id, state: workflow.state });
        }
        super::check_text("reason", reason, self.limits.message_bytes_max)?;
        let reason =
            if reason.is_empty() { "cancelled by request".to_owned() } else { reason.to_owned() };
        self.stop_workflow(id, WorkflowState::Cancelled, reason);
        Ok(Outcome::WorkflowCancelled { workflow: self.workflow(id)?.clone() })
    }

    /// Re-runs the failed and cancelled steps (and those that never ran) and every step
    /// downstream of them; succeeded steps upstream keep their outputs.
    pub(super) fn retry_workflow(&mut self, id: WorkflowId) -> Result<Outcome, CommandError> {
        let workflow = self.workflow(id)?;
        match workflow.state {
            WorkflowState::Running => return Err(CommandError::WorkflowRunning(id)),
            WorkflowState::Succeeded => {
                return Err(CommandError::WorkflowFinished { id, state: workflow.state })
            }
            WorkflowState::Failed | WorkflowState::Cancelled => {}
        }
        let spec = &workflow.spec;
        let mut rerun: BTreeSet<usize> = workflow
            .steps
            .iter()
            .enumerate()
            // A succeeded step whose tasks retention has since forgotten has lost its outputs.
            .filter(|(_, run)| {
                run.state != StepState::Succeeded
                    || run.tasks.iter().any(|t| !self.tasks.contains_key(t))
            })
            .map(|(i, _)| i)
            .collect();
        // Downstream of a re-run step is re-run too (it would consume new outputs).
        let order = spec.order().map_err(|e| CommandError::InvalidWorkflow(e.to_string()))?;
        for &i in &order {
            let waits_on_rerun = spec.steps[i]
                .upstream_direct()
                .filter_map(|u| spec.step_index(u))
                .any(|u| rerun.contains(&u));
            if waits_on_rerun {
                rerun.insert(i);
            }
        }
        let now = self.now_unix_ms;
        let Some(workflow) = self.workflows.get_mut(&id) else {
            return Err(CommandError::UnknownWorkflow(id));
        };
        for &i in &rerun {
            let runs = workflow.steps[i].runs;
            workflow.steps[i] = StepRun { runs, ..StepRun::waiting() };
        }
        workflow.state = WorkflowState::Running;
        workflow.finished_unix_ms = None;
        workflow.reason = None;
        workflow.updated_unix_ms = now;
        self.recount_output_bytes(id);
        self.advance(id);
        Ok(Outcome::WorkflowRetried { workflow: self.workflow(id)?.clone() })
    }

    pub(super) fn workflow(&self, id: WorkflowId) -> Result<&Workflow, CommandError> {
        self.workflows.get(&id).ok_or(CommandError::UnknownWorkflow(id))
    }

    /// Starts every step that can start; fails the workflow on a failed step, or ends it
    /// succeeded once every step has ended.
    fn advance(&mut self, id: WorkflowId) {
        loop {
            let Some(workflow) = self.workflows.get(&id) else { return };
            if workflow.state != WorkflowState::Running {
                return;
            }
            let spec = &workflow.spec;
            let fatal = workflow.steps.iter().enumerate().find(|(i, run)| {
                matches!(run.state, StepState::Failed | StepState::Cancelled)
                    && !spec.steps[*i].allow_failure
            });
            if let Some((i, run)) = fatal {
                let reason = format!(
                    "step {} {}: {}",
                    spec.steps[i].name,
                    run.state,
                    run.reason.as_deref().unwrap_or("no reason given")
                );
                self.stop_workflow(id, WorkflowState::Failed, reason);
                return;
            }
            let ended = |run: &StepRun| run.state.is_finished();
            let ready = (0..spec.steps.len()).find(|&i| {
                workflow.steps[i].state == StepState::Waiting
                    && spec.steps[i]
                        .upstream_direct()
                        .filter_map(|u| spec.step_index(u))
                        .all(|u| ended(&workflow.steps[u]))
            });
            match ready {
                Some(step) => self.start_step(id, step),
                None => break,
            }
        }
        let now = self.now_unix_ms;
        if let Some(workflow) = self.workflows.get_mut(&id) {
            if workflow.steps.iter().all(|run| run.state.is_finished()) {
                workflow.state = WorkflowState::Succeeded;
                workflow.finished_unix_ms = Some(now);
                workflow.updated_unix_ms = now;
            }
        }
    }

    /// Creates a step's tasks (or ends the step failed if its items or inputs cannot be had).
    fn start_step(&mut self, id: WorkflowId, step: usize) {
        let now = self.now_unix_ms;
        let items = match self.step_items(id, step) {
            Ok(items) => items,
            Err(reason) => return self.end_step(id, step, StepState::Failed, reason),
        };
        let mut planned = Vec::with_capacity(items.len());
        for item in items {
            let link = StepTask { workflow: id, step: step as u32, item };
            let bytes: usize = self.inputs_of(&link).values().map(Vec::len).sum();
            let max = self.workflow_limits.step_input_bytes_max;
            if bytes > max {
                let reason = format!(
                    "its inputs are {bytes} bytes; the limit is {max} bytes per task (step_input_bytes_max): {LARGE_OUTPUT_HINT}"
                );
                return self.end_step(id, step, StepState::Failed, reason);
            }
            planned.push(link);
        }
        let Some(workflow) = self.workflows.get(&id) else { return };
        let spec = &workflow.spec;
        let fan_out = spec.steps[step].for_each.is_some();
        let tasks: Vec<_> = planned
            .into_iter()
            .map(|link| {
                let mut task = spec.steps[step].task.clone();
                task.name = spec.task_name(
                    step,
                    link.item.as_ref().filter(|_| fan_out).map(|i| i.index as usize),
                );
                task.namespace = spec.namespace.clone();
                (task, link)
            })
            .collect();
        let mut ids = Vec::with_capacity(tasks.len());
        for (task, link) in tasks {
            let created = self.insert_task(task, false);
            self.task_steps.insert(created, link);
            ids.push(created);
        }
        let Some(workflow) = self.workflows.get_mut(&id) else { return };
        workflow.tasks_kept += ids.len() as u64;
        workflow.updated_unix_ms = now;
        let run = &mut workflow.steps[step];
        run.runs += 1;
        run.started_unix_ms = Some(now);
        run.state = StepState::Running;
        let none = ids.is_empty();
        run.tasks = ids;
        if none {
            // An empty for_each: nothing to run, nothing to wait for.
            self.end_step(id, step, StepState::Succeeded, String::new());
        }
    }

    /// The items a step runs for: one `None`, or the `for_each` list's items.
    fn step_items(&self, id: WorkflowId, step: usize) -> Result<Vec<Option<Item>>, String> {
        let Some(workflow) = self.workflows.get(&id) else { return Ok(Vec::new()) };
        let spec = &workflow.spec;
        let Some(items_ref) = &spec.steps[step].for_each else { return Ok(vec![None]) };
        let source = spec.step_index(&items_ref.step).ok_or("for_each names no step")?;
        let output = workflow.steps[source]
            .tasks
            .first()
            .and_then(|task| self.outputs.get(task))
            .and_then(|outputs| outputs.get(&items_ref.output))
            .ok_or_else(|| format!("for_each {items_ref}: the output was not produced"))?;
        let list: Vec<serde_json::Value> = serde_json::from_slice(output)
            .map_err(|e| format!("for_each {items_ref}: the output is not a JSON list: {e}"))?;
        let max = self.workflow_limits.for_each_items_max;
        if list.len() > max {
            return Err(format!(
                "for_each {items_ref}: {} items; the limit is {max} (for_each_items_max)",
                list.len()
            ));
        }
        Ok(list
            .into_iter()
            .enumerate()
            .map(|(index, value)| {
                let value = match value {
                    serde_json::Value::String(text) => text,
                    other => other.to_string(),
                };
                Some(Item { index: index as u32, value })
            })
            .collect())
    }

    /// What a workflow task receives as input files, by name. An upstream output that was not
    /// produced (its step failed with `allow_failure`) is absent; a `for_each` step's output
    /// arrives as a JSON list of every instance's (as text; `null` where one is missing).
    fn inputs_of(&self, link: &StepTask) -> Outputs {
        let mut inputs = Outputs::new();
        let Some(workflow) = self.workflows.get(&link.workflow) else { return inputs };
        let spec = &workflow.spec;
        let Some(step) = spec.steps.get(link.step as usize) else { return inputs };
        let output_of = |task: &TaskId, name: &str| {
            self.outputs.get(task).and_then(|outputs| outputs.get(name))
        };
        for (name, source) in &step.inputs {
            match source {
                InputSource::Param(param) => {
                    if let Some(value) = spec.params.get(param) {
                        inputs.insert(name.clone(), value.clone().into_bytes());
                    }
                }
                InputSource::Output(output) => {
                    let Some(source) = spec.step_index(&output.step) else { continue };
                    let tasks = &workflow.steps[source].tasks;
                    if spec.steps[source].for_each.is_some() {
                        let list: Vec<Option<String>> = tasks
                            .iter()
                            .map(|t| {
                                output_of(t, &output.output)
                                    .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
                            })
                            .collect();
                        let json = serde_json::to_vec(&list).unwrap_or_default();
                        inputs.insert(name.clone(), json);
                    } else if let Some(bytes) =
                        tasks.first().and_then(|t| output_of(t, &output.output))
                    {
                        inputs.insert(name.clone(), bytes.clone());
                    }
                }
            }
        }
        if let Some(item) = &link.item {
            inputs.insert(ITEM_INPUT.to_owned(), item.value.clone().into_bytes());
        }
        inputs
    }

    /// Ends a workflow (failed or cancelled): every unfinished task is cancelled and every step
    /// that has not ended is marked cancelled.
    fn stop_workflow(&mut self, id: WorkflowId, state: WorkflowState, reason: String) {
        let now = self.now_unix_ms;
        let Some(workflow) = self.workflows.get_mut(&id) else { return };
        // The state first: the tasks ended below reach `step_task_ended`, which must not advance.
        workflow.state = state;
        workflow.finished_unix_ms = Some(now);
        workflow.updated_unix_ms = now;
        workflow.reason = Some(reason.clone());
        let unfinished: Vec<TaskId> = workflow
            .steps
            .iter()
            .flat_map(|run| run.tasks.iter().copied())
            .filter(|t| self.tasks.get(t).is_some_and(|t| !t.state.is_finished()))
            .collect();
        let why = format!("workflow {id} {state}: {reason}");
        for task in unfinished {
            self.end(task, TaskState::Cancelled, Some(why.clone()));
        }
        if let Some(workflow) = self.workflows.get_mut(&id) {
            for run in &mut workflow.steps {
                if !run.state.is_finished() {
                    run.state = StepState::Cancelled;
                    run.finished_unix_ms = Some(now);
                    run.reason.get_or_insert_with(|| why.clone());
                }
            }
        }
    }

    /// Called by `end` for every task that ends: moves its step on, and the workflow with it.
    pub(super) fn step_task_ended(&mut self, task: TaskId) {
        let Some(link) = self.task_steps.get(&task).cloned() else { return };
        let step = link.step as usize;
        let Some(workflow) = self.workflows.get(&link.workflow) else { return };
        let Some(run) = workflow.steps.get(step) else { return };
        if run.state != StepState::Running || !run.tasks.contains(&task) {
            // A task of an earlier run, or of a step already ended.
            return;
        }
        let allow_failure = workflow.spec.steps[step].allow_failure;
        let state_of = |t: &TaskId| self.tasks.get(t).map(|t| t.state);
        let ended = self.tasks.get(&task).map(|t| (t.state, t.reason.clone()));
        if let Some((state, reason)) = ended.filter(|(s, _)| *s != TaskState::Succeeded) {
            if !allow_failure
                || run.tasks.iter().all(|t| state_of(t).is_some_and(|s| s.is_finished()))
            {
                let which = match &link.item {
                    Some(item) => format!("task {task} (item {}) {state}", item.index),
                    None => format!("task {task} {state}"),
                };
                let reason = format!("{which}: {}", reason.unwrap_or_default());
                let step_state = if state == TaskState::Cancelled {
                    StepState::Cancelled
                } else {
                    StepState::Failed
                };
                self.end_step(link.workflow, step, step_state, reason);
            }
            return;
        }
        let states: Vec<Option<TaskState>> = run.tasks.iter().map(state_of).collect();
        if states.iter().all(|s| s.is_some_and(|s| s.is_finished())) {
            let failed = states.iter().any(|s| *s != Some(TaskState::Succeeded));
            let (state, reason) = match failed {
                true => (StepState::Failed, "an instance did not succeed".to_owned()),
                false => (StepState::Succeeded, String::new()),
            };
            self.end_step(link.workflow, step, state, reason);
        }
    }

    fn end_step(&mut self, id: WorkflowId, step: usize, state: StepState, reason: String) {
        let now = self.now_unix_ms;
        let Some(workflow) = self.workflows.get_mut(&id) else { return };
        let Some(run) = workflow.steps.get_mut(step) else { return };
        run.state = state;
        run.finished_unix_ms = Some(now);
        run.reason = (!reason.is_empty()).then_some(reason);
        workflow.updated_unix_ms = now;
        self.advance(id);
    }

    /// Checks a successful attempt's outputs: `Err` is the failure reason. Limits apply to every
    /// task; a workflow step must also have written every output it declares, and its workflow
    /// must stay within its total.
    pub(super) fn check_outputs(&self, task: TaskId, outputs: &Outputs) -> Result<(), String> {
        let wl = &self.workflow_limits;
        let sizes = outputs.iter().map(|(name, bytes)| (name.as_str(), bytes.len()));
        wl.check_outputs(self.limits.name_bytes_max, sizes)?;
        let total: usize = outputs.values().map(Vec::len).sum();
        let Some(link) = self.task_steps.get(&task) else { return Ok(()) };
        let Some(workflow) = self.workflows.get(&link.workflow) else { return Ok(()) };
        if let Some(step) = workflow.spec.steps.get(link.step as usize) {
            let missing: Vec<&str> = step
                .outputs
                .iter()
                .filter(|o| !outputs.contains_key(*o))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "step {} did not write its declared output{} {} to $COLONY_OUTPUT_DIR",
                    step.name,
                    if missing.len() == 1 { "" } else { "s" },
                    missing.join(", ")
                ));
            }
        }
        let after = workflow.output_bytes.saturating_add(total as u64);
        if after > wl.workflow_output_bytes_max {
            return Err(format!(
                "workflow {} would hold {after} bytes of outputs; the limit is {} (workflow_output_bytes_max): {LARGE_OUTPUT_HINT}",
                link.workflow, wl.workflow_output_bytes_max
            ));
        }
        Ok(())
    }

    /// Keeps a successful attempt's (checked) outputs with its task.
    pub(super) fn store_outputs(&mut self, task: TaskId, outputs: &Outputs) {
        if outputs.is_empty() {
            return;
        }
        let bytes: u64 = outputs.values().map(|b| b.len() as u64).sum();
        self.outputs.insert(task, outputs.clone());
        if let Some(link) = self.task_steps.get(&task) {
            if let Some(workflow) = self.workflows.get_mut(&link.workflow) {
                workflow.output_bytes = workflow.output_bytes.saturating_add(bytes);
            }
        }
    }

    /// Recomputes a workflow's output bytes from its current step runs.
    fn recount_output_bytes(&mut self, id: WorkflowId) {
        let Some(workflow) = self.workflows.get(&id) else { return };
        let bytes: u64 = workflow
            .steps
            .iter()
            .flat_map(|run| run.tasks.iter())
            .filter_map(|t| self.outputs.get(t))
            .flat_map(|outputs| outputs.values())
            .map(|b| b.len() as u64)
            .sum();
        if let Some(workflow) = self.workflows.get_mut(&id) {
            workflow.output_bytes = bytes;
        }
    }

    /// When `task`'s workflow has ended, every task of its current runs (none otherwise).
    pub(super) fn workflow_tasks_if_stopped(&self, task: TaskId) -> Vec<TaskId> {
        let workflow = self.task_steps.get(&task).and_then(|l| self.workflows.get(&l.workflow));
        match workflow {
            Some(w) if w.state.is_finished() => {
                w.steps.iter().flat_map(|run| run.tasks.iter().copied()).collect()
            }
            _ => Vec::new(),
        }
    }

    /// Whether retention must keep this finished task: its workflow is still running.
    pub(super) fn held_by_workflow(&self, task: TaskId) -> bool {
        self.task_steps
            .get(&task)
            .and_then(|link| self.workflows.get(&link.workflow))
            .is_some_and(|w| !w.state.is_finished())
    }

    /// Retention forgets a task: its outputs and its place in its workflow go with it, and the
    /// workflow goes with its last task.
    pub(super) fn forget_task_outputs(&mut self, task: TaskId) {
        self.outputs.remove(&task);
        let Some(link) = self.task_steps.remove(&task) else { return };
        let Some(workflow) = self.workflows.get_mut(&link.workflow) else { return };
        workflow.tasks_kept = workflow.tasks_kept.saturating_sub(1);
        if workflow.tasks_kept == 0 && workflow.state.is_finished() {
            self.workflows.remove(&link.workflow);
        }
    }

    // Reads.

    pub fn get_workflow(&self, id: WorkflowId) -> Option<&Workflow> {
        self.workflows.get(&id)
    }

    /// Workflows in id order after `after`, at most `limit`, those `visible` accepts.
    pub fn list_workflows_where(
        &self,
        after: Option<WorkflowId>,
        limit: usize,
        visible: impl Fn(&Workflow) -> bool,
    ) -> Vec<Workflow> {
        let start = WorkflowId(after.map_or(0, |a| a.0.saturating_add(1)));
        self.workflows
            .range(start..)
            .map(|(_, w)| w)
            .filter(|w| visible(w))
            .take(limit)
            .cloned()
            .collect()
    }

    pub fn workflow_count(&self) -> usize {
        self.workflows.len()
    }

    /// A task's outputs (empty when it wrote none or has not succeeded).
    pub fn task_outputs(&self, task: TaskId) -> Option<&Outputs> {
        self.outputs.get(&task)
    }

    /// Which workflow step a task runs, if any.
    pub fn task_step(&self, task: TaskId) -> Option<&StepTask> {
        self.task_steps.get(&task)
    }

    /// The input files an attempt of `task` receives (empty for a task outside a workflow).
    pub fn task_inputs(&self, task: TaskId) -> Outputs {
        self.task_steps.get(&task).map(|link| self.inputs_of(link)).unwrap_or_default()
    }

    /// The outputs a workflow task must write (none for a task outside a workflow).
    pub fn task_declared_outputs(&self, task: TaskId) -> BTreeSet<String> {
        self.task_steps
            .get(&task)
            .and_then(|link| {
                let workflow = self.workflows.get(&link.workflow)?;
                workflow.spec.steps.get(link.step as usize).map(|s| s.outputs.clone())
            })
            .unwrap_or_default()
    }

    pub fn workflow_limits(&self) -> &crate::workflow::WorkflowLimits {
        &self.workflow_limits
    }
}
