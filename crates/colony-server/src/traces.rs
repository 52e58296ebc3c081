//! One trace per task, across server and executor (when `--otlp-endpoint` is set).
//!
//! The spans of a task, each a child of the one before where the work passed on:
//!
//! ```text
//! submit (the leader's admin handler; its parent is the caller's `traceparent`, if any)
//! ├── commit (proposal to applied)
//! └── placement (the scheduling round that placed it, to its commit)
//!     └── assignment (the Assign sent to the executor; carries its context)
//!         └── run (the executor: assignment received to attempt ended)
//!             └── report (the leader: the executor's report received to committed)
//! ```
//!
//! The leader remembers each traced task's context from its submission to its end, in memory
//! (at most [`TRACKED_MAX`] tasks, the oldest forgotten first): the trace context is not part of
//! the replicated state, so a task placed by a leader other than the one that took its submission
//! starts a new trace at placement. The executor gets the context in the assignment and sends it
//! back in its report.

use colony_core::{ExecutorId, FencingToken, TaskId};
use colony_process::trace;
use opentelemetry::trace::{Span as _, SpanContext, SpanKind, Status, Tracer as _};
use opentelemetry::{Context, KeyValue};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

/// Tasks whose trace the leader remembers at once.
pub const TRACKED_MAX: usize = 65_536;

/// What the leader remembers of a traced task.
#[derive(Clone, Debug)]
struct Traced {
    /// The `submit` span: a new placement is its child.
    root: SpanContext,
    /// The latest `placement` span: an assignment is its child.
    placement: Option<SpanContext>,
}

/// The traced tasks this server leads.
#[derive(Default)]
pub struct TaskTraces {
    tasks: Mutex<BTreeMap<TaskId, Traced>>,
}

/// A span being recorded, ended by [`Open::end`].
pub struct Open {
    span: opentelemetry::global::BoxedSpan,
}

impl Open {
    pub fn context(&self) -> SpanContext {
        self.span.span_context().clone()
    }

    pub fn set(&mut self, attribute: KeyValue) {
        self.span.set_attribute(attribute);
    }

    pub fn fail(&mut self, why: String) {
        self.span.set_status(Status::error(why));
    }

    pub fn end(mut self) {
        self.span.end();
    }
}

/// Starts span `name` now under `parent` (a new trace when it is empty).
pub fn start(name: &'static str, kind: SpanKind, parent: &Context) -> Open {
    start_at(name, kind, parent, SystemTime::now())
}

fn start_at(name: &'static str, kind: SpanKind, parent: &Context, at: SystemTime) -> Open {
    let tracer = trace::tracer();
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_start_time(at)
        .start_with_context(&tracer, parent);
    Open { span }
}

fn task_attributes(task: TaskId, attempt: u32, token: FencingToken) -> [KeyValue; 3] {
    [
        KeyValue::new("colony.task.id", task.0 as i64),
        KeyValue::new("colony.task.attempt", i64::from(attempt)),
        KeyValue::new("colony.fencing_token", token.0 as i64),
    ]
}

impl TaskTraces {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<TaskId, Traced>> {
        self.tasks.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `task` was submitted under the (sampled) span `root`.
    pub fn submitted(&self, task: TaskId, root: SpanContext) {
        if !root.is_sampled() {
            return;
        }
        let mut tasks = self.lock();
        tasks.insert(task, Traced { root, placement: None });
        while tasks.len() > TRACKED_MAX {
            tasks.pop_first();
        }
    }

    /// A round that started at `started` placed `task` on `executor`; the placement committed now.
    pub fn placed(
        &self,
        task: TaskId,
        attempt: u32,
        token: FencingToken,
        executor: ExecutorId,
        started: SystemTime,
    ) {
        let mut tasks = self.lock();
        let Some(traced) = tasks.get_mut(&task) else { return };
        let mut span =
            start_at("placement", SpanKind::Internal, &trace::parent(&traced.root), started);
        for attribute in task_attributes(task, attempt, token) {
            span.set(attribute);
        }
        span.set(KeyValue::new("colony.executor.id", executor.0 as i64));
        traced.placement = Some(span.context());
        span.end();
    }

    /// The `traceparent` an assignment of `task` carries: an `assignment` span, child of its
    /// placement; empty for a task not traced.
    pub fn assignment(&self, task: TaskId, attempt: u32, token: FencingToken) -> String {
        let tasks = self.lock();
        let Some(parent) = tasks.get(&task).and_then(|t| t.placement.as_ref()) else {
            return String::new();
        };
        let mut span = start("assignment", SpanKind::Producer, &trace::parent(parent));
        for attribute in task_attributes(task, attempt, token) {
            span.set(attribute);
        }
        let context = span.context();
        span.end();
        trace::traceparent(&context)
    }

    /// `task` ended: nothing more of it is traced here.
    pub fn ended(&self, task: TaskId) {
        self.lock().remove(&task);
    }

    /// This server stopped leading: the next leader places what is left.
    pub fn clear(&self) {
        self.lock().clear();
    }
}

/// A `report` span for an executor's report carrying `traceparent` (none when it carries none).
pub fn report(traceparent: &str, task: TaskId, token: FencingToken) -> Option<Open> {
    let parent = trace::parse_traceparent(traceparent)?;
    let mut span = start("report", SpanKind::Consumer, &trace::parent(&parent));
    span.set(KeyValue::new("colony.task.id", task.0 as i64));
    span.set(KeyValue::new("colony.fencing_token", token.0 as i64));
    Some(span)
}
