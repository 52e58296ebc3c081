//! `colony bench`: load generators that print throughput and latency percentiles.
//!
//! `bench submit` runs N concurrent clients over `--connections` HTTP/2 connections per endpoint
//! (one by default; etcdctl's `check perf` gives each of its clients its own). Closed loop
//! (the default), each client sends its next submission when the last is answered. Open loop
//! (`--rate`), submissions are due on a global schedule and each client claims the next slot;
//! latency is measured from the slot's due time, not from when a client got round to it, so a
//! slow server shows up as latency instead of hiding in fewer samples (coordinated omission).

use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Subcommand};
use colony_client::Channel;
use colony_client::{lazy_channel, status_message, ClientConfig};
use colony_core::{parse_cpu_millis, parse_memory_bytes, Limits, Resources, RunSpec, TaskSpec};
use colony_proto::pb;
use colony_proto::pb::admin_client::AdminClient;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressFinish, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A submission not answered within this long counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the final per-server status calls may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Latencies above this (in microseconds) are recorded as this.
const LATENCY_MAX_US: u64 = 3_600_000_000;
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Submit tasks for a while and report throughput and latency.
    Submit(SubmitBenchArgs),
    /// Connect simulated executors over QUIC and measure placements/s and submit-to-assigned latency.
    Schedule(crate::bench_schedule::ScheduleBenchArgs),
    /// The learner's kernels on this machine's device: GEMM GFLOP/s and a training step's time.
    Learn(crate::bench_learn::LearnBenchArgs),
    /// Does the learner's model help? The same workload with no model and then with one.
    Placement(crate::bench_placement::PlacementBenchArgs),
    /// How long writes stop when the leader dies (kill -9) or is stopped (SIGTERM): its own
    /// cluster, a leader stopped per trial.
    Failover(crate::bench_failover::FailoverBenchArgs),
    /// A long run at a steady rate on its own cluster: do memory and disk stay flat while
    /// retention removes finished tasks? Prints a sample a minute and plots them (PNG).
    Soak(crate::bench_soak::SoakBenchArgs),
    /// Simulated executors run chained workflows: workflows/s and the step hand-off latency
    /// (a step's end to the next step's assignment).
    Workflow(crate::bench_workflow::WorkflowBenchArgs),
    /// Durable messages: publishers in a closed loop (msgs/s, latency), then a drain with acks;
    /// on Colony or, with `--target nats`, on NATS JetStream for comparison.
    Messages(crate::bench_messages::MessagesBenchArgs),
}

#[derive(Debug, Args)]
pub struct SubmitBenchArgs {
    /// Concurrent clients, spread round-robin over the endpoints.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    clients: u64,
    /// HTTP/2 connections to each endpoint; the clients are spread over them round-robin. One
    /// connection is served by one task on the server, so this is the parallelism a server sees.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    connections: u64,
    /// How long to measure, after the warmup.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Open loop: target submissions per second across all clients. Default: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Submissions in this first stretch are sent but not measured.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// CPU each submitted task asks for.
    #[arg(long, default_value = "100m", allow_hyphen_values = true)]
    cpu: String,
    /// Memory each submitted task asks for.
    #[arg(long, default_value = "64Mi", allow_hyphen_values = true)]
    memory: String,
}

/// The run's clock: when it started, when measuring starts and when sending stops.
#[derive(Clone, Copy)]
struct Schedule {
    start: Instant,
    measure_from: Instant,
    end: Instant,
    /// Open loop: the time between two due submissions.
    interval: Option<Duration>,
}

/// Counters read while the clients run (the progress bar, the soak's samples).
#[derive(Default)]
pub(crate) struct Live {
    pub(crate) ok: AtomicU64,
    pub(crate) errors: AtomicU64,
    /// Open loop: the next slot to claim.
    next_slot: AtomicU64,
}

impl Live {
    /// Open loop: claims the next slot of a schedule that began at `start` with one submission
    /// every `interval`, and says when it is due.
    pub(crate) fn claim_slot(&self, start: Instant, interval: Duration) -> Instant {
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
        start + interval.mul_f64(slot as f64)
    }
}

/// What one client measured.
struct ClientResult {
    latency_us: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub hostname: String,
}

#[derive(Debug, Serialize)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct ServerReport {
    endpoint: String,
    node_id: Option<u64>,
    state: Option<String>,
    rss_bytes: Option<u64>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    endpoints: Vec<String>,
    clients: u64,
    connections_per_endpoint: u64,
    /// Open-loop target (submissions/s); null for closed loop.
    rate_target: Option<f64>,
    warmup_s: f64,
    duration_s: f64,
    submitted_ok: u64,
    errors: u64,
    errors_by_code: BTreeMap<String, u64>,
    tasks_per_second: f64,
    /// Milliseconds; null when nothing succeeded.
    latency_ms: Option<Latency>,
    servers: Vec<ServerReport>,
}

pub async fn run(command: BenchCommand, global: &GlobalArgs) -> Result<()> {
    match command {
        BenchCommand::Submit(args) => bench_submit(args, global).await,
        BenchCommand::Schedule(args) => crate::bench_schedule::run(args, global).await,
        BenchCommand::Learn(args) => crate::bench_learn::run(args, global).await,
        BenchCommand::Placement(args) => crate::bench_placement::run(args, global).await,
        BenchCommand::Failover(args) => crate::bench_failover::run(args, global).await,
        BenchCommand::Soak(args) => crate::bench_soak::run(args, global).await,
        BenchCommand::Workflow(args) => crate::bench_workflow::run(args, global).await,
        BenchCommand::Messages(args) => crate::bench_messages::run(args, global).await,
    }
}

fn bench_spec(args: &SubmitBenchArgs) -> Result<TaskSpec> {
    let spec = TaskSpec {
        name: "bench".to_owned(),
        namespace: "bench".to_owned(),
        labels: BTreeMap::new(),
        capabilities: Default::default(),
        resources: Resources {
            cpu_millis: parse_cpu_millis(&args.cpu).context("invalid --cpu")?,
            memory_bytes: parse_memory_bytes(&args.memory).context("invalid --memory")?,
            gpus: 0,
            custom: BTreeMap::new(),
        },
        priority: 0,
        deadline_unix_ms: None,
        timeout_ms: None,
        max_retries: 0,
        dependencies: Default::default(),
        run: RunSpec::Process {
            program: "/bin/true".to_owned(),
            args: Vec::new(),
            env: BTreeMap::new(),
        },
        idempotency_key: None,
        placement: Default::default(),
        memory_auto: false,
    };
    spec.validate(&Limits::default()).context("invalid task")?;
    Ok(spec)
}

fn check_args(args: &SubmitBenchArgs) -> Result<()> {
    if args.duration.is_zero() {
        bail!("--duration must be greater than zero");
    }
    if let Some(rate) = args.rate {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("--rate must be a positive number of submissions per second");
        }
        // One nanosecond is the finest schedule a Duration can express.
        if rate > 1e9 {
            bail!("--rate {rate} is more than one submission per nanosecond");
        }
    }
    Ok(())
}

async fn bench_submit(args: SubmitBenchArgs, global: &GlobalArgs) -> Result<()> {
    check_args(&args)?;
    if global.endpoint.is_empty() {
        bail!("no endpoint given (--endpoint or COLONY_ENDPOINT)");
    }
    let template = pb::TaskSpec::from(&bench_spec(&args)?);
    let auth = global.auth()?;
    let config = ClientConfig::new(global.timeout);
    // Round after round over the endpoints, so consecutive clients land on different endpoints
    // and the first round is one connection per endpoint (for the servers' reports).
    let mut connections: Vec<Channel> = Vec::new();
    for _ in 0..args.connections {
        for addr in &global.endpoint {
            connections.push(lazy_channel(addr, &config, &auth)?);
        }
    }
    let histogram = Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_US, 3)
        .map_err(|e| anyhow!("cannot make a histogram: {e}"))?;
    // Idempotency keys as the CLI sends them, unique to this run, so the server does the same work
    // for a benchmark submission as for an operator's.
    let run_id = rand::random::<u32>();

    let start = Instant::now();
    let measure_from = start + args.warmup;
    let schedule = Schedule {
        start,
        measure_from,
        end: measure_from + args.duration,
        interval: args.rate.map(|rate| Duration::from_secs_f64(1.0 / rate)),
    };
    let live = Arc::new(Live::default());
    let mut clients = JoinSet::new();
    for index in 0..args.clients {
        let channel = connections[usize::try_from(index).unwrap_or(0) % connections.len()].clone();
        let client = AdminClient::new(channel);
        let template = template.clone();
        let live = Arc::clone(&live);
        let histogram = histogram.clone();
        let key_prefix = format!("bench-{run_id:08x}-{index}-");
        clients.spawn(run_client(client, template, key_prefix, schedule, live, histogram));
    }

    let bar = progress_bar(&args)?;
    let mut results = Vec::new();
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    let mut last = (Instant::now(), 0u64);
    while !clients.is_empty() {
        tokio::select! {
            joined = clients.join_next() => {
                if let Some(joined) = joined {
                    results.push(joined.context("a benchmark client failed")?);
                }
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                let ok = live.ok.load(Ordering::Relaxed);
                let rate = (ok - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
                last = (now, ok);
                let phase = if now < schedule.measure_from { "warming up" } else if now < schedule.end { "measuring" } else { "draining" };
                bar.set_position(u64::try_from(now.duration_since(start).as_millis()).unwrap_or(u64::MAX));
                bar.set_message(format!("{phase}: {ok} ok, {} errors, {rate:.0}/s", live.errors.load(Ordering::Relaxed)));
            }
        }
    }
    bar.finish_and_clear();

    let mut latency_us = histogram;
    let mut submitted_ok = 0;
    let mut errors_by_code = BTreeMap::new();
    for result in results {
        latency_us.add(&result.latency_us).map_err(|e| anyhow!("cannot merge histograms: {e}"))?;
        submitted_ok += result.ok;
        for (code, count) in result.errors {
            *errors_by_code.entry(code).or_insert(0) += count;
        }
    }
    let ms = |us: u64| us as f64 / 1000.0;
    let report = Report {
        machine: machine(),
        endpoints: global.endpoint.clone(),
        clients: args.clients,
        connections_per_endpoint: args.connections,
        rate_target: args.rate,
        warmup_s: args.warmup.as_secs_f64(),
        duration_s: args.duration.as_secs_f64(),
        submitted_ok,
        errors: errors_by_code.values().sum(),
        errors_by_code,
        tasks_per_second: submitted_ok as f64 / args.duration.as_secs_f64(),
        latency_ms: (!latency_us.is_empty()).then(|| Latency {
            p50: ms(latency_us.value_at_quantile(0.50)),
            p90: ms(latency_us.value_at_quantile(0.90)),
            p99: ms(latency_us.value_at_quantile(0.99)),
            p999: ms(latency_us.value_at_quantile(0.999)),
            max: ms(latency_us.max()),
        }),
        servers: server_reports(&global.endpoint, &connections).await,
    };
    match global.output {
        OutputFormat::Table => print_report(&report)?,
        OutputFormat::Json => output::print_json(&report)?,
    }
    Ok(())
}

fn progress_bar(args: &SubmitBenchArgs) -> Result<ProgressBar> {
    let total_ms = u64::try_from((args.warmup + args.duration).as_millis()).unwrap_or(u64::MAX);
    let style = ProgressStyle::with_template("{spinner} [{bar:30}] {elapsed:>4} {msg}")
        .context("bad progress template")?
        .progress_chars("=> ");
    Ok(ProgressBar::new(total_ms).with_style(style).with_finish(ProgressFinish::AndClear))
}

/// One client: submits until the schedule ends, recording what it measured.
async fn run_client(
    mut client: AdminClient<Channel>,
    template: pb::TaskSpec,
    key_prefix: String,
    schedule: Schedule,
    live: Arc<Live>,
    mut latency_us: Histogram<u64>,
) -> ClientResult {
    let mut ok = 0;
    let mut errors = BTreeMap::new();
    for sequence in 0u64.. {
        // When this submission is due: now (closed loop) or its slot on the global schedule.
        let due = match schedule.interval {
            None => Instant::now(),
            Some(interval) => live.claim_slot(schedule.start, interval),
        };
        if due >= schedule.end {
            break;
        }
        tokio::time::sleep_until(due).await;
        let mut spec = template.clone();
        spec.idempotency_key = Some(format!("{key_prefix}{sequence}"));
        let outcome = tokio::time::timeout(
            REQUEST_TIMEOUT,
            client.submit_task(pb::SubmitTaskRequest { spec: Some(spec) }),
        )
        .await;
        let measured = due >= schedule.measure_from;
        match outcome {
            Ok(Ok(_)) => {
                live.ok.fetch_add(1, Ordering::Relaxed);
                if measured {
                    ok += 1;
                    let micros = u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
                    latency_us.saturating_record(micros.clamp(1, LATENCY_MAX_US));
                }
            }
            failed => {
                live.errors.fetch_add(1, Ordering::Relaxed);
                if measured {
                    let code = match failed {
                        Ok(Err(status)) => format!("{:?}", status.code()),
                        _ => "ClientTimeout".to_owned(),
                    };
                    *errors.entry(code).or_insert(0) += 1;
                }
            }
        }
    }
    ClientResult { latency_us, ok, errors }
}

/// Each server's own ClusterStatus, for its node id and memory after the run.
async fn server_reports(endpoints: &[String], channels: &[Channel]) -> Vec<ServerReport> {
    let mut reports = Vec::new();
    for (endpoint, channel) in endpoints.iter().zip(channels) {
        let mut client = AdminClient::new(channel.clone());
        let answer = tokio::time::timeout(
            STATUS_TIMEOUT,
            client.cluster_status(pb::ClusterStatusRequest {}),
        )
        .await;
        reports.push(match answer {
            Ok(Ok(status)) => {
                let status = status.into_inner();
                ServerReport {
                    endpoint: endpoint.clone(),
                    node_id: Some(status.node_id),
                    state: Some(status.state),
                    rss_bytes: Some(status.rss_bytes),
                    error: None,
                }
            }
            Ok(Err(status)) => ServerReport::failed(endpoint, status_message(&status)),
            Err(_) => ServerReport::failed(
                endpoint,
                format!("no answer within {}", humantime::format_duration(STATUS_TIMEOUT)),
            ),
        });
    }
    reports
}

impl ServerReport {
    fn failed(endpoint: &str, error: String) -> ServerReport {
        ServerReport {
            endpoint: endpoint.to_owned(),
            node_id: None,
            state: None,
            rss_bytes: None,
            error: Some(error),
        }
    }
}

/// A small task (100 millicores, 64 MiB, `/bin/true`) for the benchmarks that need many of them.
pub fn small_task(name: &str) -> pb::TaskSpec {
    pb::TaskSpec {
        name: name.to_owned(),
        resources: Some(pb::Resources {
            cpu_millis: 100,
            memory_bytes: 64 << 20,
            gpus: 0,
            custom: Default::default(),
        }),
        run: Some(pb::task_spec::Run::Process(pb::ProcessRun {
            program: "/bin/true".to_owned(),
            args: vec![],
            env: Default::default(),
        })),
        ..Default::default()
    }
}

/// The machine the benchmark ran on, so that numbers are never quoted without it.
pub fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| cpu_model(&info))
        .unwrap_or_else(|| "unknown".to_owned());
    Machine {
        cpu_model,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".to_owned()),
    }
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_owned())
    })
}

fn print_report(r: &Report) -> Result<()> {
    let mut fields = vec![
        (
            "machine",
            format!("{} ({} cores), {}", r.machine.cpu_model, r.machine.cores, r.machine.hostname),
        ),
        ("endpoints", r.endpoints.join(", ")),
        ("clients", r.clients.to_string()),
        ("connections", format!("{} per endpoint", r.connections_per_endpoint)),
        (
            "rate target",
            r.rate_target
                .map_or_else(|| "closed loop".to_owned(), |rate| format!("{rate}/s (open loop)")),
        ),
        ("duration", format!("{}s after {}s warmup", r.duration_s, r.warmup_s)),
        ("submitted ok", r.submitted_ok.to_string()),
    ];
    let errors = if r.errors_by_code.is_empty() {
        "0".to_owned()
    } else {
        let by_code: Vec<String> =
            r.errors_by_code.iter().map(|(code, n)| format!("{code} {n}")).collect();
        format!("{} ({})", r.errors, by_code.join(", "))
    };
    fields.push(("errors", errors));
    fields.push(("tasks/s", format!("{:.1}", r.tasks_per_second)));
    let latency = match &r.latency_ms {
        Some(l) => format!(
            "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            l.p50, l.p90, l.p99, l.p999, l.max
        ),
        None => "no successful submissions".to_owned(),
    };
    fields.push(("latency ms", latency));
    output::print_fields(&fields)?;
    output::out("")?;
    let mut table = output::table(["ENDPOINT", "NODE", "STATE", "RSS MiB"]);
    for s in &r.servers {
        let (node, state, rss) = match (&s.error, s.node_id, &s.state, s.rss_bytes) {
            (None, Some(node), Some(state), Some(rss)) => (
                node.to_string(),
                state.clone(),
                format!("{:.1}", rss as f64 / f64::from(1u32 << 20)),
            ),
            (error, ..) => ("-".to_owned(), error.clone().unwrap_or_default(), "-".to_owned()),
        };
        table.add_row(vec![s.endpoint.clone(), node, state, rss]);
    }
    output::print_table(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        args: SubmitBenchArgs,
    }

    fn parse(argv: &[&str]) -> Result<SubmitBenchArgs> {
        let harness =
            Harness::try_parse_from(std::iter::once("submit").chain(argv.iter().copied()))?;
        check_args(&harness.args)?;
        bench_spec(&harness.args)?;
        Ok(harness.args)
    }

    #[test]
    fn defaults() {
        let args = match parse(&[]) {
            Ok(args) => args,
            Err(e) => panic!("{e:#}"),
        };
        assert_eq!(args.clients, 64);
        assert_eq!(args.duration, Duration::from_secs(10));
        assert_eq!(args.warmup, Duration::from_secs(1));
        assert_eq!(args.rate, None);
        assert_eq!(args.connections, 1);
    }

    #[test]
    fn bad_arguments() {
        assert!(parse(&["--clients", "0"]).is_err());
        assert!(parse(&["--duration", "0s"]).is_err());
        assert!(parse(&["--connections", "0"]).is_err());
        assert!(parse(&["--connections", "10001"]).is_err());
        assert!(parse(&["--rate", "0"]).is_err());
        assert!(parse(&["--rate", "-5"]).is_err());
        assert!(parse(&["--rate", "NaN"]).is_err());
        assert!(parse(&["--cpu", "-1"]).is_err_and(|e| format!("{e:#}").contains("invalid --cpu")));
        assert!(parse(&["--memory", "12Q"])
            .is_err_and(|e| format!("{e:#}").contains("invalid --memory")));
    }

    #[test]
    fn cpu_model_from_proc_cpuinfo() {
        let info = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n";
        assert_eq!(cpu_model(info).as_deref(), Some("Intel(R) Xeon(R) CPU @ 2.20GHz"));
        assert_eq!(cpu_model("processor : 0\n"), None);
    }
}
