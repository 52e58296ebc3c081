//! The console's JSON API under `/ui/api/`: one admin RPC per endpoint, its answer reshaped for
//! the page. Each endpoint needs what its RPC needs:
//!
//! | endpoint                | admin RPC                    | permission                         |
//! |-------------------------|------------------------------|------------------------------------|
//! | `GET overview`          | ClusterStatus                | Status (every token)               |
//! | `GET executors`         | ListExecutors (stale)        | ClusterRead                        |
//! | `GET tasks`             | ListTasks (stale)            | TaskRead, the token's namespaces   |
//! | `GET workflows`         | ListWorkflows (stale)        | TaskRead, the token's namespaces   |
//! | `GET workflows/{id}`    | GetWorkflow (stale)          | TaskRead in the workflow's namespace |
//! | `GET agents`            | ListAgents (stale)           | TaskRead, the token's namespaces   |
//! | `GET models`            | ListModels                   | ClusterRead                        |
//!
//! Nothing here shows a task's (or an agent's) arguments or environment, or a model's weights.

use super::{ApiError, Console};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use colony_proto::pb::admin_server::Admin;
use colony_proto::pb::{self, ReadConsistency};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// The longest query string read.
const QUERY_BYTES_MAX: usize = 1024;
/// Tasks and workflows per page: the default and the most asked for.
const PAGE_DEFAULT: u32 = 50;
const PAGE_MAX: u32 = 200;
/// With a namespace filter, tasks are read a server page at a time (the admin API's largest)
/// and filtered here; a page may then hold fewer than asked for, and the cursor moves on.
const NAMESPACE_SCAN_MAX: u32 = 5000;
/// A reason as the console shows it (a task's or a step's).
const REASON_BYTES_MAX: usize = 256;
/// Agents in one answer (each with up to the server's `replicas_max` instances); more are
/// counted, not shown.
const AGENTS_SHOWN_MAX: usize = 200;

pub(super) fn routes(console: Console) -> Router {
    Router::new()
        .route("/overview", get(overview))
        .route("/executors", get(executors))
        .route("/tasks", get(tasks))
        .route("/workflows", get(workflows))
        .route("/workflows/:id", get(workflow))
        .route("/agents", get(agents))
        .route("/models", get(models))
        .fallback(|| async { ApiError::not_found() })
        .with_state(console)
}

/// The peer's address, when the server was started with it (always, through `serve_http_with`).
type Peer = Option<ConnectInfo<SocketAddr>>;

fn peer(peer: Peer) -> SocketAddr {
    peer.map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |ConnectInfo(addr)| addr)
}

/// A JSON answer nobody caches.
fn json<T: Serialize>(value: T) -> Response {
    let mut response = Json(value).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn stale() -> Option<ReadConsistency> {
    Some(ReadConsistency { stale: true })
}

/// The query string as `T`, refused when too long or not what `T` accepts.
fn query<T: DeserializeOwned>(uri: &Uri) -> Result<T, ApiError> {
    let raw = uri.query().unwrap_or_default();
    if raw.len() > QUERY_BYTES_MAX {
        return Err(ApiError::bad_request(format!(
            "the query string is {} bytes; the limit is {QUERY_BYTES_MAX}",
            raw.len()
        )));
    }
    axum::extract::Query::<T>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

fn page_size(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(PAGE_DEFAULT),
        Some(n) if (1..=PAGE_MAX).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!("limit {n} is not between 1 and {PAGE_MAX}"))),
    }
}

/// `TASK_STATE_TIMED_OUT` -> `timed_out`: a proto enum name without its prefix.
fn short_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_ascii_lowercase()
}

fn task_state_name(state: i32) -> String {
    pb::TaskState::try_from(state)
        .map_or_else(|_| "unknown".to_owned(), |s| short_name(s.as_str_name(), "TASK_STATE_"))
}

fn workflow_state_name(state: i32) -> String {
    pb::WorkflowState::try_from(state)
        .map_or_else(|_| "unknown".to_owned(), |s| short_name(s.as_str_name(), "WORKFLOW_STATE_"))
}

fn step_state_name(state: i32) -> String {
    pb::StepState::try_from(state)
        .map_or_else(|_| "unknown".to_owned(), |s| short_name(s.as_str_name(), "STEP_STATE_"))
}

/// A task state filter: empty or `all` for any, else a state's short name.
fn task_state_filter(name: Option<&str>) -> Result<pb::TaskState, ApiError> {
    match name.unwrap_or_default() {
        "" | "all" => Ok(pb::TaskState::Unspecified),
        name => pb::TaskState::from_str_name(&format!("TASK_STATE_{}", name.to_ascii_uppercase()))
            .filter(|s| *s != pb::TaskState::Unspecified)
            .ok_or_else(|| ApiError::bad_request(format!("unknown task state {name:?}"))),
    }
}

fn workflow_state_filter(name: Option<&str>) -> Result<pb::WorkflowState, ApiError> {
    match name.unwrap_or_default() {
        "" | "all" => Ok(pb::WorkflowState::Unspecified),
        name => pb::WorkflowState::from_str_name(&format!(
            "WORKFLOW_STATE_{}",
            name.to_ascii_uppercase()
        ))
        .filter(|s| *s != pb::WorkflowState::Unspecified)
        .ok_or_else(|| ApiError::bad_request(format!("unknown workflow state {name:?}"))),
    }
}

/// `text` cut to `REASON_BYTES_MAX` at a character boundary.
fn brief(text: &str) -> String {
    if text.len() <= REASON_BYTES_MAX {
        return text.to_owned();
    }
    let mut end = REASON_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Which server answered, and as of which of its applied indexes (when the RPC says).
#[derive(Serialize)]
struct AsOf {
    server_id: u64,
    applied_index: Option<u64>,
    /// Read through the leader (a linearizable read), not from this server's applied state.
    leader_read: bool,
}

impl AsOf {
    /// An answer from this server's applied state.
    fn here(server_id: u64, applied_index: Option<u64>) -> AsOf {
        AsOf { server_id, applied_index, leader_read: false }
    }
}

// ---- overview --------------------------------------------------------------------------------

#[derive(Serialize)]
struct Overview {
    #[serde(flatten)]
    as_of: AsOf,
    cluster_id: String,
    /// This server's Raft role.
    state: String,
    leader_id: Option<u64>,
    term: u64,
    commit_index: u64,
    version: String,
    joint: bool,
    members: Vec<Member>,
    task_count: u64,
    tasks_by_state: BTreeMap<String, u64>,
    executors_by_state: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct Member {
    id: u64,
    addr: String,
    role: String,
    leader: bool,
    reachable: bool,
    matched_index: Option<u64>,
}

async fn overview(
    State(console): State<Console>,
    from: Peer,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let status = console
        .call(&headers, peer(from), pb::ClusterStatusRequest {}, |admin, r| async move {
            admin.cluster_status(r).await
        })
        .await?;
    let members = status
        .members
        .into_iter()
        .map(|m| Member {
            leader: Some(m.id) == status.leader_id,
            id: m.id,
            addr: m.addr,
            role: m.role,
            reachable: m.reachable,
            matched_index: m.matched_index,
        })
        .collect();
    Ok(json(Overview {
        as_of: AsOf::here(status.node_id, Some(status.applied_index)),
        cluster_id: status.cluster_id,
        state: status.state,
        leader_id: status.leader_id,
        term: status.term,
        commit_index: status.commit_index,
        version: status.version,
        joint: status.joint,
        members,
        task_count: status.task_count,
        tasks_by_state: status.tasks_by_state.into_iter().collect(),
        executors_by_state: status.executors_by_state.into_iter().collect(),
    }))
}

// ---- executors -------------------------------------------------------------------------------

#[derive(Serialize, Default)]
struct Quantities {
    cpu_millis: u64,
    memory_bytes: u64,
    gpus: u32,
    custom: BTreeMap<String, u64>,
}

impl From<Option<pb::Resources>> for Quantities {
    fn from(r: Option<pb::Resources>) -> Quantities {
        let r = r.unwrap_or_default();
        Quantities {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            gpus: r.gpus,
            custom: r.custom.into_iter().collect(),
        }
    }
}

#[derive(Serialize)]
struct Executors {
    #[serde(flatten)]
    as_of: AsOf,
    executors: Vec<Executor>,
}

#[derive(Serialize)]
struct Executor {
    id: u64,
    name: String,
    state: String,
    capacity: Quantities,
    allocated: Quantities,
    labels: BTreeMap<String, String>,
    capabilities: Vec<String>,
    tasks: usize,
    heartbeat_age_ms: Option<u64>,
    reason: Option<String>,
    drain_deadline_unix_ms: Option<u64>,
}

async fn executors(
    State(console): State<Console>,
    from: Peer,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let request = pb::ListExecutorsRequest { consistency: stale() };
    let listed = console
        .call(
            &headers,
            peer(from),
            request,
            |admin, r| async move { admin.list_executors(r).await },
        )
        .await?;
    let executors = listed
        .executors
        .into_iter()
        .map(|e| Executor {
            id: e.id,
            name: e.name,
            state: e.state,
            capacity: e.capacity.into(),
            allocated: e.allocated.into(),
            labels: e.labels.into_iter().collect(),
            capabilities: e.capabilities,
            tasks: e.tasks.len(),
            heartbeat_age_ms: e.heartbeat_age_ms,
            reason: e.reason.as_deref().map(brief),
            drain_deadline_unix_ms: e.drain_deadline_unix_ms,
        })
        .collect();
    let as_of = AsOf::here(console.node().id(), Some(listed.applied_index));
    Ok(json(Executors { as_of, executors }))
}

// ---- tasks -----------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TasksQuery {
    state: Option<String>,
    namespace: Option<String>,
    after: Option<u64>,
    limit: Option<u32>,
}

#[derive(Serialize)]
struct Tasks {
    #[serde(flatten)]
    as_of: AsOf,
    tasks: Vec<Task>,
    /// Pass as `after` for the next page; 0 when this page is the last.
    next_after: u64,
}

#[derive(Serialize)]
struct Task {
    id: u64,
    name: String,
    namespace: String,
    state: String,
    attempt: u32,
    executor_id: Option<u64>,
    created_unix_ms: u64,
    started_unix_ms: Option<u64>,
    finished_unix_ms: Option<u64>,
    exit_code: Option<i32>,
    reason: Option<String>,
    requested: Quantities,
}

impl From<pb::Task> for Task {
    fn from(t: pb::Task) -> Task {
        let spec = t.spec.unwrap_or_default();
        Task {
            id: t.id,
            name: spec.name,
            namespace: spec.namespace,
            state: task_state_name(t.state),
            attempt: t.attempt,
            executor_id: t.executor_id,
            created_unix_ms: t.created_unix_ms,
            started_unix_ms: t.started_unix_ms,
            finished_unix_ms: t.finished_unix_ms,
            exit_code: t.exit_code,
            reason: t.reason.as_deref().map(brief),
            requested: spec.resources.into(),
        }
    }
}

async fn tasks(
    State(console): State<Console>,
    from: Peer,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let q: TasksQuery = query(&uri)?;
    let limit = page_size(q.limit)?;
    let namespace = q.namespace.filter(|n| !n.is_empty());
    let request = pb::ListTasksRequest {
        state: task_state_filter(q.state.as_deref())? as i32,
        after_id: q.after.unwrap_or(0),
        page_size: if namespace.is_some() { NAMESPACE_SCAN_MAX } else { limit },
        consistency: stale(),
    };
    let listed = console
        .call(&headers, peer(from), request, |admin, r| async move { admin.list_tasks(r).await })
        .await?;
    let (tasks, next_after) =
        page_in_namespace(listed.tasks, namespace.as_deref(), limit, listed.next_after_id);
    let as_of = AsOf::here(console.node().id(), Some(listed.applied_index));
    Ok(json(Tasks { as_of, tasks: tasks.into_iter().map(Task::from).collect(), next_after }))
}

/// The first `limit` of `tasks` in `namespace` (all of them for `None`), and the cursor after
/// them: the last one kept when the page filled, else where the server's page ended.
fn page_in_namespace(
    tasks: Vec<pb::Task>,
    namespace: Option<&str>,
    limit: u32,
    server_next_after: u64,
) -> (Vec<pb::Task>, u64) {
    let in_namespace =
        |t: &pb::Task| namespace.is_none_or(|n| t.spec.as_ref().is_some_and(|s| s.namespace == n));
    let kept: Vec<pb::Task> = tasks.into_iter().filter(in_namespace).take(limit as usize).collect();
    let next_after = match kept.last() {
        Some(last) if namespace.is_some() && kept.len() == limit as usize => last.id,
        _ => server_next_after,
    };
    (kept, next_after)
}

// ---- workflows -------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowsQuery {
    state: Option<String>,
    after: Option<u64>,
    limit: Option<u32>,
}

#[derive(Serialize)]
struct Workflows {
    #[serde(flatten)]
    as_of: AsOf,
    workflows: Vec<WorkflowBrief>,
    next_after: u64,
}

#[derive(Serialize)]
struct WorkflowBrief {
    id: u64,
    name: String,
    namespace: String,
    state: String,
    reason: String,
    created_unix_ms: u64,
    finished_unix_ms: Option<u64>,
    /// How many steps are in each state.
    steps_by_state: BTreeMap<String, u32>,
}

async fn workflows(
    State(console): State<Console>,
    from: Peer,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let q: WorkflowsQuery = query(&uri)?;
    let request = pb::ListWorkflowsRequest {
        state: workflow_state_filter(q.state.as_deref())? as i32,
        after_id: q.after.unwrap_or(0),
        page_size: page_size(q.limit)?,
        consistency: stale(),
    };
    let listed = console
        .call(
            &headers,
            peer(from),
            request,
            |admin, r| async move { admin.list_workflows(r).await },
        )
        .await?;
    let workflows = listed
        .workflows
        .into_iter()
        .map(|w| {
            let spec = w.spec.unwrap_or_default();
            let mut steps_by_state = BTreeMap::new();
            for step in &w.steps {
                *steps_by_state.entry(step_state_name(step.state)).or_insert(0) += 1;
            }
            WorkflowBrief {
                id: w.id,
                name: spec.name,
                namespace: spec.namespace,
                state: workflow_state_name(w.state),
                reason: brief(&w.reason),
                created_unix_ms: w.created_unix_ms,
                finished_unix_ms: w.finished_unix_ms,
                steps_by_state,
            }
        })
        .collect();
    let as_of = AsOf::here(console.node().id(), None);
    Ok(json(Workflows { as_of, workflows, next_after: listed.next_after_id }))
}

#[derive(Serialize)]
struct WorkflowDetail {
    #[serde(flatten)]
    as_of: AsOf,
    id: u64,
    name: String,
    namespace: String,
    state: String,
    reason: String,
    params: BTreeMap<String, String>,
    created_unix_ms: u64,
    finished_unix_ms: Option<u64>,
    output_bytes: u64,
    steps: Vec<Step>,
}

#[derive(Serialize)]
struct Step {
    name: String,
    state: String,
    /// The steps this one waits for or reads from: the DAG's edges into it.
    upstream: Vec<String>,
    after: Vec<String>,
    inputs: BTreeMap<String, String>,
    outputs: Vec<String>,
    for_each: String,
    allow_failure: bool,
    runs: u32,
    reason: String,
    started_unix_ms: Option<u64>,
    finished_unix_ms: Option<u64>,
    /// The current run's tasks by state (a `for_each` step has one per item).
    tasks_by_state: BTreeMap<String, u32>,
    task_ids: Vec<u64>,
}

/// The steps `step` depends on: its `after`, and the steps its inputs and `for_each` read
/// (`STEP.OUTPUT`; `params.NAME` is no step, in name order), each once.
fn upstream(step: &pb::WorkflowStep) -> Vec<String> {
    let reads = step.inputs.values().chain(std::iter::once(&step.for_each));
    // Sorted: the inputs are a map without an order of its own.
    let read_steps: std::collections::BTreeSet<String> = reads
        .filter_map(|source| match source.split_once('.') {
            Some(("params", _)) | None => None,
            Some((step, _)) => Some(step.to_owned()),
        })
        .collect();
    let mut upstream: Vec<String> = Vec::new();
    for name in step.after.iter().cloned().chain(read_steps) {
        if !upstream.contains(&name) {
            upstream.push(name);
        }
    }
    upstream
}

async fn workflow(
    State(console): State<Console>,
    from: Peer,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: u64 =
        id.parse().map_err(|_| ApiError::bad_request(format!("{id:?} is not a workflow id")))?;
    let request = pb::GetWorkflowRequest { id, consistency: stale() };
    let got = console
        .call(&headers, peer(from), request, |admin, r| async move { admin.get_workflow(r).await })
        .await?;
    let workflow = got.workflow.unwrap_or_default();
    let spec = workflow.spec.unwrap_or_default();
    let mut task_states: BTreeMap<&str, BTreeMap<String, u32>> = BTreeMap::new();
    for task in &got.tasks {
        let by_state = task_states.entry(task.step.as_str()).or_default();
        *by_state.entry(task_state_name(task.state)).or_insert(0) += 1;
    }
    let steps = spec
        .steps
        .iter()
        .zip(&workflow.steps)
        .map(|(spec, run)| Step {
            name: spec.name.clone(),
            state: step_state_name(run.state),
            upstream: upstream(spec),
            after: spec.after.clone(),
            inputs: spec.inputs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            outputs: spec.outputs.clone(),
            for_each: spec.for_each.clone(),
            allow_failure: spec.allow_failure,
            runs: run.runs,
            reason: brief(&run.reason),
            started_unix_ms: run.started_unix_ms,
            finished_unix_ms: run.finished_unix_ms,
            tasks_by_state: task_states.get(spec.name.as_str()).cloned().unwrap_or_default(),
            task_ids: run.tasks.clone(),
        })
        .collect();
    Ok(json(WorkflowDetail {
        as_of: AsOf::here(console.node().id(), Some(got.applied_index)),
        id: workflow.id,
        name: spec.name,
        namespace: spec.namespace,
        state: workflow_state_name(workflow.state),
        reason: brief(&workflow.reason),
        params: spec.params.into_iter().collect(),
        created_unix_ms: workflow.created_unix_ms,
        finished_unix_ms: workflow.finished_unix_ms,
        output_bytes: workflow.output_bytes,
        steps,
    }))
}

// ---- agents ----------------------------------------------------------------------------------

#[derive(Serialize)]
struct Agents {
    #[serde(flatten)]
    as_of: AsOf,
    agents: Vec<AgentBrief>,
    /// How many agents the token may see; more than `agents.len()` when some were left out.
    total: usize,
}

#[derive(Serialize)]
struct AgentBrief {
    namespace: String,
    name: String,
    /// `running` or `stopped`.
    state: String,
    version: u64,
    replicas: u32,
    restart: String,
    /// Instances whose task is running.
    running: usize,
    restarts: u64,
    requested: Quantities,
    created_unix_ms: u64,
    updated_unix_ms: u64,
    reason: String,
    instances: Vec<AgentInstance>,
}

#[derive(Serialize)]
struct AgentInstance {
    index: u32,
    task_id: u64,
    /// The instance's task's state; `unknown` when the task is gone.
    state: String,
    version: u64,
    /// During a rolling update: the older version's task still running.
    replacing: Option<u64>,
    restarts: u64,
    executor_id: Option<u64>,
    /// Not placed before this time (a restart's backoff).
    not_before_unix_ms: Option<u64>,
    reason: String,
    /// Where it serves, while its executor says it is healthy (the registry's entry).
    endpoint: Option<String>,
}

/// An agent as the console shows it: its instances, and nothing of what they run (no program,
/// arguments or environment).
fn agent_brief(agent: pb::Agent) -> AgentBrief {
    let spec = agent.spec.unwrap_or_default();
    let instances: Vec<AgentInstance> = agent
        .instances
        .into_iter()
        .map(|i| AgentInstance {
            index: i.index,
            task_id: i.task,
            state: if i.state == pb::TaskState::Unspecified as i32 {
                "unknown".to_owned()
            } else {
                task_state_name(i.state)
            },
            version: i.version,
            replacing: (i.replacing > 0).then_some(i.replacing),
            restarts: i.restarts,
            executor_id: (i.executor > 0).then_some(i.executor),
            not_before_unix_ms: (i.not_before_unix_ms > 0).then_some(i.not_before_unix_ms),
            reason: brief(&i.reason),
            endpoint: (!i.endpoint.is_empty()).then(|| brief(&i.endpoint)),
        })
        .collect();
    AgentBrief {
        namespace: spec.namespace,
        name: spec.name,
        state: agent.state,
        version: agent.version,
        replicas: spec.replicas,
        restart: spec.restart,
        running: instances.iter().filter(|i| i.state == "running").count(),
        restarts: instances.iter().map(|i| i.restarts).sum(),
        requested: spec.task.and_then(|t| t.resources).into(),
        created_unix_ms: agent.created_unix_ms,
        updated_unix_ms: agent.updated_unix_ms,
        reason: brief(&agent.reason),
        instances,
    }
}

async fn agents(
    State(console): State<Console>,
    from: Peer,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // No namespace asked for: every one the token covers, as the admin API filters them.
    let request = pb::ListAgentsRequest { namespace: String::new(), consistency: stale() };
    let listed = console
        .call(&headers, peer(from), request, |admin, r| async move { admin.list_agents(r).await })
        .await?;
    let total = listed.agents.len();
    let agents = listed.agents.into_iter().take(AGENTS_SHOWN_MAX).map(agent_brief).collect();
    // ListAgents says no applied index, but the read is this server's applied state all the same.
    let as_of = AsOf::here(console.node().id(), None);
    Ok(json(Agents { as_of, agents, total }))
}

// ---- models ----------------------------------------------------------------------------------

#[derive(Serialize)]
struct Models {
    #[serde(flatten)]
    as_of: AsOf,
    current: Option<u64>,
    models: Vec<Model>,
}

#[derive(Serialize)]
struct Model {
    version: u64,
    current: bool,
    created_unix_ms: u64,
    device: String,
    feature_schema: String,
    weights_bytes: u64,
    /// Mean squared error on the holdout set (log1p of ms and bytes).
    holdout_mse: f64,
    baseline_mse: f64,
    previous_mse: Option<f64>,
    train_rows: u64,
    holdout_rows: u64,
}

async fn models(
    State(console): State<Console>,
    from: Peer,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let listed = console
        .call(&headers, peer(from), pb::ListModelsRequest {}, |admin, r| async move {
            admin.list_models(r).await
        })
        .await?;
    let models = listed
        .models
        .into_iter()
        .map(|m| {
            let metrics = m.metrics.unwrap_or_default();
            Model {
                version: m.version,
                current: m.current,
                created_unix_ms: m.created_unix_ms,
                device: m.device,
                feature_schema: m.feature_schema,
                weights_bytes: m.weights_bytes,
                holdout_mse: metrics.holdout_mse,
                baseline_mse: metrics.baseline_mse,
                previous_mse: metrics.previous_mse,
                train_rows: metrics.train_rows,
                holdout_rows: metrics.holdout_rows,
            }
        })
        .collect();
    // ListModels is a linearizable read (served by the leader), not this server's state.
    let as_of = AsOf { server_id: console.node().id(), applied_index: None, leader_read: true };
    Ok(json(Models { as_of, current: listed.current, models }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: u64, namespace: &str) -> pb::Task {
        let spec = pb::TaskSpec { namespace: namespace.to_owned(), ..Default::default() };
        pb::Task { id, spec: Some(spec), ..Default::default() }
    }

    #[test]
    fn state_names_round_trip_and_unknown_ones_are_refused() {
        assert_eq!(task_state_name(pb::TaskState::TimedOut as i32), "timed_out");
        assert_eq!(task_state_filter(Some("timed_out")).ok(), Some(pb::TaskState::TimedOut));
        assert_eq!(task_state_filter(Some("all")).ok(), Some(pb::TaskState::Unspecified));
        assert_eq!(task_state_filter(None).ok(), Some(pb::TaskState::Unspecified));
        assert!(task_state_filter(Some("unspecified")).is_err());
        assert!(task_state_filter(Some("sleeping")).is_err());
        assert_eq!(workflow_state_filter(Some("running")).ok(), Some(pb::WorkflowState::Running));
        assert_eq!(step_state_name(pb::StepState::Waiting as i32), "waiting");
        assert_eq!(step_state_name(99), "unknown");
    }

    #[test]
    fn queries_are_bounded_and_checked() {
        let uri = |q: &str| -> Uri { format!("/ui/api/tasks?{q}").parse().unwrap_or_default() };
        let q: TasksQuery = match query(&uri("state=running&namespace=demo&limit=5")) {
            Ok(q) => q,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(
            (q.state.as_deref(), q.namespace.as_deref(), q.limit),
            (Some("running"), Some("demo"), Some(5))
        );
        assert!(query::<TasksQuery>(&uri("limit=x")).is_err());
        assert!(query::<TasksQuery>(&uri("colour=red")).is_err());
        assert!(query::<TasksQuery>(&uri(&format!("namespace={}", "n".repeat(2000)))).is_err());
        assert!(page_size(Some(0)).is_err() && page_size(Some(PAGE_MAX + 1)).is_err());
        assert_eq!(page_size(None).ok(), Some(PAGE_DEFAULT));
    }

    #[test]
    fn a_namespace_page_keeps_its_cursor() {
        let listed = vec![task(1, "a"), task(2, "b"), task(3, "a"), task(4, "a"), task(5, "b")];
        // Filled at task 3: the next page starts after it.
        let (kept, next) = page_in_namespace(listed.clone(), Some("a"), 2, 0);
        assert_eq!((kept.iter().map(|t| t.id).collect::<Vec<_>>(), next), (vec![1, 3], 3));
        // Not filled: the cursor is where the server's page ended.
        let (kept, next) = page_in_namespace(listed.clone(), Some("b"), 5, 77);
        assert_eq!((kept.iter().map(|t| t.id).collect::<Vec<_>>(), next), (vec![2, 5], 77));
        let (kept, next) = page_in_namespace(listed, None, 5, 9);
        assert_eq!((kept.len(), next), (5, 9));
    }

    #[test]
    fn edges_come_from_after_inputs_and_for_each() {
        let step = pb::WorkflowStep {
            name: "report".into(),
            after: vec!["analyze".into()],
            inputs: [
                ("topic".to_owned(), "params.topic".to_owned()),
                ("notes".to_owned(), "research.notes".to_owned()),
                ("analyses".to_owned(), "analyze.analysis".to_owned()),
            ]
            .into_iter()
            .collect(),
            for_each: String::new(),
            ..Default::default()
        };
        assert_eq!(upstream(&step), ["analyze", "research"]);
        let fan_out = pb::WorkflowStep { for_each: "research.topics".into(), ..Default::default() };
        assert_eq!(upstream(&fan_out), ["research"]);
    }

    #[test]
    fn an_agent_is_shown_with_its_instances_and_without_its_command() {
        let process = pb::ProcessRun {
            program: "/bin/secret-tool".into(),
            args: vec!["--password=hunter2".into()],
            ..Default::default()
        };
        let task = pb::TaskSpec {
            run: Some(pb::task_spec::Run::Process(process)),
            resources: Some(pb::Resources { cpu_millis: 100, ..Default::default() }),
            ..Default::default()
        };
        let instance = |index: u32, state: pb::TaskState, restarts, executor| pb::AgentInstance {
            index,
            task: 10 + u64::from(index),
            state: state as i32,
            version: 1,
            restarts,
            executor,
            ..Default::default()
        };
        let agent = pb::Agent {
            spec: Some(pb::AgentSpec {
                name: "demo".into(),
                namespace: "default".into(),
                task: Some(task),
                replicas: 3,
                restart: "always".into(),
                ..Default::default()
            }),
            version: 1,
            state: "running".into(),
            instances: vec![
                pb::AgentInstance {
                    endpoint: "10.0.0.7:20001".into(),
                    ..instance(0, pb::TaskState::Running, 2, 1)
                },
                instance(1, pb::TaskState::Pending, 1, 0),
                instance(2, pb::TaskState::Unspecified, 0, 0),
            ],
            ..Default::default()
        };
        let shown = agent_brief(agent);
        assert_eq!((shown.running, shown.restarts, shown.replicas), (1, 3, 3));
        assert_eq!(shown.requested.cpu_millis, 100);
        let states: Vec<&str> = shown.instances.iter().map(|i| i.state.as_str()).collect();
        assert_eq!(states, ["running", "pending", "unknown"]);
        assert_eq!(shown.instances[0].executor_id, Some(1));
        assert_eq!((shown.instances[1].executor_id, shown.instances[1].replacing), (None, None));
        assert_eq!(shown.instances[0].endpoint.as_deref(), Some("10.0.0.7:20001"));
        assert_eq!(shown.instances[1].endpoint, None, "only a healthy instance has an endpoint");
        let json = serde_json::to_string(&shown).unwrap_or_default();
        assert!(json.contains(r#""task_id":10"#), "{json}");
        assert!(!json.contains("secret-tool") && !json.contains("hunter2"), "{json}");
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        assert_eq!(brief("short"), "short");
        let long = brief(&"é".repeat(300));
        assert!(long.len() <= REASON_BYTES_MAX + '…'.len_utf8() && long.ends_with('…'));
    }
}
