//! Agent commands: run (create, or change the spec and roll the instances onto it), scale and
//! stop; the hooks that keep the instances running as their tasks end (`agent_task_ended`) and
//! move a rolling update on as a new instance starts or becomes healthy (`agent_task_started`,
//! `agent_task_health`); and the registry of healthy instances (`Agents::endpoints`, left by a
//! task as it stops running, in `set_state`).

use super::{CommandError, Outcome, StateMachine};
use crate::agent::{
    Agent, AgentKey, AgentSpec, AgentState, Endpoint, Instance, RestartPolicy,
    ENDPOINT_ADDRESS_BYTES_MAX, RESTART_STREAK_RESET_MS,
};
use crate::ids::TaskId;
use crate::task::TaskState;
use imbl::OrdMap;

const REPLACED: &str = "replaced by the agent's new version";
const SCALED_DOWN: &str = "the agent was scaled down";
const STOPPED: &str = "the agent was stopped";

impl StateMachine {
    pub(super) fn run_agent(&mut self, spec: &AgentSpec) -> Result<Outcome, CommandError> {
        spec.validate(&self.limits, &self.agents.limits)
            .map_err(|e| CommandError::InvalidAgent(e.to_string()))?;
        let key = AgentKey { namespace: spec.namespace.clone(), name: spec.name.clone() };
        let now = self.now_unix_ms;
        let existing = self.agents.agents.get(&key).cloned();
        let Some(mut agent) = existing else {
            if self.agents.agents.len() >= self.agents.limits.agents_max {
                return Err(CommandError::TooMany {
                    what: "agents".to_owned(),
                    max: self.agents.limits.agents_max,
                });
            }
            let mut agent = Agent {
                spec: spec.clone(),
                version: 1,
                state: AgentState::Running,
                instances: OrdMap::new(),
                created_unix_ms: now,
                updated_unix_ms: now,
                reason: None,
            };
            for index in 0..spec.replicas {
                let task = self.insert_task(spec.instance_task(index), false);
                self.agents.tasks.insert(task, (key.clone(), index));
                agent.instances.insert(
                    index,
                    Instance { task, version: 1, replacing: None, streak: 0, restarts: 0 },
                );
            }
            self.agents.agents.insert(key, agent.clone());
            return Ok(Outcome::AgentRun { agent, created: true, stopped: Vec::new() });
        };
        let mut stopped = Vec::new();
        if agent.state == AgentState::Stopped {
            // Started again: a fresh set of instances on the spec given.
            agent.spec = spec.clone();
            agent.version += 1;
            agent.state = AgentState::Running;
            agent.reason = None;
            agent.updated_unix_ms = now;
            self.agents.agents.insert(key.clone(), agent);
            self.fill_instances(&key);
        } else if agent.spec != *spec {
            let replicas_only =
                AgentSpec { replicas: agent.spec.replicas, ..spec.clone() } == agent.spec;
            if !replicas_only {
                agent.version += 1;
            }
            agent.spec = spec.clone();
            agent.updated_unix_ms = now;
            self.agents.agents.insert(key.clone(), agent);
            stopped = self.apply_replicas(&key);
            stopped.extend(self.roll(&key));
        }
        let agent = self
            .agents
            .agents
            .get(&key)
            .cloned()
            .ok_or(CommandError::UnknownAgent(key.to_string()))?;
        Ok(Outcome::AgentRun { agent, created: false, stopped })
    }

    pub(super) fn scale_agent(
        &mut self,
        key: &AgentKey,
        replicas: u32,
    ) -> Result<Outcome, CommandError> {
        let mut agent = self
            .agents
            .agents
            .get(key)
            .cloned()
            .ok_or(CommandError::UnknownAgent(key.to_string()))?;
        if agent.state == AgentState::Stopped {
            return Err(CommandError::InvalidAgent(format!(
                "agent {key} is stopped: run it again to start instances"
            )));
        }
        let spec = AgentSpec { replicas, ..agent.spec.clone() };
        spec.validate(&self.limits, &self.agents.limits)
            .map_err(|e| CommandError::InvalidAgent(e.to_string()))?;
        agent.spec = spec;
        agent.updated_unix_ms = self.now_unix_ms;
        self.agents.agents.insert(key.clone(), agent);
        let stopped = self.apply_replicas(key);
        let agent = self
            .agents
            .agents
            .get(key)
            .cloned()
            .ok_or(CommandError::UnknownAgent(key.to_string()))?;
        Ok(Outcome::AgentScaled { agent, stopped })
    }

    pub(super) fn stop_agent(&mut self, key: &AgentKey) -> Result<Outcome, CommandError> {
        let mut agent = self
            .agents
            .agents
            .get(key)
            .cloned()
            .ok_or(CommandError::UnknownAgent(key.to_string()))?;
        if agent.state == AgentState::Stopped {
            return Ok(Outcome::AgentStopped { agent, stopped: Vec::new() });
        }
        agent.state = AgentState::Stopped;
        agent.updated_unix_ms = self.now_unix_ms;
        let instances = std::mem::take(&mut agent.instances);
        self.agents.agents.insert(key.clone(), agent);
        let mut stopped = Vec::new();
        for instance in instances.values() {
            for task in std::iter::once(instance.task).chain(instance.replacing) {
                stopped.extend(self.end_agent_task(task, STOPPED));
            }
        }
        let agent = self
            .agents
            .agents
            .get(key)
            .cloned()
            .ok_or(CommandError::UnknownAgent(key.to_string()))?;
        Ok(Outcome::AgentStopped { agent, stopped })
    }

    /// Ends an agent's task that has not finished (forgetting it as the agent's first, so the
    /// end does not restart it); returns it when it held resources (its executor must stop it).
    fn end_agent_task(&mut self, task: TaskId, reason: &str) -> Option<TaskId> {
        self.agents.tasks.remove(&task);
        let state = self.tasks.get(&task).map(|t| t.state)?;
        if state.is_finished() {
            return None;
        }
        self.end(task, TaskState::Cancelled, Some(reason.to_owned()));
        super::holds_resources(state).then_some(task)
    }

    /// Makes the instances `0..replicas`: starts missing ones, stops those beyond.
    fn apply_replicas(&mut self, key: &AgentKey) -> Vec<TaskId> {
        let Some(agent) = self.agents.agents.get(key).cloned() else { return Vec::new() };
        let mut stopped = Vec::new();
        let beyond: Vec<(u32, Instance)> = agent
            .instances
            .iter()
            .filter(|(index, _)| **index >= agent.spec.replicas)
            .map(|(i, inst)| (*i, inst.clone()))
            .collect();
        for (index, instance) in beyond {
            if let Some(agent) = self.agents.agents.get_mut(key) {
                agent.instances.remove(&index);
            }
            for task in std::iter::once(instance.task).chain(instance.replacing) {
                stopped.extend(self.end_agent_task(task, SCALED_DOWN));
            }
        }
        self.fill_instances(key);
        stopped
    }

    /// Starts a task for every missing instance below `replicas`, on the current version.
    fn fill_instances(&mut self, key: &AgentKey) {
        let Some(agent) = self.agents.agents.get(key).cloned() else { return };
        for index in 0..agent.spec.replicas {
            if agent.instances.contains_key(&index) {
                continue;
            }
            let task = self.insert_task(agent.spec.instance_task(index), false);
            self.agents.tasks.insert(task, (key.clone(), index));
            if let Some(agent) = self.agents.agents.get_mut(key) {
                agent.instances.insert(
                    index,
                    Instance {
                        task,
                        version: agent.version,
                        replacing: None,
                        streak: 0,
                        restarts: 0,
                    },
                );
            }
        }
    }

    /// A rolling update's next step: when no instance is being replaced, the lowest instance on
    /// an older version gets a new task; the old one runs on until the new one starts. Returns
    /// the tasks to stop at their executors.
    fn roll(&mut self, key: &AgentKey) -> Vec<TaskId> {
        let Some(agent) = self.agents.agents.get(key).cloned() else { return Vec::new() };
        if agent.state != AgentState::Running {
            return Vec::new();
        }
        // A replacement on an older version (a roll superseded by a newer spec, say one whose
        // new instance never turned healthy) is itself replaced at once; the task it was to
        // replace serves on until the newest one is healthy.
        let mut stopped = Vec::new();
        for (&index, instance) in &agent.instances {
            if instance.replacing.is_none() || instance.version == agent.version {
                continue;
            }
            stopped.extend(self.end_agent_task(instance.task, REPLACED));
            let task = self.insert_task(agent.spec.instance_task(index), false);
            self.agents.tasks.insert(task, (key.clone(), index));
            if let Some(agent) = self.agents.agents.get_mut(key) {
                let version = agent.version;
                agent
                    .instances
                    .insert(index, Instance { task, version, streak: 0, ..instance.clone() });
            }
        }
        if !stopped.is_empty() || agent.instances.values().any(|i| i.replacing.is_some()) {
            return stopped;
        }
        let Some((&index, old)) = agent.instances.iter().find(|(_, i)| i.version < agent.version)
        else {
            return Vec::new();
        };
        let old_running = self.tasks.get(&old.task).is_some_and(|t| t.state == TaskState::Running);
        let task = self.insert_task(agent.spec.instance_task(index), false);
        self.agents.tasks.insert(task, (key.clone(), index));
        if let Some(agent) = self.agents.agents.get_mut(key) {
            agent.instances.insert(
                index,
                Instance {
                    task,
                    version: agent.version,
                    // An old task that is not running holds nothing worth keeping up: it goes now.
                    replacing: old_running.then_some(old.task),
                    streak: 0,
                    restarts: old.restarts,
                },
            );
        }
        if old_running {
            return Vec::new();
        }
        let mut stopped: Vec<TaskId> =
            self.end_agent_task(old.task, REPLACED).into_iter().collect();
        stopped.extend(self.roll(key));
        stopped
    }

    /// An agent's task started running: for an agent without a health check, that is healthy
    /// enough to move a rolling update on (see `instance_healthy`).
    pub(super) fn agent_task_started(&mut self, task: TaskId) -> Vec<TaskId> {
        let checked = self
            .agents
            .tasks
            .get(&task)
            .and_then(|(key, _)| self.agents.agents.get(key))
            .is_some_and(|a| a.spec.health.is_some());
        if checked {
            return Vec::new();
        }
        self.instance_healthy(task)
    }

    /// An executor's word on a running instance's health: a healthy one is registered at
    /// `address` (and, with a health check, moves a rolling update on), an unhealthy one leaves
    /// the registry. Returns the tasks to stop at their executors.
    pub(super) fn agent_task_health(
        &mut self,
        task: TaskId,
        healthy: bool,
        address: &str,
    ) -> Result<Vec<TaskId>, CommandError> {
        let Some((key, _)) = self.agents.tasks.get(&task).cloned() else {
            return Err(CommandError::InvalidAgent(format!(
                "task {task} is not an agent instance: only instances report health"
            )));
        };
        if healthy
            && (address.is_empty()
                || address.len() > ENDPOINT_ADDRESS_BYTES_MAX
                || !address.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(CommandError::InvalidAgent(format!(
                "endpoint address of task {task} must be 1..={ENDPOINT_ADDRESS_BYTES_MAX} visible ASCII characters"
            )));
        }
        // One executor's reports commit concurrently, so its health report may overtake the
        // start it implies: the executor checks an instance only once it has started it.
        let mut stopped = Vec::new();
        if self.mark_started(task) {
            stopped.extend(self.agent_task_started(task));
        }
        if !healthy {
            self.agents.endpoints.remove(&task);
            return Ok(stopped);
        }
        let since = match self.agents.endpoints.get(&task) {
            Some(e) if e.address == address => e.healthy_since_unix_ms,
            _ => self.now_unix_ms,
        };
        self.agents
            .endpoints
            .insert(task, Endpoint { address: address.to_owned(), healthy_since_unix_ms: since });
        let checked = self.agents.agents.get(&key).is_some_and(|a| a.spec.health.is_some());
        if checked {
            stopped.extend(self.instance_healthy(task));
        }
        Ok(stopped)
    }

    /// An instance's new task is healthy: during a rolling update, the old task of its instance
    /// stops now and the next instance is replaced. Returns the tasks to stop at their executors.
    fn instance_healthy(&mut self, task: TaskId) -> Vec<TaskId> {
        let Some((key, index)) = self.agents.tasks.get(&task).cloned() else { return Vec::new() };
        let replacing = self
            .agents
            .agents
            .get(&key)
            .and_then(|a| a.instances.get(&index))
            .filter(|i| i.task == task)
            .and_then(|i| i.replacing);
        let Some(old) = replacing else { return Vec::new() };
        if let Some(instance) =
            self.agents.agents.get_mut(&key).and_then(|a| a.instances.get_mut(&index))
        {
            instance.replacing = None;
        }
        let mut stopped: Vec<TaskId> = self.end_agent_task(old, REPLACED).into_iter().collect();
        stopped.extend(self.roll(&key));
        stopped
    }

    /// An agent's task ended: its instance gets a new task (not placed before its backoff)
    /// unless the agent stopped or the policy lets it stay down. Called from `end` for every task.
    pub(super) fn agent_task_ended(&mut self, task: TaskId, state: TaskState) {
        // A task a rolling update stops from here has at most been assigned (a running one is
        // stopped by `agent_task_started`); its executor's next heartbeat learns it is not current.
        let Some((key, index)) = self.agents.tasks.remove(&task) else { return };
        let Some(agent) = self.agents.agents.get(&key).cloned() else { return };
        let Some(instance) = agent.instances.get(&index).cloned() else { return };
        if instance.replacing == Some(task) {
            // The old version's task of an instance being replaced ended by itself.
            if let Some(i) =
                self.agents.agents.get_mut(&key).and_then(|a| a.instances.get_mut(&index))
            {
                i.replacing = None;
            }
            self.roll(&key);
            return;
        }
        if instance.task != task || agent.state != AgentState::Running {
            return;
        }
        let now = self.now_unix_ms;
        if state == TaskState::Succeeded && agent.spec.restart == RestartPolicy::OnFailure {
            if let Some(agent) = self.agents.agents.get_mut(&key) {
                agent.instances.remove(&index);
                agent.reason = Some(format!(
                    "instance {index} succeeded; under restart on-failure it stays down"
                ));
                agent.updated_unix_ms = now;
            }
            return;
        }
        let ran_ms = self
            .tasks
            .get(&task)
            .and_then(|t| t.started_unix_ms)
            .map_or(0, |started| now.saturating_sub(started));
        let streak = if ran_ms >= RESTART_STREAK_RESET_MS { 1 } else { instance.streak + 1 };
        let backoff = agent.spec.backoff_ms(streak);
        // An older version's instance restarts on the current spec: a crash moves the roll on.
        let new = self.insert_task(agent.spec.instance_task(index), false);
        if let Some(t) = self.tasks.get_mut(&new) {
            t.not_before_unix_ms = now.saturating_add(backoff);
        }
        self.agents.tasks.insert(new, (key.clone(), index));
        if let Some(agent) = self.agents.agents.get_mut(&key) {
            let version = agent.version;
            agent.instances.insert(
                index,
                Instance {
                    task: new,
                    version,
                    // During a roll, the old task serves on until the restarted one is healthy.
                    replacing: instance.replacing,
                    streak,
                    restarts: instance.restarts + 1,
                },
            );
            agent.updated_unix_ms = now;
        }
    }

    pub fn get_agent(&self, key: &AgentKey) -> Option<&Agent> {
        self.agents.agents.get(key)
    }

    /// Agents after `after` in key order that `keep` accepts, at most `limit`.
    pub fn list_agents(
        &self,
        after: Option<&AgentKey>,
        limit: usize,
        keep: impl Fn(&AgentKey) -> bool,
    ) -> Vec<(&AgentKey, &Agent)> {
        let range = match after {
            Some(after) => self
                .agents
                .agents
                .range((std::ops::Bound::Excluded(after.clone()), std::ops::Bound::Unbounded)),
            None => self.agents.agents.range::<_, AgentKey>(..),
        };
        range.filter(|(k, _)| keep(k)).take(limit).collect()
    }

    /// The registry's entry for an instance task, when it is healthy.
    pub fn agent_endpoint(&self, task: TaskId) -> Option<&Endpoint> {
        self.agents.endpoints.get(&task)
    }

    /// The instance a task runs, if it is an agent's.
    pub fn agent_of_task(&self, task: TaskId) -> Option<&(AgentKey, u32)> {
        self.agents.tasks.get(&task)
    }
}

impl StateMachine {
    /// Every instance's task exists, is unfinished and indexed; the index holds nothing else; a
    /// stopped agent has no instances; no instance is beyond the replica count or from a future
    /// version.
    pub(super) fn check_agents(&self) -> Result<(), String> {
        let mut expected: OrdMap<TaskId, (AgentKey, u32)> = OrdMap::new();
        for (key, agent) in &self.agents.agents {
            if agent.state == AgentState::Stopped && !agent.instances.is_empty() {
                return Err(format!("stopped agent {key} has instances"));
            }
            for (&index, instance) in &agent.instances {
                if index >= agent.spec.replicas || instance.version > agent.version {
                    return Err(format!("agent {key} instance {index} is out of range"));
                }
                for task in std::iter::once(instance.task).chain(instance.replacing) {
                    match self.tasks.get(&task) {
                        Some(t) if !t.state.is_finished() => {}
                        _ => {
                            return Err(format!(
                                "agent {key} instance {index} names task {task}, which is not an unfinished task"
                            ))
                        }
                    }
                    expected.insert(task, (key.clone(), index));
                }
            }
        }
        if expected != self.agents.tasks {
            return Err("the agent task index does not mirror the instances".to_owned());
        }
        for task in self.agents.endpoints.keys() {
            let running = self.tasks.get(task).is_some_and(|t| t.state == TaskState::Running);
            if !running || !self.agents.tasks.contains_key(task) {
                return Err(format!(
                    "the registry holds task {task}, which is not a running instance"
                ));
            }
        }
        Ok(())
    }
}
