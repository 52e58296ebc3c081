//! `colony bench placement`: does the learner's model help? Simulated executors (real QUIC, no
//! processes) in two classes, small and big, run a workload whose runtime depends on the task's
//! kind and the executor's class, and whose peak memory depends on the kind: nothing the
//! declared resources say. Every task has `--memory auto` and a completion target. The same
//! workload runs twice on one cluster: first with no model (the scheduler bin-packs and gives
//! every task the fallback memory), then after training a model on the first run's finished tasks
//! and publishing it. Printed for both: the share of tasks that missed their target, the
//! makespan, and memory reserved over memory used.

use crate::bench::machine;
use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;
use colony_client::{lazy_channel, Client, ClientConfig};
use colony_core::{Resources, TaskSpec};
use colony_executor::sim::{self, Behaviour, SimExecutor, SimRun};
use colony_proto::pb;
use colony_proto::pb::admin_client::AdminClient;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;

/// Kinds of work: (name, runtime on a big executor in ms, peak memory in MiB). On a small
/// executor everything takes three times as long.
const KINDS: [(&str, u64, u64); 4] =
    [("etl", 200, 96), ("train", 1200, 1536), ("render", 600, 384), ("index", 300, 192)];
const SMALL_SLOWDOWN: f64 = 3.0;
const BIG_CPU_MILLIS: u64 = 16_000;
/// A task's completion target: this many times its runtime on a big executor, plus a constant.
const TARGET_FACTOR: f64 = 2.0;
const TARGET_SLACK_MS: u64 = 500;

#[derive(Debug, Args)]
pub struct PlacementBenchArgs {
    /// Simulated executors, half small (4 CPUs, 8Gi), half big (16 CPUs, 32Gi).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=1000))]
    executors: u64,
    /// Tasks in each of the two runs.
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u64).range(50..=100_000))]
    tasks: u64,
    /// Submissions per second (open loop): low enough that the cluster has room to choose, which
    /// is when the choice matters.
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
}

#[derive(Debug, Serialize)]
struct Phase {
    model: Option<u64>,
    tasks: u64,
    missed_target: u64,
    miss_rate: f64,
    makespan_seconds: f64,
    memory_reserved_bytes: u64,
    memory_used_bytes: u64,
    /// Reserved over used: 1.0 is exact; the fallback reserves 512Mi for everything.
    over_reservation: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: crate::bench::Machine,
    executors: u64,
    without_model: Phase,
    with_model: Phase,
    holdout_mse: f64,
    baseline_mse: f64,
}

fn kind_of(name: &str) -> Option<(u64, u64)> {
    let prefix = name.split('-').next()?;
    KINDS.iter().find(|(kind, _, _)| *kind == prefix).map(|(_, ms, mib)| (*ms, *mib))
}

/// How a simulated attempt behaves: by kind and executor class, never by declared resources.
fn behaviour() -> Behaviour {
    Arc::new(|task: &TaskSpec, capacity: &Resources| {
        let (runtime_ms, memory_mib) = kind_of(&task.name).unwrap_or((100, 64));
        let slowdown = if capacity.cpu_millis >= BIG_CPU_MILLIS { 1.0 } else { SMALL_SLOWDOWN };
        SimRun {
            hold: Duration::from_millis((runtime_ms as f64 * slowdown) as u64),
            peak_memory_bytes: Some(memory_mib << 20),
            output_bytes: 0,
        }
    })
}

fn spec(kind: &str, runtime_ms: u64, i: u64, now_ms: u64) -> pb::TaskSpec {
    let target_ms = (runtime_ms as f64 * TARGET_FACTOR) as u64 + TARGET_SLACK_MS;
    pb::TaskSpec {
        name: format!("{kind}-{i}"),
        namespace: "bench".into(),
        resources: Some(pb::Resources {
            cpu_millis: 1000,
            memory_bytes: 0,
            gpus: 0,
            custom: Default::default(),
        }),
        priority: 100,
        memory_auto: true,
        // The completion target, which the scheduler reads as the deadline to order by.
        deadline_unix_ms: Some(now_ms + target_ms),
        run: Some(pb::task_spec::Run::Builtin(pb::BuiltinRun {
            handler: "sleep".into(),
            input: format!("{runtime_ms}ms"),
        })),
        idempotency_key: Some(format!("bench-placement-{:016x}", rand::random::<u64>())),
        ..Default::default()
    }
}

async fn run_phase(
    channels: &[AdminClient<colony_client::Channel>],
    client: &Client,
    tasks: u64,
    rate: f64,
    model: Option<u64>,
) -> Result<Phase> {
    let mut submitted = JoinSet::new();
    let start = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    for i in 0..tasks {
        tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
        let now = colony_process::unix_ms();
        let (kind, runtime_ms, _) = KINDS[(i % KINDS.len() as u64) as usize];
        let mut channel = channels[i as usize % channels.len()].clone();
        let request = pb::SubmitTaskRequest { spec: Some(spec(kind, runtime_ms, i, now)) };
        submitted.spawn(async move {
            channel.submit_task(request).await.map(|r| r.into_inner().task.map(|t| t.id))
        });
    }
    let mut ids = Vec::new();
    while let Some(done) = submitted.join_next().await {
        ids.push(
            done.context("submit")?
                .map_err(|s| anyhow!("submit: {}", s.message()))?
                .context("no task in the answer")?,
        );
    }
    let finished = crate::task_cmd::wait(
        client,
        &ids,
        Some(Duration::from_secs(600)),
        Duration::from_millis(200),
        false,
    )
    .await?;
    let mut missed = 0;
    let (mut reserved, mut used) = (0u64, 0u64);
    let (mut first, mut last) = (u64::MAX, 0u64);
    for task in &finished {
        let end = task.finished_unix_ms.unwrap_or(u64::MAX);
        if task.state != colony_core::TaskState::Succeeded
            || task.spec.deadline_unix_ms.is_some_and(|d| end > d)
        {
            missed += 1;
        }
        first = first.min(task.created_unix_ms);
        last = last.max(end);
        reserved += task.allocated.memory_bytes;
        used += task.peak_memory_bytes.unwrap_or(0);
    }
    Ok(Phase {
        model,
        tasks,
        missed_target: missed,
        miss_rate: missed as f64 / tasks as f64,
        makespan_seconds: last.saturating_sub(first) as f64 / 1000.0,
        memory_reserved_bytes: reserved,
        memory_used_bytes: used,
        over_reservation: if used > 0 { reserved as f64 / used as f64 } else { 0.0 },
    })
}

pub async fn run(args: PlacementBenchArgs, global: &GlobalArgs) -> Result<()> {
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a positive number");
    }
    let endpoints = global.endpoint.clone();
    let auth = global.auth()?;
    let client = global.client()?;
    let models = client
        .call("list models", |mut c| async move { c.list_models(pb::ListModelsRequest {}).await })
        .await?;
    if models.current.is_some() {
        bail!("this cluster already has a model; `bench placement` compares against none, so run it on a fresh cluster");
    }
    let token =
        crate::cluster_cmd::create_join_token(&client, Duration::from_secs(3600), "executor")
            .await?
            .token;
    eprintln!("joining {} simulated executors", args.executors);
    let endpoint = colony_quic::client_endpoint().context("cannot open a QUIC endpoint")?;
    let (events, mut incoming) = tokio::sync::mpsc::unbounded_channel();
    let drain = tokio::spawn(async move { while incoming.recv().await.is_some() {} });
    let mut sims = JoinSet::new();
    for i in 0..args.executors {
        let big = i % 2 == 1;
        let creds = sim::join(&endpoints, &token, &format!("sim-{i}")).await?;
        let (cpu_millis, memory_bytes) =
            if big { (BIG_CPU_MILLIS, 32u64 << 30) } else { (4_000, 8u64 << 30) };
        let capacity = Resources { cpu_millis, memory_bytes, gpus: 0, custom: Default::default() };
        let labels =
            BTreeMap::from([("class".to_owned(), if big { "big" } else { "small" }.to_owned())]);
        sims.spawn(SimExecutor::run(
            endpoint.clone(),
            endpoints.clone(),
            creds,
            capacity,
            labels,
            behaviour(),
            events.clone(),
        ));
    }
    crate::bench_schedule::wait_for_sims_up(
        &client,
        &mut sims,
        args.executors,
        &indicatif::ProgressBar::hidden(),
    )
    .await?;
    let channels: Vec<AdminClient<colony_client::Channel>> = endpoints
        .iter()
        .map(|e| lazy_channel(e, &ClientConfig::new(global.timeout), &auth).map(AdminClient::new))
        .collect::<Result<_, _>>()?;

    eprintln!("run 1: {} tasks, no model", args.tasks);
    let without_model = run_phase(&channels, &client, args.tasks, args.rate, None).await?;

    eprintln!("training on run 1's finished tasks");
    let mut feed = channels[0]
        .clone()
        .watch_finished_tasks(pb::WatchFinishedTasksRequest { after_seq: 0 })
        .await?
        .into_inner();
    let mut examples = Vec::new();
    let mut seen = 0u64;
    while seen < args.tasks {
        let item = tokio::time::timeout(Duration::from_secs(30), feed.next())
            .await
            .context("the finished-task feed stalled")?;
        let Some(item) = item else { bail!("the finished-task feed ended early") };
        seen += 1;
        if let Ok(example) = colony_learn::example::example(&item?) {
            examples.push(example);
        }
    }
    let decision = colony_learn::decide::decide(
        &colony_learn::CpuBackend,
        &examples,
        None,
        &colony_learn::decide::TrainConfig::default(),
    )
    .map_err(|e| anyhow!("training failed: {e}"))?;
    let evaluation = decision.evaluation.clone();
    if decision.verdict != colony_learn::decide::Verdict::Publish {
        bail!(
            "the trained model did not earn publishing ({}): holdout mse {:.4}, baseline {:.4}",
            decision.verdict.as_str(),
            evaluation.holdout_mse,
            evaluation.baseline_mse
        );
    }
    let model = pb::Model {
        device: "cpu".into(),
        feature_schema: colony_model::features::SCHEMA.into(),
        weights: colony_model::encode_weights(decision.model.mlp()),
        metrics: Some(pb::ModelMetrics {
            holdout_mse: evaluation.holdout_mse,
            baseline_mse: evaluation.baseline_mse,
            previous_mse: None,
            train_rows: evaluation.train_rows as u64,
            holdout_rows: evaluation.holdout_rows as u64,
        }),
        ..Default::default()
    };
    let request = pb::PublishModelRequest { model: Some(model) };
    let version = client
        .call("publish model", |mut c| {
            let request = request.clone();
            async move { c.publish_model(request).await }
        })
        .await?
        .version;

    eprintln!("run 2: {} tasks, model {version}", args.tasks);
    let with_model = run_phase(&channels, &client, args.tasks, args.rate, Some(version)).await?;
    sims.abort_all();
    drain.abort();

    let report = Report {
        machine: machine(),
        executors: args.executors,
        without_model,
        with_model,
        holdout_mse: evaluation.holdout_mse,
        baseline_mse: evaluation.baseline_mse,
    };
    match global.output {
        OutputFormat::Json => output::print_json(&report),
        OutputFormat::Table => {
            output::out(format!(
                "machine: {} ({} cores); {} simulated executors (half 4-CPU, half 16-CPU); model {version}: holdout mse {:.4} vs baseline {:.4}",
                report.machine.cpu_model, report.machine.cores, report.executors, report.holdout_mse, report.baseline_mse
            ))?;
            let mut table = output::table([
                "RUN",
                "TASKS",
                "MISSED TARGET",
                "MAKESPAN",
                "MEMORY RESERVED / USED",
            ]);
            output::out(format!("each run: {} tasks submitted at {}/s", args.tasks, args.rate))?;
            for (name, phase) in
                [("no model", &report.without_model), ("with model", &report.with_model)]
            {
                table.add_row(vec![
                    name.to_owned(),
                    phase.tasks.to_string(),
                    format!("{} ({:.1}%)", phase.missed_target, phase.miss_rate * 100.0),
                    format!("{:.2}s", phase.makespan_seconds),
                    format!("{:.2}x", phase.over_reservation),
                ]);
            }
            output::print_table(table)
        }
    }
}
