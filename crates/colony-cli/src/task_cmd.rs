//! `colony task`: submit, get, list and cancel tasks.

use crate::output::{self, OutputFormat, TaskJson};
use crate::GlobalArgs;
use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Subcommand};
use colony_client::Client;
use colony_core::{
    parse_cpu_millis, parse_memory_bytes, Limits, PlacementPolicy, Resources, RunSpec, Task,
    TaskId, TaskSpec, TaskState,
};
use colony_proto::pb;
use std::collections::BTreeMap;
use std::time::Duration;

/// The most tasks asked for in one ListTasks page when `--limit` is given.
const PAGE_SIZE_MAX: usize = 1000;

// Parsed once per run, so the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Submit a task; prints its id (or the whole task with --output json).
    ///
    /// Example: colony task submit --name build --cpu 2 --memory 1Gi -- /usr/bin/make -j4
    Submit(SubmitArgs),
    /// Show one task.
    Get(GetArgs),
    /// List tasks in id order.
    List(ListArgs),
    /// Cancel a task, and the tasks that depend on it.
    Cancel(CancelArgs),
    /// Wait until tasks finish, showing progress; exits non-zero unless every one succeeded.
    Wait(WaitArgs),
    /// What a task wrote to $COLONY_OUTPUT_DIR: the list, or one output's bytes as they are.
    Output(OutputArgs),
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    id: u64,
    /// The output to print (all of its bytes, nothing else); without it, the list.
    name: Option<String>,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The tasks to wait for.
    #[arg(required = true)]
    ids: Vec<u64>,
    /// Give up after this long (default: wait as long as it takes).
    #[arg(long, value_parser = humantime::parse_duration)]
    max_wait: Option<Duration>,
    /// How often to ask.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    poll: Duration,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The task's name (letters, digits, '-', '_', '.', '/').
    #[arg(long)]
    name: String,
    #[arg(long, default_value = "default")]
    namespace: String,
    /// CPU to reserve: millicores (250m) or cores (2, 0.5).
    #[arg(long, default_value = "100m", allow_hyphen_values = true)]
    cpu: String,
    /// Memory to reserve: 64Mi, 8Gi, 512M, bytes, or `auto` (sized by the cluster's model, with a margin and a floor).
    #[arg(long, default_value = "64Mi", allow_hyphen_values = true)]
    memory: String,
    /// Whole GPUs to reserve.
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// A named custom resource to reserve, in whole units (repeatable).
    #[arg(long = "resource", value_name = "NAME=COUNT")]
    resources: Vec<String>,
    /// 0 (lowest) to 1000 (highest).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i64,
    /// A label an executor must carry (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// A capability an executor must offer (repeatable).
    #[arg(long = "capability", value_name = "CAPABILITY")]
    capabilities: Vec<String>,
    /// The task must finish within this long from now (e.g. 30m, 2h).
    #[arg(long, value_parser = humantime::parse_duration)]
    deadline: Option<Duration>,
    /// Each attempt is stopped after running this long (e.g. 90s).
    #[arg(long, value_parser = humantime::parse_duration)]
    task_timeout: Option<Duration>,
    /// How many times a failed attempt is retried.
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// Start only after this task has succeeded (repeatable).
    #[arg(long = "after", value_name = "ID")]
    after: Vec<u64>,
    /// An environment variable for the program (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Submissions with the same key create one task; by default a random key is generated, so
    /// the CLI's own retries never create two.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Place on the emptiest executor that fits instead of bin-packing onto the fullest.
    #[arg(long)]
    spread: bool,
    /// Run a built-in handler instead of a program.
    #[arg(long, value_name = "HANDLER", conflicts_with_all = ["command", "env"])]
    builtin: Option<String>,
    /// Input for the built-in handler.
    #[arg(long)]
    input: Option<String>,
    /// The program to run and its arguments, after `--`.
    #[arg(last = true, value_name = "PROGRAM [ARGS]")]
    command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    id: u64,
    /// Answer from the receiving server's own state, which may lag the leader.
    #[arg(long)]
    stale: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only tasks in this state (blocked, pending, assigned, running, succeeded, failed,
    /// cancelled, timed_out, lost).
    #[arg(long, value_parser = parse_state)]
    state: Option<TaskState>,
    /// At most this many tasks.
    #[arg(long, value_parser = parse_limit)]
    limit: Option<usize>,
    /// Answer from the receiving server's own state, which may lag the leader.
    #[arg(long)]
    stale: bool,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    id: u64,
    /// Why, recorded with the task.
    #[arg(long, default_value = "")]
    reason: String,
}

fn parse_state(text: &str) -> Result<TaskState, String> {
    text.parse()
}

fn parse_limit(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) | Err(_) => Err("must be a whole number of at least 1".to_owned()),
        Ok(limit) => Ok(limit),
    }
}

pub async fn run(command: TaskCommand, global: &GlobalArgs) -> Result<()> {
    match command {
        TaskCommand::Submit(args) => {
            // Everything is checked before anything is sent.
            let spec = build_spec(&args, colony_process::unix_ms())?;
            let client = global.client()?;
            let (task, existing) = submit(&client, &spec).await?;
            if existing && args.idempotency_key.is_some() {
                eprintln!("note: idempotency key matched task {}, submitted earlier; no new task was created", task.id);
            }
            match global.output {
                OutputFormat::Table => output::out(task.id)?,
                OutputFormat::Json => output::print_json(&TaskJson::from(&task))?,
            }
            Ok(())
        }
        TaskCommand::Get(args) => {
            let client = global.client()?;
            let request = pb::GetTaskRequest { id: args.id, consistency: consistency(args.stale) };
            let response =
                client.call("get task", |mut c| async move { c.get_task(request).await }).await?;
            if args.stale {
                stale_note(&client, response.applied_index);
            }
            let task = task_from_proto(response.task)?;
            match global.output {
                OutputFormat::Table => output::print_task_details(&task)?,
                OutputFormat::Json => output::print_json(&TaskJson::from(&task))?,
            }
            Ok(())
        }
        TaskCommand::List(args) => {
            let client = global.client()?;
            let tasks = list(&client, &args).await?;
            match global.output {
                OutputFormat::Table => output::print_task_table(&tasks)?,
                OutputFormat::Json => {
                    output::print_json(&tasks.iter().map(TaskJson::from).collect::<Vec<_>>())?
                }
            }
            Ok(())
        }
        TaskCommand::Wait(args) => {
            let client = global.client()?;
            let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr())
                && global.output == OutputFormat::Table;
            let tasks = wait(&client, &args.ids, args.max_wait, args.poll, interactive).await?;
            match global.output {
                OutputFormat::Table => output::print_task_table(&tasks)?,
                OutputFormat::Json => {
                    output::print_json(&tasks.iter().map(TaskJson::from).collect::<Vec<_>>())?
                }
            }
            let failed: Vec<String> = tasks
                .iter()
                .filter(|t| t.state != TaskState::Succeeded)
                .map(|t| format!("task {} ended {}", t.id, t.state))
                .collect();
            if !failed.is_empty() {
                bail!("{}", failed.join("; "));
            }
            Ok(())
        }
        TaskCommand::Output(args) => {
            let client = global.client()?;
            crate::workflow_cmd::task_output(&client, args.id, args.name, global.output).await
        }
        TaskCommand::Cancel(args) => {
            let client = global.client()?;
            let request = pb::CancelTaskRequest { id: args.id, reason: args.reason };
            let response = client
                .call("cancel task", |mut c| {
                    let request = request.clone();
                    async move { c.cancel_task(request).await }
                })
                .await?;
            let task = task_from_proto(response.task)?;
            match global.output {
                OutputFormat::Table => {
                    output::out(format!("cancelled task {}", task.id))?;
                    if !response.cascaded.is_empty() {
                        let ids: Vec<String> =
                            response.cascaded.iter().map(u64::to_string).collect();
                        output::out(format!("also cancelled its dependents: {}", ids.join(", ")))?;
                    }
                }
                OutputFormat::Json => {
                    output::print_json(
                        &serde_json::json!({ "task": TaskJson::from(&task), "cascaded": response.cascaded }),
                    )?;
                }
            }
            Ok(())
        }
    }
}

/// Polls the tasks until every one has finished; a progress bar shows how many have, and the
/// state of the first unfinished one.
pub async fn wait(
    client: &Client,
    ids: &[u64],
    max_wait: Option<Duration>,
    poll: Duration,
    show_progress: bool,
) -> Result<Vec<Task>> {
    let started = std::time::Instant::now();
    let bar = if show_progress {
        indicatif::ProgressBar::new(ids.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} finished  {msg}",
        )
        .map_err(|e| anyhow!("progress bar: {e}"))?,
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut done: BTreeMap<u64, Task> = BTreeMap::new();
    loop {
        let mut waiting_on = None;
        let unfinished: Vec<u64> =
            ids.iter().copied().filter(|id| !done.contains_key(id)).collect();
        for id in unfinished {
            let request = pb::GetTaskRequest { id, consistency: None };
            let response =
                client.call("get task", |mut c| async move { c.get_task(request).await }).await?;
            let task = task_from_proto(response.task)?;
            if task.state.is_finished() {
                done.insert(id, task);
            } else if waiting_on.is_none() {
                waiting_on = Some(task);
            }
        }
        bar.set_position(done.len() as u64);
        let Some(task) = waiting_on else { break };
        let place = task.executor.map_or_else(String::new, |e| format!(" on executor {e}"));
        let why = task.reason.as_deref().map_or_else(String::new, |r| format!(" ({r})"));
        bar.set_message(format!(
            "task {} {}{place}, attempt {}{why}",
            task.id, task.state, task.attempt
        ));
        if max_wait.is_some_and(|max| started.elapsed() >= max) {
            bar.abandon();
            bail!(
                "gave up after {}: task {} is still {}",
                humantime::format_duration(max_wait.unwrap_or_default()),
                task.id,
                task.state
            );
        }
        tokio::time::sleep(poll).await;
    }
    bar.finish_and_clear();
    Ok(ids.iter().filter_map(|id| done.remove(id)).collect())
}

/// Submits one spec, giving it a random idempotency key when it has none, so that the client's
/// retries through leader changes cannot create two tasks. Returns the task and whether it
/// existed already.
pub async fn submit(client: &Client, spec: &TaskSpec) -> Result<(Task, bool)> {
    submit_spec(client, pb::TaskSpec::from(spec)).await
}

/// Submits a wire spec and returns the new task's id.
pub async fn submit_wire(client: &Client, spec: pb::TaskSpec) -> Result<u64> {
    Ok(submit_spec(client, spec).await?.0.id.0)
}

async fn submit_spec(client: &Client, mut wire: pb::TaskSpec) -> Result<(Task, bool)> {
    if wire.idempotency_key.is_none() {
        wire.idempotency_key = Some(format!("cli-{:016x}", rand::random::<u64>()));
    }
    let request = pb::SubmitTaskRequest { spec: Some(wire) };
    let response = client
        .call("submit task", |mut c| {
            let request = request.clone();
            async move { c.submit_task(request).await }
        })
        .await?;
    Ok((task_from_proto(response.task)?, response.existing))
}

/// Every task matching `args`, following ListTasks pages until the last one or `--limit`.
async fn list(client: &Client, args: &ListArgs) -> Result<Vec<Task>> {
    let limit = args.limit;
    let mut tasks = Vec::new();
    let mut after_id = 0;
    let mut applied_index = 0;
    loop {
        let page_size = match limit {
            Some(limit) => u32::try_from((limit - tasks.len()).min(PAGE_SIZE_MAX)).unwrap_or(0),
            None => 0,
        };
        let request = pb::ListTasksRequest {
            state: args.state.map(|s| pb::TaskState::from(s) as i32).unwrap_or_default(),
            after_id,
            page_size,
            consistency: consistency(args.stale),
        };
        let response =
            client.call("list tasks", |mut c| async move { c.list_tasks(request).await }).await?;
        applied_index = applied_index.max(response.applied_index);
        for task in response.tasks {
            tasks.push(Task::try_from(task).context("the server sent a malformed task")?);
        }
        if let Some(limit) = limit {
            if tasks.len() >= limit {
                tasks.truncate(limit);
                break;
            }
        }
        if response.next_after_id == 0 {
            break;
        }
        // Pages must move forward; a server that says otherwise would keep us here forever.
        if response.next_after_id <= after_id {
            bail!(
                "the server returned page cursor {} after {after_id}; refusing to loop",
                response.next_after_id
            );
        }
        after_id = response.next_after_id;
    }
    if args.stale {
        stale_note(client, applied_index);
    }
    Ok(tasks)
}

fn consistency(stale: bool) -> Option<pb::ReadConsistency> {
    stale.then_some(pb::ReadConsistency { stale: true })
}

/// Says on stderr that a `--stale` answer may lag, so stdout stays clean for scripts.
fn stale_note(client: &Client, applied_index: u64) {
    eprintln!(
        "note: stale read from {} at applied index {applied_index}; it may lag the leader",
        client.last_server()
    );
}

pub fn task_from_proto(task: Option<pb::Task>) -> Result<Task> {
    let task = task.ok_or_else(|| anyhow!("the server's answer has no task"))?;
    Task::try_from(task).context("the server sent a malformed task")
}

/// Splits `KEY=VALUE` for the flag `flag`; the value may be empty or contain '='.
fn split_pair<'a>(flag: &str, text: &'a str) -> Result<(&'a str, &'a str)> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key, value)),
        _ => bail!("--{flag} {text:?} is not KEY=VALUE"),
    }
}

/// Collects `KEY=VALUE` pairs, refusing a key given twice.
pub fn pairs(flag: &str, items: &[String]) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for item in items {
        let (key, value) = split_pair(flag, item)?;
        if map.insert(key.to_owned(), value.to_owned()).is_some() {
            bail!("--{flag} {key} is given twice");
        }
    }
    Ok(map)
}

/// `--resource NAME=COUNT` flags as custom resources, counted in whole units.
pub fn custom_resources(items: &[String]) -> Result<BTreeMap<String, u64>> {
    let mut custom = BTreeMap::new();
    for (name, count) in pairs("resource", items)? {
        let count: u64 = count
            .parse()
            .map_err(|_| anyhow!("--resource {name}={count}: COUNT must be a whole number"))?;
        custom.insert(name, count);
    }
    Ok(custom)
}

fn millis(flag: &str, duration: Duration) -> Result<u64> {
    u64::try_from(duration.as_millis()).map_err(|_| anyhow!("--{flag} is too long"))
}

/// Turns the flags into a spec and checks it the way the server will, so that bad input is
/// refused here with a clear message and nothing is sent.
fn build_spec(args: &SubmitArgs, now_unix_ms: u64) -> Result<TaskSpec> {
    let cpu_millis = parse_cpu_millis(&args.cpu).context("invalid --cpu")?;
    let memory_auto = args.memory == "auto";
    let memory_bytes = if memory_auto {
        0
    } else {
        parse_memory_bytes(&args.memory).context("invalid --memory")?
    };
    let custom = custom_resources(&args.resources)?;
    let priority = u16::try_from(args.priority)
        .ok()
        .filter(|p| *p <= 1000)
        .ok_or_else(|| anyhow!("--priority {} is out of range 0..=1000", args.priority))?;
    let deadline_unix_ms = match args.deadline {
        Some(d) if d.is_zero() => bail!("--deadline must be greater than zero"),
        Some(d) => Some(
            now_unix_ms
                .checked_add(millis("deadline", d)?)
                .ok_or_else(|| anyhow!("--deadline is too long"))?,
        ),
        None => None,
    };
    let timeout_ms = args.task_timeout.map(|d| millis("task-timeout", d)).transpose()?;
    if args.input.is_some() && args.builtin.is_none() {
        bail!("--input is the input of a --builtin handler; a program gets arguments after `--`");
    }
    let run = match (&args.builtin, args.command.split_first()) {
        (Some(handler), _) => RunSpec::Builtin {
            handler: handler.clone(),
            input: args.input.clone().unwrap_or_default(),
        },
        (None, Some((program, rest))) => RunSpec::Process {
            program: program.clone(),
            args: rest.to_vec(),
            env: pairs("env", &args.env)?,
        },
        (None, None) => bail!("nothing to run: give `-- PROGRAM [ARGS]...` or --builtin HANDLER"),
    };
    let spec = TaskSpec {
        name: args.name.clone(),
        namespace: args.namespace.clone(),
        labels: pairs("label", &args.labels)?,
        capabilities: args.capabilities.iter().cloned().collect(),
        resources: Resources { cpu_millis, memory_bytes, gpus: args.gpus, custom },
        priority,
        deadline_unix_ms,
        timeout_ms,
        max_retries: args.retries,
        dependencies: args.after.iter().copied().map(TaskId).collect(),
        run,
        idempotency_key: args.idempotency_key.clone(),
        placement: if args.spread { PlacementPolicy::Spread } else { PlacementPolicy::BinPack },
        memory_auto,
    };
    spec.validate(&Limits::default()).context("invalid task")?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        args: SubmitArgs,
    }

    fn spec(argv: &[&str]) -> Result<TaskSpec> {
        let argv = std::iter::once("submit").chain(argv.iter().copied());
        let harness = Harness::try_parse_from(argv).map_err(|e| anyhow!("usage: {e}"))?;
        build_spec(&harness.args, 1_000)
    }

    fn error(argv: &[&str]) -> String {
        match spec(argv) {
            Ok(spec) => panic!("accepted {argv:?}: {spec:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn full_spec() {
        let spec = spec(&[
            "--name",
            "train",
            "--namespace",
            "ml",
            "--cpu",
            "2",
            "--memory",
            "8Gi",
            "--gpus",
            "1",
            "--resource",
            "license=2",
            "--priority",
            "500",
            "--label",
            "zone=a",
            "--capability",
            "cuda",
            "--deadline",
            "1m",
            "--task-timeout",
            "90s",
            "--retries",
            "3",
            "--after",
            "4",
            "--after",
            "5",
            "--env",
            "A=b=c",
            "--idempotency-key",
            "k1",
            "--",
            "/bin/train",
            "--epochs",
            "3",
        ]);
        let spec = match spec {
            Ok(spec) => spec,
            Err(e) => panic!("{e:#}"),
        };
        assert_eq!(spec.name, "train");
        assert_eq!(spec.namespace, "ml");
        assert_eq!(spec.resources.cpu_millis, 2000);
        assert_eq!(spec.resources.memory_bytes, 8 << 30);
        assert_eq!(spec.resources.gpus, 1);
        assert_eq!(spec.resources.custom.get("license"), Some(&2));
        assert_eq!(spec.priority, 500);
        assert_eq!(spec.labels.get("zone").map(String::as_str), Some("a"));
        assert!(spec.capabilities.contains("cuda"));
        assert_eq!(spec.deadline_unix_ms, Some(61_000));
        assert_eq!(spec.timeout_ms, Some(90_000));
        assert_eq!(spec.max_retries, 3);
        assert_eq!(spec.dependencies.iter().map(|d| d.0).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(spec.idempotency_key.as_deref(), Some("k1"));
        let RunSpec::Process { program, args, env } = &spec.run else { panic!("{:?}", spec.run) };
        assert_eq!(program, "/bin/train");
        assert_eq!(args, &["--epochs".to_owned(), "3".to_owned()]);
        assert_eq!(env.get("A").map(String::as_str), Some("b=c"));
    }

    #[test]
    fn defaults_and_builtins() {
        let spec = match spec(&["--name", "hello", "--builtin", "echo", "--input", "hi"]) {
            Ok(spec) => spec,
            Err(e) => panic!("{e:#}"),
        };
        assert_eq!(spec.namespace, "default");
        assert_eq!(spec.resources.cpu_millis, 100);
        assert_eq!(spec.resources.memory_bytes, 64 << 20);
        assert_eq!(spec.priority, 0);
        assert_eq!(spec.idempotency_key, None);
        assert_eq!(spec.run, RunSpec::Builtin { handler: "echo".into(), input: "hi".into() });
    }

    #[test]
    fn bad_input_is_refused_with_a_clear_message() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--name", "x", "--cpu", "-1", "--", "/bin/true"],
                "invalid --cpu: quantity \"-1\" is negative",
            ),
            (
                &["--name", "x", "--memory", "12Q", "--", "/bin/true"],
                "invalid --memory: quantity \"12Q\" has unknown unit",
            ),
            (
                &["--name", "x", "--label", "novalue", "--", "/bin/true"],
                "--label \"novalue\" is not KEY=VALUE",
            ),
            (&["--name", "x", "--label", "=v", "--", "/bin/true"], "is not KEY=VALUE"),
            (
                &["--name", "x", "--label", "a=1", "--label", "a=2", "--", "/bin/true"],
                "--label a is given twice",
            ),
            (&["--name", "", "--", "/bin/true"], "invalid task: name must not be empty"),
            (&["--name", "a b", "--", "/bin/true"], "invalid task: name \"a b\" may contain only"),
            (
                &["--name", "x", "--priority", "1001", "--", "/bin/true"],
                "--priority 1001 is out of range 0..=1000",
            ),
            (
                &["--name", "x", "--priority", "-3", "--", "/bin/true"],
                "--priority -3 is out of range",
            ),
            (
                &["--name", "x", "--resource", "lic=many", "--", "/bin/true"],
                "COUNT must be a whole number",
            ),
            (
                &["--name", "x", "--task-timeout", "0s", "--", "/bin/true"],
                "timeout must be greater than zero",
            ),
            (
                &["--name", "x", "--deadline", "0s", "--", "/bin/true"],
                "--deadline must be greater than zero",
            ),
            (&["--name", "x"], "nothing to run"),
            (
                &["--name", "x", "--input", "i", "--", "/bin/true"],
                "--input is the input of a --builtin handler",
            ),
            (&["--name", "x", "--retries", "1000", "--", "/bin/true"], "retries"),
        ];
        for (argv, expected) in cases {
            let message = error(argv);
            assert!(
                message.contains(expected),
                "{argv:?}: {message:?} does not contain {expected:?}"
            );
            assert!(!message.contains('\n'), "{message:?}");
        }
    }

    #[test]
    fn conflicting_flags_are_usage_errors() {
        let usage = |argv: &[&str]| {
            let argv = std::iter::once("submit").chain(argv.iter().copied());
            Harness::try_parse_from(argv).is_err()
        };
        assert!(usage(&["--name", "x", "--builtin", "h", "--", "/bin/true"]));
        assert!(usage(&["--name", "x", "--builtin", "h", "--env", "A=1"]));
        assert!(usage(&["--cpu", "1", "--", "/bin/true"]));
    }

    #[test]
    fn states_parse_like_the_core() {
        assert_eq!(parse_state("timed_out"), Ok(TaskState::TimedOut));
        assert!(parse_state("done").is_err_and(|e| e.contains("one of")));
        assert_eq!(parse_limit("20"), Ok(20));
        assert!(parse_limit("0").is_err());
        assert!(parse_limit("-1").is_err());
    }
}
