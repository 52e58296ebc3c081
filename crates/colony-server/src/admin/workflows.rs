//! Workflows: submit (checked whole before it is proposed), read, list, cancel, retry; and a
//! task's outputs.

use super::auth::Caller;
use super::AdminService;
use colony_core::{
    Command, Outcome, Permission, StateMachine, TaskId, Workflow, WorkflowId, WorkflowSpec,
};
use colony_proto::convert::REDACTED;
use colony_proto::pb;
use colony_proto::workflow::workflow_state_from_proto;
use tonic::Status;

const PAGE_SIZE_DEFAULT: usize = 100;
const PAGE_SIZE_MAX: usize = 1000;
/// A page stops growing at this many encoded bytes, well under gRPC's 4 MiB message limit.
const PAGE_BYTES_MAX: usize = 2 << 20;
/// A task's reason as `GetWorkflow` shows it (a workflow may have thousands of tasks).
const TASK_REASON_BYTES_MAX: usize = 256;

impl AdminService {
    pub(super) async fn submit_workflow_here(
        &self,
        caller: Caller,
        request: pb::SubmitWorkflowRequest,
    ) -> Result<pb::SubmitWorkflowResponse, Status> {
        let spec = request.spec.ok_or_else(|| Status::invalid_argument("missing spec"))?;
        let spec = WorkflowSpec::try_from(spec)
            .map_err(|e| Status::invalid_argument(format!("invalid workflow: {e}")))?;
        caller.require(Permission::TaskSubmit, Some(&spec.namespace))?;
        {
            let state = self.node.state();
            spec.validate(state.machine.limits(), state.machine.workflow_limits())
                .map_err(|e| Status::invalid_argument(format!("invalid workflow: {e}")))?;
        }
        match self.propose(Command::SubmitWorkflow(spec)).await? {
            Outcome::WorkflowSubmitted { workflow } => {
                Ok(pb::SubmitWorkflowResponse { workflow: Some(view(&caller, &workflow)) })
            }
            other => Err(Status::internal(format!("submit produced {other:?}"))),
        }
    }

    pub(super) async fn get_workflow_here(
        &self,
        caller: Caller,
        request: pb::GetWorkflowRequest,
    ) -> Result<pb::GetWorkflowResponse, Status> {
        let id = WorkflowId(request.id);
        let state = self.node.state();
        let workflow = state
            .machine
            .get_workflow(id)
            .ok_or_else(|| Status::not_found(format!("workflow {id} does not exist")))?;
        caller.require(Permission::TaskRead, Some(&workflow.spec.namespace))?;
        Ok(pb::GetWorkflowResponse {
            workflow: Some(view(&caller, workflow)),
            tasks: tasks_of(&state.machine, workflow),
            applied_index: state.last_applied.map_or(0, |l| l.index),
        })
    }

    pub(super) async fn list_workflows_here(
        &self,
        caller: Caller,
        request: pb::ListWorkflowsRequest,
    ) -> Result<pb::ListWorkflowsResponse, Status> {
        let state_filter = workflow_state_from_proto(request.state)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let limit = match request.page_size as usize {
            0 => PAGE_SIZE_DEFAULT,
            n => n.min(PAGE_SIZE_MAX),
        };
        let after = (request.after_id > 0).then_some(WorkflowId(request.after_id));
        let state = self.node.state();
        let found = state.machine.list_workflows_where(after, limit, |w| {
            caller.covers(&w.spec.namespace) && state_filter.is_none_or(|s| s == w.state)
        });
        let mut workflows = Vec::with_capacity(found.len());
        let mut page_bytes = 0;
        for workflow in &found {
            let workflow = view(&caller, workflow);
            page_bytes += prost::Message::encoded_len(&workflow);
            if page_bytes > PAGE_BYTES_MAX && !workflows.is_empty() {
                break;
            }
            workflows.push(workflow);
        }
        let full = workflows.len() < found.len() || workflows.len() == limit;
        let next_after_id = if full { workflows.last().map_or(0, |w| w.id) } else { 0 };
        Ok(pb::ListWorkflowsResponse { workflows, next_after_id })
    }

    pub(super) async fn cancel_workflow_here(
        &self,
        caller: Caller,
        request: pb::CancelWorkflowRequest,
    ) -> Result<pb::CancelWorkflowResponse, Status> {
        let id = WorkflowId(request.id);
        self.require_on_workflow(&caller, id, Permission::TaskCancel)?;
        let limits = self.node.state().machine.limits().clone();
        if request.reason.len() > limits.message_bytes_max {
            return Err(Status::invalid_argument(format!(
                "reason is {} bytes; the limit is {}",
                request.reason.len(),
                limits.message_bytes_max
            )));
        }
        match self.propose(Command::CancelWorkflow { id, reason: request.reason }).await? {
            Outcome::WorkflowCancelled { workflow } => {
                Ok(pb::CancelWorkflowResponse { workflow: Some(view(&caller, &workflow)) })
            }
            other => Err(Status::internal(format!("cancel produced {other:?}"))),
        }
    }

    pub(super) async fn retry_workflow_here(
        &self,
        caller: Caller,
        request: pb::RetryWorkflowRequest,
    ) -> Result<pb::RetryWorkflowResponse, Status> {
        let id = WorkflowId(request.id);
        self.require_on_workflow(&caller, id, Permission::TaskSubmit)?;
        match self.propose(Command::RetryWorkflow { id }).await? {
            Outcome::WorkflowRetried { workflow } => {
                Ok(pb::RetryWorkflowResponse { workflow: Some(view(&caller, &workflow)) })
            }
            other => Err(Status::internal(format!("retry produced {other:?}"))),
        }
    }

    pub(super) async fn get_task_output_here(
        &self,
        caller: Caller,
        request: pb::GetTaskOutputRequest,
    ) -> Result<pb::GetTaskOutputResponse, Status> {
        let id = TaskId(request.id);
        let state = self.node.state();
        let task = state
            .machine
            .get_task(id)
            .ok_or_else(|| Status::not_found(format!("task {id} does not exist")))?;
        caller.require(Permission::TaskRead, Some(&task.spec.namespace))?;
        let outputs = state.machine.task_outputs(id);
        let all = outputs.into_iter().flatten();
        let outputs: Vec<pb::TaskOutput> = match request.name.is_empty() {
            true => all
                .map(|(name, data)| pb::TaskOutput { name: name.clone(), data: data.clone() })
                .collect(),
            false => {
                let found = all.filter(|(name, _)| **name == request.name);
                let found: Vec<pb::TaskOutput> = found
                    .map(|(name, data)| pb::TaskOutput { name: name.clone(), data: data.clone() })
                    .collect();
                if found.is_empty() {
                    let names: Vec<&str> = state
                        .machine
                        .task_outputs(id)
                        .into_iter()
                        .flatten()
                        .map(|(n, _)| n.as_str())
                        .collect();
                    return Err(Status::not_found(format!(
                        "task {id} ({}) has no output {:?}; it has: {}",
                        task.state,
                        request.name,
                        if names.is_empty() { "none".to_owned() } else { names.join(", ") }
                    )));
                }
                found
            }
        };
        Ok(pb::GetTaskOutputResponse { outputs })
    }

    /// A write on a known workflow is checked against its namespace; an unknown one is the state
    /// machine's to report (NOT_FOUND) for a caller who could write somewhere.
    fn require_on_workflow(
        &self,
        caller: &Caller,
        id: WorkflowId,
        permission: Permission,
    ) -> Result<(), Status> {
        let namespace =
            self.node.state().machine.get_workflow(id).map(|w| w.spec.namespace.clone());
        match namespace {
            Some(namespace) => caller.require(permission, Some(&namespace)),
            None => Ok(()),
        }
    }
}

/// A workflow as `caller` may see it: environment values redacted unless the role sees secrets.
fn view(caller: &Caller, workflow: &Workflow) -> pb::Workflow {
    let mut message = pb::Workflow::from(workflow);
    if !caller.sees_secrets() {
        let steps = message.spec.iter_mut().flat_map(|spec| spec.steps.iter_mut());
        for step in steps {
            if let Some(pb::task_spec::Run::Process(process)) =
                step.task.as_mut().and_then(|t| t.run.as_mut())
            {
                for value in process.env.values_mut() {
                    *value = REDACTED.to_owned();
                }
            }
        }
    }
    message
}

/// The current runs' tasks of a workflow, in brief.
fn tasks_of(machine: &StateMachine, workflow: &Workflow) -> Vec<pb::WorkflowTask> {
    let mut tasks = Vec::new();
    for (step, run) in workflow.spec.steps.iter().zip(&workflow.steps) {
        for &id in &run.tasks {
            let Some(task) = machine.get_task(id) else { continue };
            let outputs = machine.task_outputs(id);
            let mut reason = task.reason.clone().unwrap_or_default();
            if reason.len() > TASK_REASON_BYTES_MAX {
                let mut cut = TASK_REASON_BYTES_MAX;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
                reason.push('…');
            }
            tasks.push(pb::WorkflowTask {
                id: id.0,
                step: step.name.clone(),
                item: machine.task_step(id).and_then(|l| l.item.as_ref()).map(|i| i.index),
                state: pb::TaskState::from(task.state) as i32,
                attempt: task.attempt,
                started_unix_ms: task.started_unix_ms,
                finished_unix_ms: task.finished_unix_ms,
                reason,
                outputs: outputs.into_iter().flatten().map(|(n, _)| n.clone()).collect(),
                output_bytes: outputs.into_iter().flatten().map(|(_, d)| d.len() as u64).sum(),
            });
        }
    }
    tasks
}
