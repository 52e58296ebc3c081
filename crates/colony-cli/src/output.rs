//! How results are printed: plain tables for people, JSON for scripts.

use anyhow::{Context as _, Result};
use colony_core::resources::{format_cpu_millis, format_memory_bytes};
use colony_core::{ExecutorId, FencingToken, RunSpec, Task, TaskId, TaskSpec, TaskState};
use comfy_table::{presets, ContentArrangement, Table};
use serde::Serialize;
use std::time::UNIX_EPOCH;

/// `--output`: how a command prints what it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// A borderless table in the style of `kubectl get`: columns separated by spaces, so the output
/// is easy to read and to cut with `awk`.
pub fn table<I, S>(header: I) -> Table
where
    I: IntoIterator<Item = S>,
    S: Into<comfy_table::Cell>,
{
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header);
    table
}

/// Writes one line to stdout. Unlike `println!`, a closed pipe (`colony task list | head`) is an
/// error the caller returns, and `main` ends the command quietly on it instead of panicking.
pub fn out(line: impl std::fmt::Display) -> Result<()> {
    use std::io::Write as _;
    writeln!(std::io::stdout().lock(), "{line}").map_err(anyhow::Error::from)
}

/// Whether `error` is stdout's reader having gone away.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Prints a table with no leading space and two spaces between columns.
pub fn print_table(mut table: Table) -> Result<()> {
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    // Trailing padding on the last column would leave spaces at the end of every line.
    for line in table.lines() {
        out(line.trim_end())?;
    }
    Ok(())
}

/// Key-value rows, for one record (a task, a benchmark report).
pub fn print_fields(fields: &[(&str, String)]) -> Result<()> {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled);
    for (key, value) in fields {
        table.add_row(vec![format!("{key}:"), value.clone()]);
    }
    print_table(table)
}

/// Prints any serializable value as pretty JSON on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("cannot encode the result as JSON")?;
    out(text)?;
    Ok(())
}

/// A task as scripts read it: the spec's fields (`name`, `priority`, `resources`, ...) at the top
/// level beside `id`, `state` and `attempt`. The core type nests the spec because it is persisted
/// with bincode, which cannot flatten.
#[derive(Serialize)]
pub struct TaskJson<'a> {
    id: TaskId,
    #[serde(flatten)]
    spec: &'a TaskSpec,
    state: TaskState,
    attempt: u32,
    retries_used: u32,
    fencing_token: Option<FencingToken>,
    executor: Option<ExecutorId>,
    started_unix_ms: Option<u64>,
    exit_code: Option<i32>,
    stdout_tail: &'a str,
    stderr_tail: &'a str,
    peak_memory_bytes: Option<u64>,
    allocated: &'a colony_core::Resources,
    created_unix_ms: u64,
    updated_unix_ms: u64,
    finished_unix_ms: Option<u64>,
    reason: Option<&'a str>,
}

impl<'a> From<&'a Task> for TaskJson<'a> {
    fn from(task: &'a Task) -> Self {
        TaskJson {
            id: task.id,
            spec: &task.spec,
            state: task.state,
            attempt: task.attempt,
            retries_used: task.retries_used,
            fencing_token: task.fencing_token,
            executor: task.executor,
            started_unix_ms: task.started_unix_ms,
            exit_code: task.exit_code,
            stdout_tail: &task.stdout_tail,
            stderr_tail: &task.stderr_tail,
            peak_memory_bytes: task.peak_memory_bytes,
            allocated: &task.allocated,
            created_unix_ms: task.created_unix_ms,
            updated_unix_ms: task.updated_unix_ms,
            finished_unix_ms: task.finished_unix_ms,
            reason: task.reason.as_deref(),
        }
    }
}

/// A short age the way `kubectl` prints it: `45s`, `12m`, `3h`, `5d`.
pub fn format_age(since_unix_ms: u64, now_unix_ms: u64) -> String {
    let seconds = now_unix_ms.saturating_sub(since_unix_ms) / 1000;
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 120 * 60 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The task-list table: ID, NAME, STATE, PRIORITY, CPU, MEMORY, ATTEMPT, AGE.
pub fn print_task_table(tasks: &[Task]) -> Result<()> {
    let now = colony_process::unix_ms();
    let mut t = table(["ID", "NAME", "STATE", "PRIORITY", "CPU", "MEMORY", "ATTEMPT", "AGE"]);
    for task in tasks {
        t.add_row(vec![
            task.id.to_string(),
            task.spec.name.clone(),
            task.state.to_string(),
            task.spec.priority.to_string(),
            format_cpu_millis(task.spec.resources.cpu_millis),
            format_memory_bytes(task.spec.resources.memory_bytes),
            task.attempt.to_string(),
            format_age(task.created_unix_ms, now),
        ]);
    }
    print_table(t)
}

/// Every field of one task, one per line.
pub fn print_task_details(task: &Task) -> Result<()> {
    let spec = &task.spec;
    let now = colony_process::unix_ms();
    let mut fields = vec![
        ("id", task.id.to_string()),
        ("name", spec.name.clone()),
        ("namespace", spec.namespace.clone()),
        ("state", task.state.to_string()),
        ("priority", spec.priority.to_string()),
        ("resources", spec.resources.to_string()),
        ("attempt", task.attempt.to_string()),
        ("retries", format!("{} of {}", task.retries_used, spec.max_retries)),
    ];
    if let Some(executor) = task.executor {
        fields.push(("executor", executor.to_string()));
    }
    let run = match &spec.run {
        RunSpec::Process { program, args, .. } => {
            std::iter::once(program).chain(args).cloned().collect::<Vec<_>>().join(" ")
        }
        RunSpec::Builtin { handler, input } if input.is_empty() => format!("builtin {handler}"),
        RunSpec::Builtin { handler, input } => format!("builtin {handler} (input {input:?})"),
    };
    fields.push(("run", run));
    if let RunSpec::Process { env, .. } = &spec.run {
        if !env.is_empty() {
            fields.push((
                "env",
                env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "),
            ));
        }
    }
    if !spec.dependencies.is_empty() {
        fields.push((
            "after",
            spec.dependencies.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
        ));
    }
    if !spec.labels.is_empty() {
        fields.push((
            "labels",
            spec.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", "),
        ));
    }
    if !spec.capabilities.is_empty() {
        fields.push((
            "capabilities",
            spec.capabilities.iter().cloned().collect::<Vec<_>>().join(", "),
        ));
    }
    if let Some(deadline) = spec.deadline_unix_ms {
        fields.push(("deadline", format_unix_ms(deadline)));
    }
    if let Some(timeout) = spec.timeout_ms {
        fields.push((
            "timeout",
            humantime::format_duration(std::time::Duration::from_millis(timeout)).to_string(),
        ));
    }
    if let Some(key) = &spec.idempotency_key {
        fields.push(("idempotency key", key.clone()));
    }
    if let Some(token) = task.fencing_token {
        fields.push(("fencing token", token.to_string()));
    }
    fields.push((
        "created",
        format!(
            "{} ({} ago)",
            format_unix_ms(task.created_unix_ms),
            format_age(task.created_unix_ms, now)
        ),
    ));
    fields.push(("updated", format_unix_ms(task.updated_unix_ms)));
    if let Some(finished) = task.finished_unix_ms {
        fields.push(("finished", format_unix_ms(finished)));
    }
    if let Some(started) = task.started_unix_ms {
        fields.push(("started", format_unix_ms(started)));
    }
    if let Some(reason) = &task.reason {
        fields.push(("reason", reason.clone()));
    }
    if let Some(code) = task.exit_code {
        fields.push(("exit code", code.to_string()));
    }
    if spec.memory_auto {
        let given = if task.attempt > 0 {
            format_memory_bytes(task.allocated.memory_bytes)
        } else {
            "not placed yet".to_owned()
        };
        fields.push(("memory", format!("auto: {given}")));
    }
    if let Some(peak) = task.peak_memory_bytes {
        fields.push(("peak memory", format_memory_bytes(peak)));
    }
    print_fields(&fields)?;
    for (name, tail) in [("stdout", &task.stdout_tail), ("stderr", &task.stderr_tail)] {
        if !tail.is_empty() {
            out(format!("--- {name} (last {} bytes) ---", tail.len()))?;
            out(tail.trim_end())?;
        }
    }
    Ok(())
}

/// An RFC 3339 timestamp (UTC, seconds) of a Unix time in milliseconds.
pub fn format_unix_ms(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_millis(unix_ms))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        let now = 1_000_000_000;
        assert_eq!(format_age(now - 5_000, now), "5s");
        assert_eq!(format_age(now - 600_000, now), "10m");
        assert_eq!(format_age(now - 3 * 3_600_000, now), "3h");
        assert_eq!(format_age(now - 5 * 86_400_000, now), "5d");
        // A server clock ahead of ours is not a negative age.
        assert_eq!(format_age(now + 5_000, now), "0s");
    }

    #[test]
    fn task_json_has_the_spec_fields_at_the_top_level() {
        let task = Task {
            id: TaskId(7),
            spec: TaskSpec {
                name: "hello".into(),
                namespace: "default".into(),
                labels: Default::default(),
                capabilities: Default::default(),
                resources: colony_core::Resources {
                    cpu_millis: 250,
                    memory_bytes: 64 << 20,
                    gpus: 0,
                    custom: Default::default(),
                },
                priority: 10,
                deadline_unix_ms: None,
                timeout_ms: None,
                max_retries: 0,
                dependencies: Default::default(),
                run: RunSpec::Process {
                    program: "/bin/echo".into(),
                    args: vec!["hi".into()],
                    env: Default::default(),
                },
                idempotency_key: None,
                placement: Default::default(),
                memory_auto: false,
            },
            state: TaskState::TimedOut,
            attempt: 0,
            retries_used: 0,
            fencing_token: None,
            executor: None,
            not_before_unix_ms: 0,
            started_unix_ms: None,
            exit_code: None,
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            peak_memory_bytes: None,
            finish_seq: Some(1),
            allocated: Default::default(),
            created_unix_ms: 1,
            updated_unix_ms: 1,
            finished_unix_ms: Some(1),
            reason: None,
        };
        let json = serde_json::to_value(TaskJson::from(&task)).expect("serializes");
        assert_eq!(json["id"], 7);
        assert_eq!(json["name"], "hello");
        assert_eq!(json["state"], "timed_out");
        assert_eq!(json["priority"], 10);
        assert_eq!(json["attempt"], 0);
        assert_eq!(json["resources"]["cpu_millis"], 250);
        assert_eq!(json["resources"]["memory_bytes"], 64 << 20);
    }
}
