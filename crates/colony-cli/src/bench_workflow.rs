//! `colony bench workflow`: workflows per second and the step hand-off latency, with simulated
//! executors (real QUIC connections with mutual TLS, from one process, that run nothing but write
//! each declared output as `--output-bytes` bytes).
//!
//! Every workflow is a chain of `--steps` steps, each taking the previous step's output as its
//! input. At most `--in-flight` workflows run at once; as one ends the next is submitted. The
//! hand-off is timed from the moment a simulated executor finished a step (just before its report
//! left) to the moment the next step's assignment reached a simulated executor: the report's
//! commit, the apply that starts the next step, a scheduling round and the assignment, all in
//! this process's clock. Workflows/s counts every workflow from the first submission to the last
//! one's end.

use crate::bench::machine;
use crate::bench_schedule::Sims;
use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;
use colony_client::Client;
use colony_executor::sim::SimEvent;
use colony_proto::pb;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinSet;

/// How often a running workflow is asked whether it ended (a stale read from the server the
/// client talks to: a workflow that ended there has ended; the asking must not be the load).
const POLL: Duration = Duration::from_millis(50);
/// A workflow not ended within this long counts as stuck, and the run fails.
const WORKFLOW_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Args)]
pub struct WorkflowBenchArgs {
    /// Workflows to run.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    workflows: u64,
    /// Steps per workflow, a chain.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=64))]
    steps: u64,
    /// Bytes of each step's output (passed to the next step as its input).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(0..=262_144))]
    output_bytes: u64,
    /// Workflows running at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    in_flight: u64,
    /// Simulated executors to connect.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    executors: u64,
    /// How long a simulated executor holds each step before reporting success.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    hold: Duration,
}

#[derive(Debug, Serialize)]
struct LatencyMs {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: crate::bench::Machine,
    executors: u64,
    workflows: u64,
    steps: u64,
    output_bytes: u64,
    in_flight: u64,
    seconds: f64,
    workflows_per_second: f64,
    steps_per_second: f64,
    /// A step's end at its executor to the next step's assignment at one.
    hand_off_ms: LatencyMs,
    hand_offs: u64,
    /// Submission to its acknowledgement (the workflow committed).
    submit_ms: LatencyMs,
    failed: u64,
}

/// When each step ended and each step was assigned, by task name (`WORKFLOW/STEP`).
#[derive(Default)]
struct Times {
    finished: HashMap<String, Instant>,
    assigned: HashMap<String, Instant>,
}

fn latency(h: &Histogram<u64>) -> LatencyMs {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    LatencyMs { p50: ms(0.5), p90: ms(0.9), p99: ms(0.99), max: h.max() as f64 / 1000.0 }
}

/// One chain of `steps` steps named `s0`, `s1`, ...; each passes its output `out` to the next.
fn chain(name: &str, steps: u64) -> pb::WorkflowSpec {
    let task = pb::TaskSpec {
        resources: Some(pb::Resources {
            cpu_millis: 100,
            memory_bytes: 64 << 20,
            ..Default::default()
        }),
        run: Some(pb::task_spec::Run::Process(pb::ProcessRun {
            program: "/bin/true".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let steps = (0..steps)
        .map(|i| pb::WorkflowStep {
            name: format!("s{i}"),
            task: Some(task.clone()),
            after: if i == 0 { Vec::new() } else { vec![format!("s{}", i - 1)] },
            inputs: if i == 0 {
                Default::default()
            } else {
                [("in".to_owned(), format!("s{}.out", i - 1))].into()
            },
            outputs: vec!["out".into()],
            ..Default::default()
        })
        .collect();
    pb::WorkflowSpec {
        name: name.to_owned(),
        namespace: "bench".into(),
        steps,
        ..Default::default()
    }
}

/// Submits one workflow and polls it until it ends; returns the submission latency and whether
/// it succeeded.
async fn run_one(client: Client, spec: pb::WorkflowSpec) -> Result<(Duration, bool)> {
    let started = Instant::now();
    let request = pb::SubmitWorkflowRequest { spec: Some(spec) };
    let response = client
        .call("submit workflow", |mut c| {
            let request = request.clone();
            async move { c.submit_workflow(request).await }
        })
        .await?;
    let submitted = started.elapsed();
    let id = response.workflow.map(|w| w.id).context("no workflow in the answer")?;
    loop {
        let request =
            pb::GetWorkflowRequest { id, consistency: Some(pb::ReadConsistency { stale: true }) };
        let answer = client
            .call("get workflow", |mut c| async move { c.get_workflow(request).await })
            .await?;
        let state = answer.workflow.map(|w| w.state).unwrap_or_default();
        if state != pb::WorkflowState::Running as i32 {
            return Ok((submitted, state == pb::WorkflowState::Succeeded as i32));
        }
        if started.elapsed() > WORKFLOW_TIMEOUT {
            bail!("workflow {id} still running after {}s", WORKFLOW_TIMEOUT.as_secs());
        }
        tokio::time::sleep(POLL).await;
    }
}

pub async fn run(args: WorkflowBenchArgs, global: &GlobalArgs) -> Result<()> {
    let client = global.client()?;
    let (events, mut incoming) = mpsc::unbounded_channel();
    let times: Arc<Mutex<Times>> = Arc::default();
    let collector = {
        let times = times.clone();
        tokio::spawn(async move {
            while let Some(event) = incoming.recv().await {
                let mut times = times.lock().await;
                match event {
                    SimEvent::Assigned { name, at, .. } => times.assigned.insert(name, at),
                    SimEvent::Finished { name, at, .. } => times.finished.insert(name, at),
                };
            }
        })
    };
    let output_bytes = usize::try_from(args.output_bytes)?;
    let sims = Sims { count: args.executors, hold: args.hold, output_bytes };
    let mut sims = sims.start(&client, &global.endpoint, events).await?;

    let run_id = format!("{:08x}", rand::random::<u32>());
    let bar = ProgressBar::new(args.workflows).with_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} workflows")
            .map_err(|e| anyhow!("{e}"))?,
    );
    bar.set_message("running");
    let mut submit_us = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut running: JoinSet<Result<(Duration, bool)>> = JoinSet::new();
    let mut next = 0u64;
    let mut failed = 0u64;
    let started = Instant::now();
    loop {
        while next < args.workflows && (running.len() as u64) < args.in_flight {
            let spec = chain(&format!("bench-{run_id}-{next}"), args.steps);
            running.spawn(run_one(client.clone(), spec));
            next += 1;
        }
        let Some(done) = running.join_next().await else { break };
        let (submitted, succeeded) = done.context("a workflow's task")??;
        submit_us.saturating_record(submitted.as_micros() as u64);
        failed += u64::from(!succeeded);
        bar.inc(1);
        if let Some(Ok(Err(e))) = sims.try_join_next() {
            bail!("a simulated executor stopped: {e:#}");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    sims.abort_all();
    collector.abort();

    let mut hand_off_us = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    {
        let times = times.lock().await;
        for w in 0..args.workflows {
            for s in 1..args.steps {
                let before = times.finished.get(&format!("bench-{run_id}-{w}/s{}", s - 1));
                let after = times.assigned.get(&format!("bench-{run_id}-{w}/s{s}"));
                if let (Some(before), Some(after)) = (before, after) {
                    hand_off_us.saturating_record(
                        after.saturating_duration_since(*before).as_micros() as u64,
                    );
                }
            }
        }
    }
    let report = Report {
        machine: machine(),
        executors: args.executors,
        workflows: args.workflows,
        steps: args.steps,
        output_bytes: args.output_bytes,
        in_flight: args.in_flight,
        seconds,
        workflows_per_second: args.workflows as f64 / seconds,
        steps_per_second: (args.workflows * args.steps) as f64 / seconds,
        hand_off_ms: latency(&hand_off_us),
        hand_offs: hand_off_us.len(),
        submit_ms: latency(&submit_us),
        failed,
    };
    match global.output {
        OutputFormat::Json => output::print_json(&report)?,
        OutputFormat::Table => output::print_fields(&[
            (
                "machine",
                format!(
                    "{} ({} cores, {})",
                    report.machine.cpu_model, report.machine.cores, report.machine.hostname
                ),
            ),
            ("simulated executors", report.executors.to_string()),
            (
                "workflows",
                format!(
                    "{} of {} chained steps, {} B outputs, {} at once",
                    report.workflows, report.steps, report.output_bytes, report.in_flight
                ),
            ),
            (
                "workflows/s",
                format!(
                    "{:.1} ({:.0} steps/s, {:.1}s in all)",
                    report.workflows_per_second, report.steps_per_second, report.seconds
                ),
            ),
            (
                "hand-off ms",
                format!(
                    "p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  ({} hand-offs)",
                    report.hand_off_ms.p50,
                    report.hand_off_ms.p90,
                    report.hand_off_ms.p99,
                    report.hand_off_ms.max,
                    report.hand_offs
                ),
            ),
            (
                "submit ms",
                format!(
                    "p50 {:.1}  p99 {:.1}  max {:.1}",
                    report.submit_ms.p50, report.submit_ms.p99, report.submit_ms.max
                ),
            ),
            ("failed", report.failed.to_string()),
        ])?,
    }
    if failed > 0 {
        bail!("{failed} workflows did not succeed");
    }
    Ok(())
}
