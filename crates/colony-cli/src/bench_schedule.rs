//! `colony bench schedule`: placements per second and submit-to-assigned latency, with simulated
//! executors (real QUIC connections with mutual TLS, from one process, that run nothing).
//!
//! Throughput: every task waits behind one gate task; when the gate succeeds, all of them become
//! pending in one commit and the scheduler places the whole backlog. Placements/s is the backlog
//! over the time from the first assignment arriving at an executor to the last. Latency: tasks
//! are submitted open loop at `--rate`, and each is timed from the moment its submission was due
//! to the moment its assignment reached the simulated executor (same process, same clock).

use crate::bench::machine;
use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;
use colony_client::{lazy_channel, Client, ClientConfig};
use colony_core::{Resources, TaskId};
use colony_executor::sim::{self, SimEvent, SimExecutor};
use colony_proto::pb;
use colony_proto::pb::admin_client::AdminClient;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Simulated executors sharing one QUIC endpoint (one UDP socket).
const SIMS_PER_ENDPOINT: usize = 250;
const JOINS_IN_FLIGHT: usize = 16;
const SUBMITTERS: usize = 64;
/// How often the benchmark asks the cluster which executors are down.
const DOWN_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Args)]
pub struct ScheduleBenchArgs {
    /// Simulated executors to connect.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    executors: u64,
    /// Tasks in the throughput backlog.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    tasks: u64,
    /// Open-loop submissions per second in the latency phase.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// How long the latency phase submits.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    latency_duration: Duration,
    /// How long a simulated executor holds each assignment before reporting success; the gate
    /// task holds the backlog back this long, so it must outlast submitting the backlog.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    hold: Duration,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: crate::bench::Machine,
    executors: u64,
    backlog_tasks: u64,
    placements_per_second: f64,
    backlog_placed_seconds: f64,
    latency_rate_per_second: f64,
    latency_tasks: u64,
    /// Milliseconds from submission to the assignment arriving at the executor.
    submit_to_assigned_ms: LatencyMs,
    leader_rss_bytes: u64,
    /// Times a simulated executor was seen turn down while the benchmark ran (none has failed,
    /// so every one is the failure detector crying wolf), polled every `DOWN_POLL`.
    executors_seen_down: u64,
    /// Simulated executors the cluster says are down at the end.
    executors_down_at_end: u64,
}

#[derive(Debug, Serialize)]
struct LatencyMs {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn spec(name: &str, dependencies: Vec<u64>) -> pb::TaskSpec {
    pb::TaskSpec {
        name: name.to_owned(),
        namespace: "bench".to_owned(),
        resources: Some(pb::Resources {
            cpu_millis: 50,
            memory_bytes: 64 << 20,
            gpus: 0,
            custom: Default::default(),
        }),
        priority: 100,
        dependencies,
        run: Some(pb::task_spec::Run::Builtin(pb::BuiltinRun {
            handler: "sleep".into(),
            input: "1s".into(),
        })),
        idempotency_key: Some(format!("bench-{name}-{:016x}", rand::random::<u64>())),
        ..Default::default()
    }
}

/// Assignment arrival times by task, filled from the simulated executors' events.
type Arrivals = Arc<Mutex<HashMap<TaskId, Instant>>>;

pub async fn run(args: ScheduleBenchArgs, global: &GlobalArgs) -> Result<()> {
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a positive number");
    }
    let endpoints = global.endpoint.clone();
    let auth = global.auth()?;
    let client = global.client()?;
    let (events, mut incoming) = mpsc::unbounded_channel();
    let arrivals: Arrivals = Arc::default();
    let collector = {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Some(event) = incoming.recv().await {
                if let SimEvent::Assigned { task_id, at, .. } = event {
                    arrivals.lock().await.insert(task_id, Instant::from_std(at));
                }
            }
        })
    };
    let sims = Sims { count: args.executors, hold: args.hold, output_bytes: 0 };
    let mut sims = sims.start(&client, &endpoints, events).await?;
    let (watch_down, seen_down) = watch_down(client.clone());

    // Throughput: a backlog released all at once.
    let channels: Vec<AdminClient<colony_client::Channel>> = endpoints
        .iter()
        .map(|e| lazy_channel(e, &ClientConfig::new(global.timeout), &auth).map(AdminClient::new))
        .collect::<Result<_, _>>()?;
    let gate = crate::task_cmd::submit_wire(&client, spec("gate", Vec::new())).await?;
    let bar = ProgressBar::new(args.tasks).with_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len}").map_err(|e| anyhow!("{e}"))?,
    );
    bar.set_message("submitting the backlog behind a gate task");
    let backlog =
        submit_many(&channels, args.tasks, |i| spec(&format!("backlog-{i}"), vec![gate]), &bar)
            .await?;
    let gate_state = client
        .call("get task", |mut c| async move {
            c.get_task(pb::GetTaskRequest { id: gate, consistency: None }).await
        })
        .await?;
    if gate_state.task.is_some_and(|t| t.state == pb::TaskState::Succeeded as i32) {
        bail!("the gate task finished before the backlog was submitted: pass a longer --hold");
    }
    bar.set_message("placing the backlog");
    bar.set_position(0);
    let give_up = Instant::now() + args.hold + Duration::from_secs(120);
    let placed = loop {
        let seen = {
            let arrivals = arrivals.lock().await;
            backlog.iter().filter_map(|id| arrivals.get(id).copied()).collect::<Vec<_>>()
        };
        bar.set_position(seen.len() as u64);
        if seen.len() == backlog.len() {
            break seen;
        }
        if Instant::now() > give_up {
            bail!("only {} of {} backlog tasks were assigned within 2 minutes of the gate; see the servers' logs", seen.len(), backlog.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    bar.finish_and_clear();
    let first = placed.iter().min().copied().context("no placements")?;
    let last = placed.iter().max().copied().context("no placements")?;
    let window = last.duration_since(first).as_secs_f64().max(1e-3);

    // Latency: open loop at --rate.
    let count = (args.rate * args.latency_duration.as_secs_f64()).ceil() as u64;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let start = Instant::now() + Duration::from_millis(100);
    let bar = ProgressBar::new(count).with_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len}").map_err(|e| anyhow!("{e}"))?,
    );
    bar.set_message(format!("latency phase at {} tasks/s", args.rate));
    let mut submitted: JoinSet<Result<(TaskId, Instant)>> = JoinSet::new();
    for i in 0..count {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let mut channel = channels[i as usize % channels.len()].clone();
        let request =
            pb::SubmitTaskRequest { spec: Some(spec(&format!("latency-{i}"), Vec::new())) };
        submitted.spawn(async move {
            let task = channel
                .submit_task(request)
                .await
                .map_err(|s| anyhow!("submit: {}", s.message()))?
                .into_inner()
                .task;
            Ok((TaskId(task.context("no task in the answer")?.id), due))
        });
        bar.inc(1);
    }
    let mut due_by_task = Vec::new();
    while let Some(done) = submitted.join_next().await {
        due_by_task.push(done.context("submit task")??);
    }
    bar.finish_and_clear();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    loop {
        let arrivals = arrivals.lock().await;
        if due_by_task.iter().all(|(id, _)| arrivals.contains_key(id)) || Instant::now() > deadline
        {
            for (id, due) in &due_by_task {
                let Some(at) = arrivals.get(id) else {
                    bail!("task {id} was never assigned within 60s")
                };
                latency_us.saturating_record(at.saturating_duration_since(*due).as_micros() as u64);
            }
            break;
        }
        drop(arrivals);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    watch_down.abort();
    let executors_seen_down = seen_down.load(std::sync::atomic::Ordering::Relaxed);
    let executors_down_at_end = sims_down(&client).await?;
    let status = crate::cluster_cmd::cluster_status(&client).await?;
    let leader_rss = leader_rss(&endpoints, status.leader_id, &auth).await;
    sims.abort_all();
    collector.abort();
    let ms = |q: f64| latency_us.value_at_quantile(q) as f64 / 1000.0;
    let report = Report {
        machine: machine(),
        executors: args.executors,
        backlog_tasks: args.tasks,
        placements_per_second: args.tasks as f64 / window,
        backlog_placed_seconds: window,
        latency_rate_per_second: args.rate,
        latency_tasks: count,
        submit_to_assigned_ms: LatencyMs {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            max: latency_us.max() as f64 / 1000.0,
        },
        leader_rss_bytes: leader_rss,
        executors_seen_down,
        executors_down_at_end,
    };
    match global.output {
        OutputFormat::Json => output::print_json(&report),
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
                "backlog",
                format!(
                    "{} tasks placed in {:.2}s",
                    report.backlog_tasks, report.backlog_placed_seconds
                ),
            ),
            ("placements/s", format!("{:.0}", report.placements_per_second)),
            (
                "submit-to-assigned",
                format!("{} tasks at {}/s", report.latency_tasks, report.latency_rate_per_second),
            ),
            (
                "  latency ms",
                format!(
                    "p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
                    report.submit_to_assigned_ms.p50,
                    report.submit_to_assigned_ms.p90,
                    report.submit_to_assigned_ms.p99,
                    report.submit_to_assigned_ms.max
                ),
            ),
            ("leader RSS", format!("{:.0} MiB", report.leader_rss_bytes as f64 / (1 << 20) as f64)),
            (
                "executors down",
                format!(
                    "{} times seen turning down during the run, {} down at the end",
                    report.executors_seen_down, report.executors_down_at_end
                ),
            ),
        ]),
    }
}

/// Simulated executors to start: how many, and how long each holds a task. Each offers a
/// 16-core, 32 GiB host, so the benchmarks' small tasks spread over the fleet.
pub struct Sims {
    pub count: u64,
    pub hold: Duration,
    /// The size of each output a workflow step declares.
    pub output_bytes: usize,
}

impl Sims {
    /// Joins `count` simulated executors to the cluster and runs them, each reporting assignments
    /// on `events`, and returns once all are up (progress on a bar); they run until the set is
    /// dropped or aborted.
    pub async fn start(
        self,
        client: &Client,
        endpoints: &[String],
        events: mpsc::UnboundedSender<SimEvent>,
    ) -> Result<JoinSet<Result<()>>> {
        let capacity = Resources {
            cpu_millis: 16_000,
            memory_bytes: 32 << 30,
            gpus: 0,
            custom: Default::default(),
        };
        let bar = ProgressBar::new(self.count).with_style(
            ProgressStyle::with_template("{msg} {bar:30} {pos}/{len}")
                .map_err(|e| anyhow!("{e}"))?,
        );
        let token =
            crate::cluster_cmd::create_join_token(client, Duration::from_secs(3600), "executor")
                .await?
                .token;
        bar.set_message("joining simulated executors");
        let mut joins: JoinSet<Result<colony_executor::Credentials>> = JoinSet::new();
        let mut credentials: Vec<colony_executor::Credentials> = Vec::new();
        for i in 0..self.count {
            if joins.len() >= JOINS_IN_FLIGHT {
                let joined = joins.join_next().await.context("no join in flight")?;
                credentials.push(joined.context("join task")??);
                bar.inc(1);
            }
            let (endpoints, token) = (endpoints.to_vec(), token.clone());
            joins.spawn(async move { sim::join(&endpoints, &token, &format!("sim-{i}")).await });
        }
        while let Some(joined) = joins.join_next().await {
            credentials.push(joined.context("join task")??);
            bar.inc(1);
        }
        let mut sims = JoinSet::new();
        let mut endpoint = None;
        for (i, creds) in credentials.into_iter().enumerate() {
            if i % SIMS_PER_ENDPOINT == 0 {
                endpoint =
                    Some(colony_quic::client_endpoint().context("cannot open a QUIC endpoint")?);
            }
            let endpoint = endpoint.clone().context("an endpoint exists")?;
            sims.spawn(SimExecutor::run(
                endpoint,
                endpoints.to_vec(),
                creds,
                capacity.clone(),
                Default::default(),
                sim::fixed(self.hold, self.output_bytes),
                events.clone(),
            ));
        }
        bar.set_message("waiting for executors to be up");
        bar.set_position(0);
        wait_for_sims_up(client, &mut sims, self.count, &bar).await?;
        bar.finish_and_clear();
        Ok(sims)
    }
}

/// Waits until `wanted` simulated executors are up, counting them on `bar`; fails as soon as one
/// of `sims` stops.
pub async fn wait_for_sims_up(
    client: &Client,
    sims: &mut JoinSet<Result<()>>,
    wanted: u64,
    bar: &ProgressBar,
) -> Result<()> {
    loop {
        let executors = client
            .call("list executors", |mut c| async move {
                c.list_executors(pb::ListExecutorsRequest::default()).await
            })
            .await?;
        let up = executors
            .executors
            .iter()
            .filter(|e| e.state == "up" && e.name.starts_with("sim-"))
            .count() as u64;
        bar.set_position(up);
        if up >= wanted {
            return Ok(());
        }
        if let Some(Ok(Err(e))) = sims.try_join_next() {
            bail!("a simulated executor stopped: {e:#}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Counts, until aborted, the times a simulated executor turns down (none fails in this
/// benchmark). A poll can miss one that was down for less than `DOWN_POLL` and came back; the
/// servers' logs (`executor declared down`) have every one.
fn watch_down(client: Client) -> (tokio::task::JoinHandle<()>, Arc<std::sync::atomic::AtomicU64>) {
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = seen.clone();
    let task = tokio::spawn(async move {
        let mut down: std::collections::HashSet<u64> = Default::default();
        loop {
            if let Ok(executors) = list_sims(&client).await {
                let now: std::collections::HashSet<u64> =
                    executors.iter().filter(|e| e.state == "down").map(|e| e.id).collect();
                let new = now.difference(&down).count() as u64;
                counter.fetch_add(new, std::sync::atomic::Ordering::Relaxed);
                down = now;
            }
            tokio::time::sleep(DOWN_POLL).await;
        }
    });
    (task, seen)
}

async fn sims_down(client: &Client) -> Result<u64> {
    Ok(list_sims(client).await?.iter().filter(|e| e.state == "down").count() as u64)
}

async fn list_sims(client: &Client) -> Result<Vec<pb::Executor>> {
    let executors = client
        .call("list executors", |mut c| async move {
            c.list_executors(pb::ListExecutorsRequest::default()).await
        })
        .await?;
    Ok(executors.executors.into_iter().filter(|e| e.name.starts_with("sim-")).collect())
}

/// Submits `count` tasks from many concurrent clients; returns their ids.
async fn submit_many(
    channels: &[AdminClient<colony_client::Channel>],
    count: u64,
    make: impl Fn(u64) -> pb::TaskSpec,
    bar: &ProgressBar,
) -> Result<Vec<TaskId>> {
    let specs: Vec<pb::TaskSpec> = (0..count).map(make).collect();
    let queue = Arc::new(Mutex::new(specs));
    let mut workers = JoinSet::new();
    for w in 0..SUBMITTERS {
        let (queue, mut channel, bar) =
            (queue.clone(), channels[w % channels.len()].clone(), bar.clone());
        workers.spawn(async move {
            let mut ids = Vec::new();
            loop {
                let Some(spec) = queue.lock().await.pop() else {
                    return Ok::<_, anyhow::Error>(ids);
                };
                let request = pb::SubmitTaskRequest { spec: Some(spec) };
                let task = channel
                    .submit_task(request)
                    .await
                    .map_err(|s| anyhow!("submit: {}", s.message()))?
                    .into_inner()
                    .task;
                ids.push(TaskId(task.context("no task in the answer")?.id));
                bar.inc(1);
            }
        });
    }
    let mut ids = Vec::new();
    while let Some(done) = workers.join_next().await {
        ids.extend(done.context("submitter")??);
    }
    Ok(ids)
}

/// The leader's resident memory, asked of the leader itself.
async fn leader_rss(endpoints: &[String], leader: Option<u64>, auth: &colony_client::Auth) -> u64 {
    for endpoint in endpoints {
        let Ok(channel) = lazy_channel(endpoint, &ClientConfig::new(Duration::from_secs(2)), auth)
        else {
            continue;
        };
        if let Ok(Ok(status)) = tokio::time::timeout(
            Duration::from_secs(2),
            AdminClient::new(channel).cluster_status(pb::ClusterStatusRequest {}),
        )
        .await
        {
            let status = status.into_inner();
            if Some(status.node_id) == leader {
                return status.rss_bytes;
            }
        }
    }
    0
}
