//! The run's history: every call a client makes, as an invocation and a completion (ok, fail:
//! known not to have happened, unknown: it may or may not have), with monotonic timestamps. Streamed to
//! `history.jsonl` as it happens and kept in memory for the checkers.

use crate::check::task_model::{Obs, TaskState};
use colony_proto::pb;
use serde::Serialize;
use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    Submit,
    Read,
    Cancel,
    Executors,
}

/// What one executor looked like in a read.
#[derive(Clone, Debug, Serialize)]
pub struct ExecutorView {
    pub id: u64,
    pub state: String,
    pub cpu_millis: (u64, u64),
    pub memory_bytes: (u64, u64),
}

/// How a call ended.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    Submitted {
        id: u64,
        existing: bool,
        obs: Obs,
    },
    Read {
        obs: Option<Obs>,
    },
    Cancelled {
        obs: Obs,
    },
    CancelRefused,
    CancelNotFound,
    Executors {
        executors: Vec<ExecutorView>,
    },
    /// Known not to have taken effect.
    Fail {
        error: String,
    },
    /// May or may not have taken effect.
    Unknown {
        error: String,
    },
}

impl Outcome {
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Fail { .. } => "fail",
            Outcome::Unknown { .. } => "unknown",
            _ => "ok",
        }
    }
}

/// One completed (or abandoned) call.
#[derive(Clone, Debug, Serialize)]
pub struct Op {
    pub index: usize,
    pub client: u64,
    pub server: String,
    pub call: Call,
    pub key: Option<String>,
    pub task: Option<u64>,
    pub invoke_ns: u64,
    /// None when the outcome is unknown.
    pub complete_ns: Option<u64>,
    pub outcome: Outcome,
}

#[derive(Serialize)]
struct Line<'a> {
    index: usize,
    #[serde(rename = "type")]
    kind: &'a str,
    time_ns: u64,
    client: u64,
    server: &'a str,
    f: Call,
    key: Option<&'a str>,
    task: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a Outcome>,
}

struct Inner {
    ops: Vec<Op>,
    /// Invocations are numbered in the order they happen; completions keep the number.
    next_index: usize,
    file: std::io::BufWriter<std::fs::File>,
    write_error: Option<String>,
}

/// Shared by every client; cheap to clone.
#[derive(Clone)]
pub struct History {
    started: Instant,
    inner: Arc<Mutex<Inner>>,
}

/// A call in flight: complete it with [`History::complete`].
pub struct Pending {
    index: usize,
    client: u64,
    server: String,
    call: Call,
    key: Option<String>,
    task: Option<u64>,
    invoke_ns: u64,
}

impl History {
    pub fn create(path: &Path, started: Instant) -> anyhow::Result<History> {
        let file = std::fs::File::create(path)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
        Ok(History {
            started,
            inner: Arc::new(Mutex::new(Inner {
                ops: Vec::new(),
                next_index: 0,
                file: std::io::BufWriter::new(file),
                write_error: None,
            })),
        })
    }

    pub fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(inner: &mut Inner, line: &Line<'_>) {
        let written = serde_json::to_writer(&mut inner.file, line)
            .map_err(|e| e.to_string())
            .and_then(|()| inner.file.write_all(b"\n").map_err(|e| e.to_string()));
        if let Err(e) = written {
            inner.write_error.get_or_insert(e);
        }
    }

    pub fn invoke(
        &self,
        client: u64,
        server: &str,
        call: Call,
        key: Option<String>,
        task: Option<u64>,
    ) -> Pending {
        let mut inner = self.lock();
        let invoke_ns = self.now_ns();
        let index = inner.next_index;
        inner.next_index += 1;
        let pending =
            Pending { index, client, server: server.to_owned(), call, key, task, invoke_ns };
        let line = Line {
            index: pending.index,
            kind: "invoke",
            time_ns: invoke_ns,
            client,
            server,
            f: call,
            key: pending.key.as_deref(),
            task,
            value: None,
        };
        Self::write(&mut inner, &line);
        pending
    }

    pub fn complete(&self, pending: Pending, outcome: Outcome) -> Op {
        let mut inner = self.lock();
        let now = self.now_ns();
        let complete_ns = if matches!(outcome, Outcome::Unknown { .. }) { None } else { Some(now) };
        let task = match &outcome {
            Outcome::Submitted { id, .. } => Some(*id),
            _ => pending.task,
        };
        let op = Op {
            index: pending.index,
            client: pending.client,
            server: pending.server,
            call: pending.call,
            key: pending.key,
            task,
            invoke_ns: pending.invoke_ns,
            complete_ns,
            outcome,
        };
        let line = Line {
            index: op.index,
            kind: op.outcome.kind(),
            time_ns: now,
            client: op.client,
            server: &op.server,
            f: op.call,
            key: op.key.as_deref(),
            task: op.task,
            value: Some(&op.outcome),
        };
        Self::write(&mut inner, &line);
        inner.ops.push(op.clone());
        op
    }

    /// Every completed call, in completion order, and the first error writing the file (if any).
    pub fn finish(&self) -> (Vec<Op>, Option<String>) {
        let mut inner = self.lock();
        if let Err(e) = inner.file.flush() {
            inner.write_error.get_or_insert(e.to_string());
        }
        (inner.ops.clone(), inner.write_error.clone())
    }
}

pub fn status_of(state: i32) -> Option<TaskState> {
    colony_proto::convert::task_state_from_proto(state).ok().flatten()
}

pub fn obs_of(task: &pb::Task) -> Option<Obs> {
    Some(Obs { status: status_of(task.state)?, token: task.fencing_token })
}
