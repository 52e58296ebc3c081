//! Agents: run (checked against the executors that exist, so a spec nobody could run is said, not
//! left pending), read, list, scale, stop. Instances are shown with their tasks' states.

use super::auth::Caller;
use super::AdminService;
use colony_core::state_machine::constraint_mismatch;
use colony_core::{
    Agent, AgentKey, AgentSpec, Command, ExecutorState, Outcome, Permission, StateMachine,
};
use colony_proto::convert::REDACTED;
use colony_proto::messaging::{namespace_or_default, non_empty};
use colony_proto::pb;
use tonic::Status;

fn key(namespace: &str, name: &str) -> AgentKey {
    AgentKey { namespace: namespace_or_default(namespace), name: name.to_owned() }
}

/// Why no registered executor could ever run an instance of `spec`, when there are executors
/// and none could (None: one could, or none has joined yet).
fn impossible(machine: &StateMachine, spec: &AgentSpec) -> Option<String> {
    let task = spec.instance_task(0);
    let mut reasons = Vec::new();
    for executor in machine.executors() {
        if executor.state == ExecutorState::Admitted {
            continue;
        }
        if let Some(mismatch) = constraint_mismatch(&task, &executor.spec) {
            reasons.push(format!("{} lacks {mismatch}", executor.spec.name));
        } else if let Some(short) = task.resources.first_shortfall(&executor.spec.capacity) {
            reasons.push(format!("{} offers less than {short}", executor.spec.name));
        } else {
            return None;
        }
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// An agent as `caller` may see it: instances with their tasks' states; environment values
/// redacted unless the role sees secrets.
fn view(caller: &Caller, machine: &StateMachine, agent: &Agent) -> pb::Agent {
    let mut spec = pb::AgentSpec::from(&agent.spec);
    if !caller.sees_secrets() {
        if let Some(pb::task_spec::Run::Process(process)) =
            spec.task.as_mut().and_then(|t| t.run.as_mut())
        {
            for value in process.env.values_mut() {
                *value = REDACTED.to_owned();
            }
        }
    }
    let instances = agent
        .instances
        .iter()
        .map(|(&index, instance)| {
            let task = machine.get_task(instance.task);
            let endpoint = machine.agent_endpoint(instance.task);
            pb::AgentInstance {
                index,
                task: instance.task.0,
                state: task.map_or(pb::TaskState::Unspecified, |t| pb::TaskState::from(t.state))
                    as i32,
                version: instance.version,
                replacing: instance.replacing.map_or(0, |t| t.0),
                restarts: instance.restarts,
                executor: task.and_then(|t| t.executor).map_or(0, |e| e.0),
                not_before_unix_ms: task.map_or(0, |t| t.not_before_unix_ms),
                reason: task.and_then(|t| t.reason.clone()).unwrap_or_default(),
                endpoint: endpoint.map(|e| e.address.clone()).unwrap_or_default(),
                healthy_since_unix_ms: endpoint.map_or(0, |e| e.healthy_since_unix_ms),
            }
        })
        .collect();
    pb::Agent {
        spec: Some(spec),
        version: agent.version,
        state: agent.state.as_str().to_owned(),
        instances,
        created_unix_ms: agent.created_unix_ms,
        updated_unix_ms: agent.updated_unix_ms,
        reason: agent.reason.clone().unwrap_or_default(),
    }
}

impl AdminService {
    pub(super) async fn run_agent_here(
        &self,
        caller: Caller,
        request: pb::RunAgentRequest,
    ) -> Result<pb::RunAgentResponse, Status> {
        let spec = request.spec.ok_or_else(|| Status::invalid_argument("missing spec"))?;
        let spec = AgentSpec::try_from(spec)
            .map_err(|e| Status::invalid_argument(format!("invalid agent: {e}")))?;
        caller.require(Permission::TaskSubmit, Some(&spec.namespace))?;
        if let Some(why) = impossible(&self.node.state().machine, &spec) {
            return Err(Status::failed_precondition(format!(
                "no executor could ever run agent {}: {why}",
                spec.name
            )));
        }
        match self.propose(Command::RunAgent(spec)).await? {
            Outcome::AgentRun { agent, created, .. } => {
                let state = self.node.state();
                Ok(pb::RunAgentResponse {
                    agent: Some(view(&caller, &state.machine, &agent)),
                    created,
                })
            }
            other => Err(Status::internal(format!("run agent produced {other:?}"))),
        }
    }

    pub(super) async fn get_agent_here(
        &self,
        caller: Caller,
        request: pb::GetAgentRequest,
    ) -> Result<pb::GetAgentResponse, Status> {
        let key = key(&request.namespace, &request.name);
        caller.require(Permission::TaskRead, Some(&key.namespace))?;
        let state = self.node.state();
        let agent = state
            .machine
            .get_agent(&key)
            .ok_or_else(|| Status::not_found(format!("agent {key} does not exist")))?;
        Ok(pb::GetAgentResponse { agent: Some(view(&caller, &state.machine, agent)) })
    }

    pub(super) async fn resolve_agent_here(
        &self,
        caller: Caller,
        request: pb::ResolveAgentRequest,
    ) -> Result<pb::ResolveAgentResponse, Status> {
        let key = key(&request.namespace, &request.name);
        caller.require(Permission::TaskRead, Some(&key.namespace))?;
        let state = self.node.state();
        let machine = &state.machine;
        let agent = machine
            .get_agent(&key)
            .ok_or_else(|| Status::not_found(format!("agent {key} does not exist")))?;
        let endpoints = agent
            .instances
            .iter()
            .flat_map(|(&index, instance)| {
                // During a rolling update the old version serves until the new one is healthy.
                let old = instance.replacing.map(|task| (index, task, 0));
                std::iter::once((index, instance.task, instance.version)).chain(old)
            })
            .filter_map(|(index, task, version)| {
                let endpoint = machine.agent_endpoint(task)?;
                Some(pb::AgentEndpoint {
                    index,
                    task: task.0,
                    version,
                    address: endpoint.address.clone(),
                    executor: machine.get_task(task).and_then(|t| t.executor).map_or(0, |e| e.0),
                    healthy_since_unix_ms: endpoint.healthy_since_unix_ms,
                })
            })
            .collect();
        Ok(pb::ResolveAgentResponse { endpoints })
    }

    pub(super) async fn list_agents_here(
        &self,
        caller: Caller,
        request: pb::ListAgentsRequest,
    ) -> Result<pb::ListAgentsResponse, Status> {
        let only = non_empty(request.namespace);
        if let Some(namespace) = &only {
            caller.require(Permission::TaskRead, Some(namespace))?;
        }
        let state = self.node.state();
        let agents = state
            .machine
            .list_agents(None, usize::MAX, |k| {
                caller.covers(&k.namespace) && only.as_ref().is_none_or(|n| *n == k.namespace)
            })
            .into_iter()
            .map(|(_, agent)| view(&caller, &state.machine, agent))
            .collect();
        Ok(pb::ListAgentsResponse { agents })
    }

    pub(super) async fn scale_agent_here(
        &self,
        caller: Caller,
        request: pb::ScaleAgentRequest,
    ) -> Result<pb::ScaleAgentResponse, Status> {
        let agent = key(&request.namespace, &request.name);
        caller.require(Permission::TaskSubmit, Some(&agent.namespace))?;
        match self.propose(Command::ScaleAgent { agent, replicas: request.replicas }).await? {
            Outcome::AgentScaled { agent, .. } => {
                let state = self.node.state();
                Ok(pb::ScaleAgentResponse { agent: Some(view(&caller, &state.machine, &agent)) })
            }
            other => Err(Status::internal(format!("scale agent produced {other:?}"))),
        }
    }

    pub(super) async fn stop_agent_here(
        &self,
        caller: Caller,
        request: pb::StopAgentRequest,
    ) -> Result<pb::StopAgentResponse, Status> {
        let agent = key(&request.namespace, &request.name);
        caller.require(Permission::TaskCancel, Some(&agent.namespace))?;
        match self.propose(Command::StopAgent { agent }).await? {
            Outcome::AgentStopped { agent, .. } => {
                let state = self.node.state();
                Ok(pb::StopAgentResponse { agent: Some(view(&caller, &state.machine, &agent)) })
            }
            other => Err(Status::internal(format!("stop agent produced {other:?}"))),
        }
    }
}
