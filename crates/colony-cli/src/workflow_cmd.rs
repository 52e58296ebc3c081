//! `colony workflow`: submit a workflow file, watch it as a DAG, list, cancel and retry.

use crate::output::{self, OutputFormat};
use crate::{workflow_file, GlobalArgs};
use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Subcommand};
use colony_client::Client;
use colony_core::WorkflowState;
use colony_proto::pb;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Subcommand)]
pub enum WorkflowCommand {
    /// Submit a workflow file (YAML or JSON); prints the workflow's id.
    ///
    /// Example: colony workflow submit examples/research.yaml --param topic="raft failover" --wait
    Submit(SubmitArgs),
    /// Show a workflow as a DAG: each step's state, attempt, duration and outputs.
    Get(GetArgs),
    /// List workflows in id order.
    List(ListArgs),
    /// Stop every running step of a workflow and cancel the rest.
    Cancel(CancelArgs),
    /// Re-run a failed or cancelled workflow's failed and cancelled steps and what depends on
    /// them; steps that succeeded keep their outputs.
    Retry(RetryArgs),
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The workflow file.
    file: PathBuf,
    /// A parameter's value, overriding the file's default (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// The namespace, overriding the file's.
    #[arg(long)]
    namespace: Option<String>,
    /// Wait until the workflow ends, drawing it as it goes; exits non-zero unless it succeeded.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this long.
    #[arg(long, value_parser = humantime::parse_duration, requires = "wait")]
    max_wait: Option<Duration>,
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
    /// Only workflows in this state (running, succeeded, failed, cancelled).
    #[arg(long, value_parser = parse_state)]
    state: Option<WorkflowState>,
    /// At most this many workflows.
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    id: u64,
    /// Why, recorded with the workflow.
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    id: u64,
}

fn parse_state(text: &str) -> Result<WorkflowState, String> {
    text.parse()
}

/// How often `--wait` asks.
const WAIT_POLL: Duration = Duration::from_millis(250);

pub async fn run(command: WorkflowCommand, global: &GlobalArgs) -> Result<()> {
    match command {
        WorkflowCommand::Submit(args) => {
            // Everything is checked before anything is sent.
            let spec = workflow_file::load(
                &args.file,
                &args.params,
                args.namespace.as_deref(),
                colony_process::unix_ms(),
            )?;
            let client = global.client()?;
            let request = pb::SubmitWorkflowRequest { spec: Some(spec) };
            let response = client
                .call("submit workflow", |mut c| {
                    let request = request.clone();
                    async move { c.submit_workflow(request).await }
                })
                .await?;
            let workflow =
                response.workflow.ok_or_else(|| anyhow!("the server's answer has no workflow"))?;
            if !args.wait {
                return match global.output {
                    OutputFormat::Table => output::out(workflow.id),
                    OutputFormat::Json => output::print_json(&WorkflowJson::from(&workflow)),
                };
            }
            let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr())
                && global.output == OutputFormat::Table;
            let (workflow, tasks) = wait(&client, workflow.id, args.max_wait, interactive).await?;
            print(&workflow, &tasks, global.output)?;
            let state = pb::WorkflowState::try_from(workflow.state).unwrap_or_default();
            if state != pb::WorkflowState::Succeeded {
                bail!(
                    "workflow {} ended {}: {}",
                    workflow.id,
                    state_name(workflow.state),
                    workflow.reason
                );
            }
            Ok(())
        }
        WorkflowCommand::Get(args) => {
            let client = global.client()?;
            let (workflow, tasks) = get(&client, args.id, args.stale).await?;
            print(&workflow, &tasks, global.output)
        }
        WorkflowCommand::List(args) => {
            let client = global.client()?;
            let workflows = list(&client, &args).await?;
            match global.output {
                OutputFormat::Table => {
                    let mut table = output::table([
                        "ID",
                        "NAME",
                        "NAMESPACE",
                        "STATE",
                        "STEPS",
                        "AGE",
                        "REASON",
                    ]);
                    let now = colony_process::unix_ms();
                    for w in &workflows {
                        let spec = w.spec.clone().unwrap_or_default();
                        let done = w
                            .steps
                            .iter()
                            .filter(|s| s.state == pb::StepState::Succeeded as i32)
                            .count();
                        table.add_row(vec![
                            w.id.to_string(),
                            spec.name,
                            spec.namespace,
                            state_name(w.state).to_owned(),
                            format!("{done}/{}", w.steps.len()),
                            age(now, w.created_unix_ms),
                            w.reason.clone(),
                        ]);
                    }
                    output::print_table(table)
                }
                OutputFormat::Json => output::print_json(
                    &workflows.iter().map(WorkflowJson::from).collect::<Vec<_>>(),
                ),
            }
        }
        WorkflowCommand::Cancel(args) => {
            let client = global.client()?;
            let request = pb::CancelWorkflowRequest { id: args.id, reason: args.reason };
            let response = client
                .call("cancel workflow", |mut c| {
                    let request = request.clone();
                    async move { c.cancel_workflow(request).await }
                })
                .await?;
            let workflow =
                response.workflow.ok_or_else(|| anyhow!("the server's answer has no workflow"))?;
            match global.output {
                OutputFormat::Table => output::out(format!("cancelled workflow {}", workflow.id)),
                OutputFormat::Json => output::print_json(&WorkflowJson::from(&workflow)),
            }
        }
        WorkflowCommand::Retry(args) => {
            let client = global.client()?;
            let request = pb::RetryWorkflowRequest { id: args.id };
            let response = client
                .call("retry workflow", |mut c| async move { c.retry_workflow(request).await })
                .await?;
            let workflow =
                response.workflow.ok_or_else(|| anyhow!("the server's answer has no workflow"))?;
            match global.output {
                OutputFormat::Table => {
                    let rerun: Vec<&str> = workflow
                        .steps
                        .iter()
                        .filter(|s| s.state != pb::StepState::Succeeded as i32)
                        .map(|s| s.name.as_str())
                        .collect();
                    output::out(format!("retrying workflow {}: {}", workflow.id, rerun.join(", ")))
                }
                OutputFormat::Json => output::print_json(&WorkflowJson::from(&workflow)),
            }
        }
    }
}

async fn get(
    client: &Client,
    id: u64,
    stale: bool,
) -> Result<(pb::Workflow, Vec<pb::WorkflowTask>)> {
    let consistency = stale.then_some(pb::ReadConsistency { stale: true });
    let request = pb::GetWorkflowRequest { id, consistency };
    let response =
        client.call("get workflow", |mut c| async move { c.get_workflow(request).await }).await?;
    let workflow =
        response.workflow.ok_or_else(|| anyhow!("the server's answer has no workflow"))?;
    Ok((workflow, response.tasks))
}

/// Polls until the workflow ends; a progress bar counts the steps that ended and names the
/// running ones.
pub(crate) async fn wait(
    client: &Client,
    id: u64,
    max_wait: Option<Duration>,
    show_progress: bool,
) -> Result<(pb::Workflow, Vec<pb::WorkflowTask>)> {
    let started = std::time::Instant::now();
    let bar = match show_progress {
        true => indicatif::ProgressBar::new(0),
        false => indicatif::ProgressBar::hidden(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}",
        )
        .map_err(|e| anyhow!("progress bar: {e}"))?,
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    loop {
        let (workflow, tasks) = get(client, id, false).await?;
        let ended = workflow
            .steps
            .iter()
            .filter(|s| {
                matches!(
                    pb::StepState::try_from(s.state),
                    Ok(pb::StepState::Succeeded | pb::StepState::Failed | pb::StepState::Cancelled)
                )
            })
            .count();
        bar.set_length(workflow.steps.len() as u64);
        bar.set_position(ended as u64);
        let running: Vec<&str> = workflow
            .steps
            .iter()
            .filter(|s| s.state == pb::StepState::Running as i32)
            .map(|s| s.name.as_str())
            .collect();
        bar.set_message(format!("running: {}", running.join(", ")));
        if workflow.state != pb::WorkflowState::Running as i32 {
            bar.finish_and_clear();
            return Ok((workflow, tasks));
        }
        if let Some(max) = max_wait.filter(|max| started.elapsed() >= *max) {
            bar.abandon();
            bail!(
                "gave up after {}: workflow {id} is still running",
                humantime::format_duration(max)
            );
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// Every workflow matching `args`, following pages until the last one or `--limit`.
async fn list(client: &Client, args: &ListArgs) -> Result<Vec<pb::Workflow>> {
    let mut workflows = Vec::new();
    let mut after_id = 0;
    loop {
        let request = pb::ListWorkflowsRequest {
            state: args.state.map(|s| pb::WorkflowState::from(s) as i32).unwrap_or_default(),
            after_id,
            page_size: 0,
            consistency: None,
        };
        let response = client
            .call("list workflows", |mut c| async move { c.list_workflows(request).await })
            .await?;
        workflows.extend(response.workflows);
        if let Some(limit) = args.limit {
            if workflows.len() >= limit {
                workflows.truncate(limit);
                break;
            }
        }
        if response.next_after_id == 0 {
            break;
        }
        if response.next_after_id <= after_id {
            bail!(
                "the server returned page cursor {} after {after_id}; refusing to loop",
                response.next_after_id
            );
        }
        after_id = response.next_after_id;
    }
    Ok(workflows)
}

pub(crate) fn state_name(state: i32) -> &'static str {
    match pb::WorkflowState::try_from(state) {
        Ok(pb::WorkflowState::Running) => "running",
        Ok(pb::WorkflowState::Succeeded) => "succeeded",
        Ok(pb::WorkflowState::Failed) => "failed",
        Ok(pb::WorkflowState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn step_state_name(state: i32) -> &'static str {
    match pb::StepState::try_from(state) {
        Ok(pb::StepState::Waiting) => "waiting",
        Ok(pb::StepState::Running) => "running",
        Ok(pb::StepState::Succeeded) => "succeeded",
        Ok(pb::StepState::Failed) => "failed",
        Ok(pb::StepState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

/// The mark a step's state gets in the drawing.
fn mark(state: i32) -> &'static str {
    match pb::StepState::try_from(state) {
        Ok(pb::StepState::Succeeded) => "✔",
        Ok(pb::StepState::Failed) => "✘",
        Ok(pb::StepState::Cancelled) => "⊘",
        Ok(pb::StepState::Running) => "▶",
        _ => "·",
    }
}

fn age(now_ms: u64, then_ms: u64) -> String {
    let secs = now_ms.saturating_sub(then_ms) / 1000;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / (1 << 10) as f64),
        n => format!("{n} B"),
    }
}

/// Each step's depth: 0 for a step that waits for nothing, else one more than the deepest step it
/// waits for.
fn depths(spec: &pb::WorkflowSpec) -> Vec<usize> {
    let index: BTreeMap<&str, usize> =
        spec.steps.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    let waits: Vec<Vec<usize>> = spec
        .steps
        .iter()
        .map(|s| {
            let inputs = s.inputs.values().filter_map(|v| v.split_once('.').map(|(step, _)| step));
            let for_each = s.for_each.split_once('.').map(|(step, _)| step);
            s.after
                .iter()
                .map(String::as_str)
                .chain(inputs)
                .chain(for_each)
                .filter_map(|name| index.get(name).copied())
                .collect()
        })
        .collect();
    let mut depth = vec![0usize; spec.steps.len()];
    // The server refused cycles; at most one pass per step settles every depth.
    for _ in 0..spec.steps.len() {
        for (i, upstream) in waits.iter().enumerate() {
            depth[i] = upstream.iter().map(|&u| depth[u] + 1).max().unwrap_or(0);
        }
    }
    depth
}

/// Draws the workflow: one line per step in DAG order, indented by depth, with what it runs
/// after, its state, its tasks' attempts and times, and its outputs.
pub(crate) fn print(
    workflow: &pb::Workflow,
    tasks: &[pb::WorkflowTask],
    format: OutputFormat,
) -> Result<()> {
    if format == OutputFormat::Json {
        let mut json = WorkflowJson::from(workflow);
        json.tasks = tasks.iter().map(WorkflowTaskJson::from).collect();
        return output::print_json(&json);
    }
    let spec = workflow.spec.clone().unwrap_or_default();
    let now = colony_process::unix_ms();
    let ran_for = workflow.finished_unix_ms.unwrap_or(now).saturating_sub(workflow.created_unix_ms);
    output::out(format!(
        "workflow {} {} ({}): {} after {}{}",
        workflow.id,
        spec.name,
        spec.namespace,
        state_name(workflow.state),
        humantime::format_duration(Duration::from_millis(ran_for / 100 * 100)),
        if workflow.reason.is_empty() { String::new() } else { format!(": {}", workflow.reason) }
    ))?;
    let depth = depths(&spec);
    let mut order: Vec<usize> = (0..spec.steps.len()).collect();
    order.sort_by_key(|&i| (depth[i], i));
    let mut table =
        output::table(["STEP", "AFTER", "STATE", "TASKS", "ATTEMPT", "DURATION", "OUTPUTS"]);
    for i in order {
        let (step, run) = (&spec.steps[i], workflow.steps.get(i).cloned().unwrap_or_default());
        let own: Vec<&pb::WorkflowTask> = tasks.iter().filter(|t| t.step == step.name).collect();
        let indent = match depth[i] {
            0 => String::new(),
            d => format!("{}└─ ", "   ".repeat(d - 1)),
        };
        let fan_out =
            if step.for_each.is_empty() { String::new() } else { format!(" ×{}", own.len()) };
        let succeeded = own.iter().filter(|t| t.state == pb::TaskState::Succeeded as i32).count();
        let task_ids = match own.len() {
            0 => "-".to_owned(),
            1 => own[0].id.to_string(),
            n => format!("{succeeded}/{n} done"),
        };
        let duration = match (run.started_unix_ms, run.finished_unix_ms) {
            (Some(start), end) => {
                let ms = end.unwrap_or(now).saturating_sub(start);
                humantime::format_duration(Duration::from_millis(ms / 10 * 10)).to_string()
            }
            _ => "-".to_owned(),
        };
        let attempt = own.iter().map(|t| t.attempt).max().map_or("-".to_owned(), |a| a.to_string());
        let mut names: Vec<&str> =
            own.iter().flat_map(|t| t.outputs.iter().map(String::as_str)).collect();
        names.sort_unstable();
        names.dedup();
        let output_bytes: u64 = own.iter().map(|t| t.output_bytes).sum();
        let outputs = match names.is_empty() {
            true => "-".to_owned(),
            false => format!("{} ({})", names.join(", "), bytes(output_bytes)),
        };
        let mut state = format!("{} {}", mark(run.state), step_state_name(run.state));
        if !run.reason.is_empty() && run.state != pb::StepState::Succeeded as i32 {
            state = format!("{state}: {}", run.reason);
        }
        table.add_row(vec![
            format!("{indent}{}{fan_out}", step.name),
            if step.after.is_empty() { "-".to_owned() } else { step.after.join(",") },
            state,
            task_ids,
            attempt,
            duration,
            outputs,
        ]);
    }
    output::print_table(table)
}

/// A workflow as scripts read it.
#[derive(Serialize)]
struct WorkflowJson {
    id: u64,
    name: String,
    namespace: String,
    state: &'static str,
    reason: String,
    params: BTreeMap<String, String>,
    steps: Vec<StepJson>,
    output_bytes: u64,
    created_unix_ms: u64,
    finished_unix_ms: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tasks: Vec<WorkflowTaskJson>,
}

#[derive(Serialize)]
struct StepJson {
    name: String,
    state: &'static str,
    after: Vec<String>,
    tasks: Vec<u64>,
    runs: u32,
    started_unix_ms: Option<u64>,
    finished_unix_ms: Option<u64>,
    reason: String,
}

#[derive(Serialize)]
struct WorkflowTaskJson {
    id: u64,
    step: String,
    item: Option<u32>,
    state: String,
    attempt: u32,
    outputs: Vec<String>,
    output_bytes: u64,
    reason: String,
}

impl From<&pb::WorkflowTask> for WorkflowTaskJson {
    fn from(t: &pb::WorkflowTask) -> Self {
        let state = pb::TaskState::try_from(t.state)
            .map(|s| s.as_str_name().trim_start_matches("TASK_STATE_").to_lowercase())
            .unwrap_or_else(|_| "unknown".to_owned());
        WorkflowTaskJson {
            id: t.id,
            step: t.step.clone(),
            item: t.item,
            state,
            attempt: t.attempt,
            outputs: t.outputs.clone(),
            output_bytes: t.output_bytes,
            reason: t.reason.clone(),
        }
    }
}

impl From<&pb::Workflow> for WorkflowJson {
    fn from(w: &pb::Workflow) -> Self {
        let spec = w.spec.clone().unwrap_or_default();
        let after: BTreeMap<String, Vec<String>> =
            spec.steps.iter().map(|s| (s.name.clone(), s.after.clone())).collect();
        WorkflowJson {
            id: w.id,
            name: spec.name,
            namespace: spec.namespace,
            state: state_name(w.state),
            reason: w.reason.clone(),
            params: spec.params.into_iter().collect(),
            steps: w
                .steps
                .iter()
                .map(|s| StepJson {
                    name: s.name.clone(),
                    state: step_state_name(s.state),
                    after: after.get(&s.name).cloned().unwrap_or_default(),
                    tasks: s.tasks.clone(),
                    runs: s.runs,
                    started_unix_ms: s.started_unix_ms,
                    finished_unix_ms: s.finished_unix_ms,
                    reason: s.reason.clone(),
                })
                .collect(),
            output_bytes: w.output_bytes,
            created_unix_ms: w.created_unix_ms,
            finished_unix_ms: w.finished_unix_ms,
            tasks: Vec::new(),
        }
    }
}

/// `colony task output TASK [NAME]`: one output's bytes as they are, or the list of outputs.
pub async fn task_output(
    client: &Client,
    id: u64,
    name: Option<String>,
    format: OutputFormat,
) -> Result<()> {
    let request =
        pb::GetTaskOutputRequest { id, name: name.clone().unwrap_or_default(), consistency: None };
    let response = client
        .call("get task output", |mut c| {
            let request = request.clone();
            async move { c.get_task_output(request).await }
        })
        .await?;
    match (name, format) {
        (Some(_), OutputFormat::Table) => {
            let data = response.outputs.first().map(|o| o.data.as_slice()).unwrap_or_default();
            use std::io::Write as _;
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(data).context("cannot write the output")?;
            stdout.flush().context("cannot write the output")
        }
        (None, OutputFormat::Table) => {
            if response.outputs.is_empty() {
                eprintln!("task {id} has no outputs");
                return Ok(());
            }
            let mut table = output::table(["NAME", "BYTES", "START"]);
            for o in &response.outputs {
                let text = String::from_utf8_lossy(&o.data);
                let start: String =
                    text.chars().take(60).map(|c| if c.is_control() { ' ' } else { c }).collect();
                table.add_row(vec![o.name.clone(), o.data.len().to_string(), start]);
            }
            output::print_table(table)
        }
        (_, OutputFormat::Json) => {
            let outputs: BTreeMap<String, String> = response
                .outputs
                .iter()
                .map(|o| (o.name.clone(), String::from_utf8_lossy(&o.data).into_owned()))
                .collect();
            output::print_json(&outputs)
        }
    }
}
