//! Tasks: submit, read, list, cancel, and the feed of finished tasks the learner follows.

use super::auth::Caller;
use super::AdminService;
use crate::node::Node;
use crate::traces;
use colony_core::{Command, Outcome, Permission, Task, TaskFilter, TaskId, TaskSpec};
use colony_process::trace;
use colony_proto::convert::{executor_to_proto, redact_env, task_state_from_proto};
use colony_proto::pb;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use std::sync::Arc;
use std::time::Duration;
use tonic::Status;

const PAGE_SIZE_DEFAULT: usize = 500;
const PAGE_SIZE_MAX: usize = 5000;
/// A page stops growing at this many encoded bytes, well under gRPC's 4 MiB message limit.
const PAGE_BYTES_MAX: usize = 2 << 20;
/// Finished tasks sent per read of the state while following the feed.
const WATCH_BATCH_MAX: usize = 256;
/// Messages buffered towards one watcher; a slow watcher makes the feed wait, not grow.
const WATCH_BUFFER_MAX: usize = 1024;
/// How often a caught-up watch looks for newly finished tasks.
const WATCH_POLL: Duration = Duration::from_millis(200);

pub type FinishedTaskStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::FinishedTask, Status>> + Send>>;

impl AdminService {
    pub(super) async fn watch_finished_tasks_here(
        &self,
        caller: Caller,
        request: pb::WatchFinishedTasksRequest,
    ) -> Result<FinishedTaskStream, Status> {
        let removed_through = self.node.state().machine.finished_removed_through();
        // 0 asks for the oldest record kept; a cursor retention passed has missed records.
        let after_seq = match request.after_seq {
            0 => removed_through,
            after_seq => {
                if let Some(refused) = behind_retention(after_seq, removed_through) {
                    return Err(refused);
                }
                after_seq
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER_MAX);
        tokio::spawn(follow_finished(self.node.clone(), after_seq, caller.sees_secrets(), tx));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    pub(super) async fn submit_task_here(
        &self,
        caller: Caller,
        request: pb::SubmitTaskRequest,
    ) -> Result<pb::SubmitTaskResponse, Status> {
        let started = std::time::Instant::now();
        let spec = request.spec.ok_or_else(|| Status::invalid_argument("missing spec"))?;
        let spec = TaskSpec::try_from(spec).map_err(|e| Status::invalid_argument(e.to_string()))?;
        caller.require(Permission::TaskSubmit, Some(&spec.namespace))?;
        let limits = self.node.state().machine.limits().clone();
        spec.validate(&limits)
            .map_err(|e| Status::invalid_argument(format!("invalid task: {e}")))?;
        // The task's trace: `submit` (this handler) and `commit` (the proposal) on the leader.
        let mut submit = trace::enabled().then(|| {
            let parent = trace::parent_from(caller.traceparent.as_deref().unwrap_or_default());
            traces::start("submit", SpanKind::Server, &parent)
        });
        let commit = submit
            .as_ref()
            .map(|s| traces::start("commit", SpanKind::Internal, &trace::parent(&s.context())));
        let outcome = self.propose(Command::SubmitTask(spec)).await;
        self.node.metrics().submit_seconds.observe(started.elapsed().as_secs_f64());
        if let Some(commit) = commit {
            commit.end();
        }
        if let (Err(e), Some(submit)) = (&outcome, submit.as_mut()) {
            submit.fail(e.to_string());
        }
        match outcome? {
            Outcome::Submitted { task, existing } => {
                if let Some(mut submit) = submit.take() {
                    submit.set(KeyValue::new("colony.task.id", task.id.0 as i64));
                    submit.set(KeyValue::new("colony.task.existing", existing));
                    if !existing {
                        self.node.sessions().traces().submitted(task.id, submit.context());
                    }
                    submit.end();
                }
                Ok(pb::SubmitTaskResponse { task: Some(view(&caller, &task)), existing })
            }
            other => Err(Status::internal(format!("submit produced {other:?}"))),
        }
    }

    pub(super) async fn get_task_here(
        &self,
        caller: Caller,
        request: pb::GetTaskRequest,
    ) -> Result<pb::GetTaskResponse, Status> {
        let id = TaskId(request.id);
        let state = self.node.state();
        let task = state
            .machine
            .get_task(id)
            .ok_or_else(|| Status::not_found(format!("task {id} does not exist")))?;
        caller.require(Permission::TaskRead, Some(&task.spec.namespace))?;
        let applied_index = state.last_applied.map_or(0, |l| l.index);
        Ok(pb::GetTaskResponse { task: Some(view(&caller, task)), applied_index })
    }

    pub(super) async fn list_tasks_here(
        &self,
        caller: Caller,
        request: pb::ListTasksRequest,
    ) -> Result<pb::ListTasksResponse, Status> {
        let state_filter = task_state_from_proto(request.state)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let limit = match request.page_size as usize {
            0 => PAGE_SIZE_DEFAULT,
            n => n.min(PAGE_SIZE_MAX),
        };
        let filter = TaskFilter {
            state: state_filter,
            after: (request.after_id > 0).then_some(TaskId(request.after_id)),
            limit,
        };
        let state = self.node.state();
        // A caller limited to some namespaces sees only their tasks; the page is cut from those.
        let found =
            state.machine.list_tasks_where(&filter, |task| caller.covers(&task.spec.namespace));
        let mut tasks = Vec::with_capacity(found.len());
        let mut page_bytes = 0;
        for task in &found {
            let task = view(&caller, task);
            page_bytes += prost::Message::encoded_len(&task);
            if page_bytes > PAGE_BYTES_MAX && !tasks.is_empty() {
                break;
            }
            tasks.push(task);
        }
        let full = tasks.len() < found.len() || tasks.len() == limit;
        let next_after_id = if full { tasks.last().map_or(0, |t| t.id) } else { 0 };
        Ok(pb::ListTasksResponse {
            tasks,
            next_after_id,
            applied_index: state.last_applied.map_or(0, |l| l.index),
        })
    }

    pub(super) async fn cancel_task_here(
        &self,
        caller: Caller,
        request: pb::CancelTaskRequest,
    ) -> Result<pb::CancelTaskResponse, Status> {
        let (limits, namespace) = {
            let state = self.node.state();
            let namespace =
                state.machine.get_task(TaskId(request.id)).map(|t| t.spec.namespace.clone());
            (state.machine.limits().clone(), namespace)
        };
        // An unknown task is the state machine's to report (NOT_FOUND) for a caller who could
        // cancel somewhere; a known one is checked against its namespace.
        if let Some(namespace) = &namespace {
            caller.require(Permission::TaskCancel, Some(namespace))?;
        }
        if request.reason.len() > limits.arg_bytes_max {
            return Err(Status::invalid_argument(format!(
                "reason is {} bytes; the limit is {}",
                request.reason.len(),
                limits.arg_bytes_max
            )));
        }
        match self
            .propose(Command::CancelTask { id: TaskId(request.id), reason: request.reason })
            .await?
        {
            Outcome::Cancelled { task, cascaded } => Ok(pb::CancelTaskResponse {
                task: Some(view(&caller, &task)),
                cascaded: cascaded.into_iter().map(|id| id.0).collect(),
            }),
            other => Err(Status::internal(format!("cancel produced {other:?}"))),
        }
    }
}

/// A task as `caller` may see it: environment values redacted unless the role sees secrets.
fn view(caller: &Caller, task: &Task) -> pb::Task {
    redacted(task, caller.sees_secrets())
}

fn redacted(task: &Task, sees_secrets: bool) -> pb::Task {
    let mut task = pb::Task::from(task);
    if !sees_secrets {
        redact_env(&mut task);
    }
    task
}

/// `OUT_OF_RANGE` when retention removed records after `after_seq`: the watcher must resume
/// after `removed_through` ([`colony_proto::RESUME_AFTER_SEQ`] says so), knowing what it missed.
fn behind_retention(after_seq: u64, removed_through: u64) -> Option<Status> {
    if after_seq >= removed_through {
        return None;
    }
    let mut trailer = tonic::metadata::MetadataMap::new();
    trailer.insert(colony_proto::RESUME_AFTER_SEQ, removed_through.into());
    let message = format!(
        "finished tasks after {after_seq} up to {removed_through} were removed by retention \
         (--task-retention, --finished-tasks-max); resume after {removed_through}"
    );
    Some(Status::with_metadata(tonic::Code::OutOfRange, message, trailer))
}

/// Streams finished tasks to one watcher from its applied state until the watcher goes away.
async fn follow_finished(
    node: Arc<Node>,
    mut after_seq: u64,
    sees_secrets: bool,
    tx: tokio::sync::mpsc::Sender<Result<pb::FinishedTask, Status>>,
) {
    loop {
        // The watermark and the batch are read under one lock: records retention removes
        // between them cannot be skipped unnoticed.
        let batch: Result<Vec<pb::FinishedTask>, Status> = {
            let state = node.state();
            match behind_retention(after_seq, state.machine.finished_removed_through()) {
                Some(refused) => Err(refused),
                None => Ok(state
                    .machine
                    .finished_after(after_seq)
                    .take(WATCH_BATCH_MAX)
                    .map(|(seq, task)| pb::FinishedTask {
                        seq,
                        task: Some(redacted(task, sees_secrets)),
                        executor: task
                            .executor
                            .and_then(|e| state.machine.get_executor(e))
                            .map(|e| executor_to_proto(e, None)),
                    })
                    .collect()),
            }
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(refused) => {
                let _ = tx.send(Err(refused)).await;
                return;
            }
        };
        if batch.is_empty() {
            tokio::select! {
            _ = tokio::time::sleep(WATCH_POLL) => {}
                    _ = tx.closed() => return,
                }
            continue;
        }
        for item in batch {
            after_seq = item.seq;
            if tx.send(Ok(item)).await.is_err() {
                return;
            }
        }
    }
}
