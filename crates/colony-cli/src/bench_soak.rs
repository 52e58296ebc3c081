//! `colony bench soak`: does a cluster under steady load stay the same size? It starts its own
//! cluster of real servers (this executable) with a short `--task-retention`, connects simulated
//! executors that finish every task, submits at a fixed rate for a long time, and every
//! `--interval` prints submissions/s, live and kept finished tasks, and each server's resident
//! memory and data directory size. The samples are plotted into a PNG. The verdict compares the
//! last third of the run with the sample a third of the way in (±10%, sample by sample), and the
//! last third's peaks with the middle third's (a log that grows until each snapshot purges it is
//! a sawtooth: bounded, yet far from any one sample).

use crate::bench::{machine, Live};
use crate::bench_schedule::Sims;
use crate::dev::{self, Server};
use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;
use colony_client::{lazy_channel, Auth, Client, ClientConfig};
use colony_core::TaskState;
use colony_proto::pb;
use colony_proto::pb::admin_client::AdminClient;
use indicatif::{ProgressBar, ProgressFinish};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Connections submitting, spread over the servers.
const CONNECTIONS: u64 = 64;
/// Submitters sharing those connections: enough that the open-loop schedule holds through a
/// stall of a quarter of a second at 2,000/s, so the rate (and with it the state retention
/// keeps) does not dip and burst with the latency.
const SUBMITTERS: u64 = 512;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A sample within this fraction of the reference counts as steady.
const STEADY_BAND: f64 = 0.10;
/// The font the plot's text is drawn with (Debian's fonts-dejavu-core; cluster/setup.sh installs it).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

#[derive(Debug, Args)]
pub struct SoakBenchArgs {
    /// Submissions per second, open loop.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// How long the load runs.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How often a sample is taken (and printed).
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// The servers' --task-retention: short, so that retention removes tasks during the run.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    task_retention: Duration,
    /// The servers' --snapshot-logs. The soak shortens retention from days to minutes, so the
    /// state it keeps is small beside the log the default interval (20,000 entries, about 100 MiB
    /// at the soak's rate) lets grow between snapshots; this interval (about 25 s at 2,000
    /// submissions/s) keeps their proportion that of a real cluster, where the kept state dwarfs
    /// the log. A much shorter one spends the CPU on snapshots.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_logs: u64,
    /// Simulated executors, each offering 16 CPUs and 32 GiB (160 of the soak's tasks).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
    executors: u64,
    /// How long a simulated executor holds a task before it reports success.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// The PNG the samples are plotted into.
    #[arg(long, default_value = "colony-soak.png")]
    plot: PathBuf,
    /// The first server's port; the others follow, metrics ports 1000 above.
    #[arg(long, default_value_t = 17801)]
    base_port: u16,
    /// A flag for every server (repeatable), e.g. `--server-arg=--finished-tasks-max=100000`;
    /// not one the soak sets itself (--task-retention, --snapshot-logs, --audit-file-max,
    /// --audit-files-kept).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

/// One server at one sample.
#[derive(Debug, Clone, Serialize)]
struct ServerSample {
    id: u64,
    rss_bytes: u64,
    data_dir_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Sample {
    /// Seconds since the load started.
    at_s: f64,
    submitted_per_s: f64,
    errors: u64,
    live_tasks: u64,
    finished_tasks: u64,
    servers: Vec<ServerSample>,
}

/// How far the last third of the run strayed from the reference sample, per server.
#[derive(Debug, Serialize)]
struct Drift {
    id: u64,
    rss_max_pct: f64,
    data_dir_max_pct: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: crate::bench::Machine,
    rate_target: f64,
    task_retention_s: f64,
    samples: Vec<Sample>,
    /// The sample the last third is compared with (a third of the way in).
    reference_s: f64,
    drift: Vec<Drift>,
    steady: bool,
    /// The last third's highest values against the middle third's, per server.
    peaks: Vec<PeakChange>,
    /// No server's peak RSS or data directory grew by more than 10% from the middle third to
    /// the last: a sawtooth (a log purged after each snapshot, the audit trail rotated) passes
    /// this and may fail the pointwise comparison.
    bounded: bool,
    /// Where the plot was written (none if it could not be drawn).
    plot: Option<PathBuf>,
}

/// How a server's highest values in the last third compare with the middle third's, in percent
/// (negative: lower).
#[derive(Debug, Serialize)]
struct PeakChange {
    id: u64,
    rss_pct: f64,
    data_dir_pct: f64,
}

pub async fn run(args: SoakBenchArgs, global: &GlobalArgs) -> Result<()> {
    check_args(&args)?;
    let dir = tempfile::Builder::new().prefix("colony-soak-").tempdir()?;
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut servers = dev::plan(dir.path(), args.base_port, 3)?;
    let spinner = ProgressBar::new_spinner().with_finish(ProgressFinish::AndClear);
    spinner.enable_steady_tick(Duration::from_millis(100));
    let deadline = Instant::now() + Duration::from_secs(60);
    // The audit trail is bounded too (by rotation): a small bound lets it reach it early, and
    // small files keep each rotation's step small beside the rest of the data directory.
    let mut server_args = vec![
        format!("--task-retention={}", humantime::format_duration(args.task_retention)),
        format!("--snapshot-logs={}", args.snapshot_logs),
        "--audit-file-max=4Mi".to_owned(),
        "--audit-files-kept=2".to_owned(),
    ];
    server_args.extend(args.server_args.iter().cloned());
    let token_file = dir.path().join("token");
    let auth = dev::form_cluster(&mut servers, &exe, &server_args, &token_file, deadline, &spinner)
        .await?;
    let endpoints: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    dev::wait_until(&mut servers, &endpoints, &auth, deadline, &spinner, |s| {
        let voters = s.members.iter().filter(|m| m.role == "voter").count();
        (voters != 3).then(|| format!("{voters} of 3 servers are voters"))
    })
    .await?;
    drop(spinner);
    let result = soak(&args, &mut servers, &auth, global.output).await;
    // The figures stand whether or not the cluster stops cleanly; a server that does not is
    // reported after them.
    let stopped = dev::stop(&mut servers).await;
    let report = result?;
    match global.output {
        OutputFormat::Json => output::print_json(&report),
        OutputFormat::Table => print_summary(&report),
    }?;
    stopped.context("stopping the benchmark's cluster")
}

fn check_args(args: &SoakBenchArgs) -> Result<()> {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    if !(args.rate.is_finite() && (0.01..=1e6).contains(&args.rate)) {
        bail!("--rate must be a number of submissions per second from 0.01 to 1,000,000");
    }
    if !(Duration::from_secs(1)..=DAY).contains(&args.interval) {
        bail!("--interval must be from 1s to 1 day");
    }
    if args.duration > 7 * DAY {
        bail!("--duration must be at most 7 days");
    }
    if args.duration < args.interval * 3 {
        bail!("--duration must be at least three intervals: the last third is compared with the middle one");
    }
    if args.task_retention < Duration::from_secs(1) {
        bail!("--task-retention must be at least 1s");
    }
    if args.duration < args.task_retention * 3 {
        bail!(
            "--duration must be at least three times --task-retention, or the reference sample (a third of the way in) comes before retention removed anything"
        );
    }
    if !Path::new(FONT).exists() {
        bail!("the plot needs the font {FONT}: install fonts-dejavu-core (cluster/setup.sh does)");
    }
    Ok(())
}

async fn soak(
    args: &SoakBenchArgs,
    servers: &mut [Server],
    auth: &Auth,
    output: OutputFormat,
) -> Result<Report> {
    let endpoints: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let client = Client::new(&endpoints, REQUEST_TIMEOUT, auth)?;
    // The simulated executors' assignment events are not needed here.
    let (events, _) = tokio::sync::mpsc::unbounded_channel();
    let sims = Sims { count: args.executors, hold: args.hold, output_bytes: 0 };
    let mut sims = sims.start(&client, &endpoints, events).await?;

    let counts = Arc::new(Live::default());
    let started = Instant::now();
    let mut submitters = JoinSet::new();
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    for i in 0..CONNECTIONS {
        let addr = &endpoints[(i % endpoints.len() as u64) as usize];
        let channel = lazy_channel(addr, &ClientConfig::new(REQUEST_TIMEOUT), auth)?;
        for _ in 0..SUBMITTERS / CONNECTIONS {
            let client = AdminClient::new(channel.clone());
            submitters.spawn(submit(client, started, interval, counts.clone()));
        }
    }
    let watch = Watch { counts: &counts, started, sims: &mut sims, output };
    let result = sample_until_done(args, servers, &client, auth, watch).await;
    submitters.abort_all();
    sims.abort_all();
    let samples = result?;

    let third = samples.len() / 3;
    let reference = &samples[third.saturating_sub(1)];
    let drift = drift(reference, &samples[samples.len() - third..]);
    let steady = drift
        .iter()
        .all(|d| d.rss_max_pct <= STEADY_BAND * 100.0 && d.data_dir_max_pct <= STEADY_BAND * 100.0);
    let peaks = peaks(
        &samples[samples.len() - 2 * third..samples.len() - third],
        &samples[samples.len() - third..],
    );
    let bounded = peaks
        .iter()
        .all(|p| p.rss_pct <= STEADY_BAND * 100.0 && p.data_dir_pct <= STEADY_BAND * 100.0);
    // A plot that cannot be drawn loses the picture, not the figures.
    let plot = match self::plot(&samples, &args.plot) {
        Ok(()) => Some(args.plot.clone()),
        Err(e) => {
            eprintln!("warning: no plot: {e:#}");
            None
        }
    };
    Ok(Report {
        machine: machine(),
        rate_target: args.rate,
        task_retention_s: args.task_retention.as_secs_f64(),
        reference_s: reference.at_s,
        samples,
        drift,
        steady,
        peaks,
        bounded,
        plot,
    })
}

/// Submits on the shared schedule: each submission claims the next slot and waits for its time.
/// Each submitter waits for its answer, so the schedule holds while answers take less than
/// `SUBMITTERS / rate` (256 ms at 2,000/s); a longer stall delays it, and it catches up after.
async fn submit(
    mut client: AdminClient<colony_client::Channel>,
    started: Instant,
    interval: Duration,
    counts: Arc<Live>,
) {
    let spec = pb::TaskSpec { namespace: "soak".to_owned(), ..crate::bench::small_task("soak") };
    loop {
        tokio::time::sleep_until(counts.claim_slot(started, interval)).await;
        let request = pb::SubmitTaskRequest { spec: Some(spec.clone()) };
        match client.submit_task(request).await {
            Ok(_) => counts.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => counts.errors.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// What the sampler watches besides the servers.
struct Watch<'a> {
    counts: &'a Live,
    started: Instant,
    sims: &'a mut JoinSet<Result<()>>,
    /// Rows go to stdout for people, to stderr when stdout carries JSON.
    output: OutputFormat,
}

/// Takes a sample every interval until the duration is over, printing each as a table row.
async fn sample_until_done(
    args: &SoakBenchArgs,
    servers: &mut [Server],
    client: &Client,
    auth: &Auth,
    watch: Watch<'_>,
) -> Result<Vec<Sample>> {
    let Watch { counts, started, sims, output } = watch;
    let row = |line: String| match output {
        OutputFormat::Table => println!("{line}"),
        OutputFormat::Json => eprintln!("{line}"),
    };
    let rounds = (args.duration.as_secs_f64() / args.interval.as_secs_f64()).floor() as u32;
    let mut samples = Vec::new();
    let (mut last_ok, mut last_at) = (0, started);
    row(format!(
        "soak: {} submissions/s for {}, a sample every {}, finished tasks kept {}",
        args.rate,
        humantime::format_duration(args.duration),
        humantime::format_duration(args.interval),
        humantime::format_duration(args.task_retention),
    ));
    row(format!(
        "{:>7}  {:>9}  {:>7}  {:>9}  {:>9}  per server: RSS MiB / data dir MiB",
        "minute", "submit/s", "errors", "live", "finished"
    ));
    for round in 1..=rounds {
        tokio::time::sleep_until(started + args.interval * round).await;
        for server in servers.iter_mut() {
            server.check_running()?;
        }
        // They run until aborted: any that ended, however, ends the run.
        if let Some(ended) = sims.try_join_next() {
            bail!("a simulated executor stopped: {ended:?}");
        }
        let now = Instant::now();
        let ok = counts.ok.load(Ordering::Relaxed);
        let submitted_per_s = (ok - last_ok) as f64 / now.duration_since(last_at).as_secs_f64();
        (last_ok, last_at) = (ok, now);
        let status = status_of(client).await?;
        let (mut live, mut finished) = (0, 0);
        for (state, count) in &status.tasks_by_state {
            match state.parse::<TaskState>() {
                Ok(state) if state.is_finished() => finished += count,
                _ => live += count,
            }
        }
        let mut per_server = Vec::new();
        for server in servers.iter() {
            let own = Client::new(std::slice::from_ref(&server.addr), REQUEST_TIMEOUT, auth)?;
            let status = status_of(&own).await?;
            per_server.push(ServerSample {
                id: server.id,
                rss_bytes: status.rss_bytes,
                data_dir_bytes: dir_bytes(server.data_dir())?,
            });
        }
        let sample = Sample {
            at_s: now.duration_since(started).as_secs_f64(),
            submitted_per_s,
            errors: counts.errors.load(Ordering::Relaxed),
            live_tasks: live,
            finished_tasks: finished,
            servers: per_server,
        };
        let servers_text: Vec<String> = sample
            .servers
            .iter()
            .map(|s| format!("{}: {} / {}", s.id, mib(s.rss_bytes), mib(s.data_dir_bytes)))
            .collect();
        row(format!(
            "{:>7.1}  {:>9.0}  {:>7}  {:>9}  {:>9}  {}",
            sample.at_s / 60.0,
            sample.submitted_per_s,
            sample.errors,
            sample.live_tasks,
            sample.finished_tasks,
            servers_text.join("   ")
        ));
        samples.push(sample);
    }
    Ok(samples)
}

/// `cluster status`, asked up to three times a second apart: one slow answer (an election, a
/// snapshot being built) must not end a long run.
async fn status_of(client: &Client) -> Result<pb::ClusterStatusResponse> {
    let mut attempt = 1;
    loop {
        match crate::cluster_cmd::cluster_status(client).await {
            Ok(status) => return Ok(status),
            Err(e) if attempt >= 3 => return Err(e.context("cluster status, asked 3 times")),
            Err(_) => attempt += 1,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / (1 << 20) as f64)
}

/// The bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // RocksDB removes files as it compacts: one gone between listing and reading is no error.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(anyhow!("cannot list {}: {e}", dir.display())),
    };
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let Ok(meta) = entry.metadata() else { continue };
        total += match meta.is_dir() {
            true => dir_bytes(&entry.path())?,
            false => meta.len(),
        };
    }
    Ok(total)
}

/// Per server, the largest departure (in percent) of `later` samples from `reference`.
fn drift(reference: &Sample, later: &[Sample]) -> Vec<Drift> {
    let pct = |value: u64, base: u64| match base {
        0 => 0.0,
        _ => (value as f64 / base as f64 - 1.0).abs() * 100.0,
    };
    reference
        .servers
        .iter()
        .map(|base| {
            let (mut rss, mut disk) = (0.0f64, 0.0f64);
            for sample in later {
                if let Some(s) = sample.servers.iter().find(|s| s.id == base.id) {
                    rss = rss.max(pct(s.rss_bytes, base.rss_bytes));
                    disk = disk.max(pct(s.data_dir_bytes, base.data_dir_bytes));
                }
            }
            Drift { id: base.id, rss_max_pct: rss, data_dir_max_pct: disk }
        })
        .collect()
}

/// Per server, the change (in percent) from the highest value in `middle` to the highest in
/// `last`.
fn peaks(middle: &[Sample], last: &[Sample]) -> Vec<PeakChange> {
    let peak = |samples: &[Sample], id: u64, f: fn(&ServerSample) -> u64| {
        samples
            .iter()
            .filter_map(|s| s.servers.iter().find(|v| v.id == id).map(f))
            .max()
            .unwrap_or(0)
    };
    let change = |to: u64, from: u64| match from {
        0 => 0.0,
        _ => (to as f64 / from as f64 - 1.0) * 100.0,
    };
    let ids: Vec<u64> =
        middle.first().map_or(Vec::new(), |s| s.servers.iter().map(|v| v.id).collect());
    ids.into_iter()
        .map(|id| PeakChange {
            id,
            rss_pct: change(peak(last, id, |v| v.rss_bytes), peak(middle, id, |v| v.rss_bytes)),
            data_dir_pct: change(
                peak(last, id, |v| v.data_dir_bytes),
                peak(middle, id, |v| v.data_dir_bytes),
            ),
        })
        .collect()
}

fn print_summary(report: &Report) -> Result<()> {
    let mut table = output::table([
        "SERVER",
        "RSS DRIFT",
        "DATA DIR DRIFT",
        "RSS PEAK CHANGE",
        "DATA DIR PEAK CHANGE",
    ]);
    for (d, p) in report.drift.iter().zip(&report.peaks) {
        let pct = |v: f64| format!("{v:.1}%");
        let signed = |v: f64| format!("{v:+.1}%");
        table.add_row(vec![
            d.id.to_string(),
            pct(d.rss_max_pct),
            pct(d.data_dir_max_pct),
            signed(p.rss_pct),
            signed(p.data_dir_pct),
        ]);
    }
    println!();
    output::print_table(table)?;
    let steady = match report.steady {
        true => "yes: every server's RSS and data directory stayed within ±10% of the reference",
        false => "no: a server's RSS or data directory moved more than 10% from the reference",
    };
    let bounded = match report.bounded {
        true => "yes: no server's peak grew more than 10% from the middle third to the last",
        false => "no: a server's peak RSS or data directory grew more than 10%",
    };
    output::print_fields(&[
        ("machine", format!("{} ({} cores)", report.machine.cpu_model, report.machine.cores)),
        ("compared", format!("the last third with the sample at {:.0} s", report.reference_s)),
        ("steady", steady.to_owned()),
        ("bounded", bounded.to_owned()),
        (
            "plot",
            report
                .plot
                .as_ref()
                .map_or("none (see the warning above)".to_owned(), |p| p.display().to_string()),
        ),
    ])
}

/// A named line of a plot: one value per sample.
type Line = (String, Vec<f64>);

/// Four panels over time: submissions/s, live and finished tasks, each server's RSS, each
/// server's data directory.
fn plot(samples: &[Sample], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read(FONT).with_context(|| {
        format!("the plot needs the font {FONT}: install fonts-dejavu-core (cluster/setup.sh does)")
    })?;
    // plotters keeps registered fonts for the life of the process.
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a font plotters can read"))?;
    let root = BitMapBackend::new(path, (1200, 1400)).into_drawing_area();
    let draw_error = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| draw_error(&e))?;
    let panels = root.split_evenly((4, 1));
    let minutes: Vec<f64> = samples.iter().map(|s| s.at_s / 60.0).collect();
    let x_max = minutes.last().copied().unwrap_or(1.0).max(1.0);
    let server_ids: Vec<u64> =
        samples.first().map_or(Vec::new(), |s| s.servers.iter().map(|s| s.id).collect());
    let per_server = |f: fn(&ServerSample) -> u64| -> Vec<Line> {
        server_ids
            .iter()
            .map(|id| {
                let values = samples
                    .iter()
                    .map(|s| {
                        s.servers
                            .iter()
                            .find(|v| v.id == *id)
                            .map_or(0.0, |v| f(v) as f64 / (1 << 20) as f64)
                    })
                    .collect();
                (format!("server {id}"), values)
            })
            .collect()
    };
    let series: [(&str, Vec<Line>); 4] = [
        (
            "submissions/s",
            vec![("accepted".to_owned(), samples.iter().map(|s| s.submitted_per_s).collect())],
        ),
        (
            "tasks",
            vec![
                ("live".to_owned(), samples.iter().map(|s| s.live_tasks as f64).collect()),
                (
                    "finished, kept".to_owned(),
                    samples.iter().map(|s| s.finished_tasks as f64).collect(),
                ),
            ],
        ),
        ("resident memory (MiB)", per_server(|s| s.rss_bytes)),
        ("data directory (MiB)", per_server(|s| s.data_dir_bytes)),
    ];
    for (panel, (title, lines)) in panels.iter().zip(series) {
        let y_max = lines.iter().flat_map(|(_, v)| v.iter().copied()).fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(|e| draw_error(&e))?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| draw_error(&e))?;
        for (i, (name, values)) in lines.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points = minutes.iter().copied().zip(values);
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| draw_error(&e))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| draw_error(&e))?;
    }
    root.present().map_err(|e| draw_error(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_s: f64, rss: u64, disk: u64) -> Sample {
        Sample {
            at_s,
            submitted_per_s: 2000.0,
            errors: 0,
            live_tasks: 400,
            finished_tasks: 240_000,
            servers: vec![ServerSample { id: 1, rss_bytes: rss, data_dir_bytes: disk }],
        }
    }

    #[test]
    fn drift_is_the_largest_departure_from_the_reference() {
        let reference = sample(600.0, 100 << 20, 50 << 20);
        let later = [sample(1260.0, 105 << 20, 50 << 20), sample(1320.0, 92 << 20, 56 << 20)];
        let drift = drift(&reference, &later);
        assert_eq!(drift.len(), 1);
        assert!((drift[0].rss_max_pct - 8.0).abs() < 1e-9, "{}", drift[0].rss_max_pct);
        assert!((drift[0].data_dir_max_pct - 12.0).abs() < 1e-9, "{}", drift[0].data_dir_max_pct);
    }

    #[test]
    fn peaks_compare_the_highest_values_of_two_thirds() {
        let middle = [sample(600.0, 100 << 20, 40 << 20), sample(660.0, 98 << 20, 80 << 20)];
        let last = [sample(1200.0, 95 << 20, 84 << 20), sample(1260.0, 97 << 20, 41 << 20)];
        let peaks = peaks(&middle, &last);
        assert_eq!(peaks.len(), 1);
        assert!((peaks[0].rss_pct + 3.0).abs() < 1e-9, "{}", peaks[0].rss_pct);
        assert!((peaks[0].data_dir_pct - 5.0).abs() < 1e-9, "{}", peaks[0].data_dir_pct);
    }

    #[test]
    fn the_plot_is_a_png_of_the_samples() -> Result<()> {
        if !Path::new(FONT).exists() {
            bail!("{FONT} is missing: cluster/setup.sh installs fonts-dejavu-core");
        }
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("soak.png");
        let samples: Vec<Sample> =
            (1..=6).map(|m| sample(m as f64 * 60.0, (100 + m) << 20, 50 << 20)).collect();
        plot(&samples, &path)?;
        let bytes = std::fs::read(&path)?;
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
        // The IHDR chunk: width and height, big-endian, after the signature and chunk header.
        let width = u32::from_be_bytes(bytes[16..20].try_into()?);
        let height = u32::from_be_bytes(bytes[20..24].try_into()?);
        assert_eq!((width, height), (1200, 1400));
        Ok(())
    }

    #[test]
    fn bad_arguments_are_refused() {
        #[derive(Debug, clap::Parser)]
        struct Harness {
            #[command(flatten)]
            args: SoakBenchArgs,
        }
        let parse = |argv: &[&str]| {
            <Harness as clap::Parser>::try_parse_from(
                std::iter::once("soak").chain(argv.iter().copied()),
            )
            .map_err(anyhow::Error::from)
            .and_then(|h| check_args(&h.args).map(|()| h.args))
        };
        assert!(
            parse(&[]).is_ok_and(|a| a.rate == 2000.0 && a.duration == Duration::from_secs(1800))
        );
        for bad in [
            &["--rate", "0"][..],
            &["--rate", "NaN"],
            &["--interval", "10ms"],
            &["--duration", "2m", "--interval", "1m"],
            &["--task-retention", "0s"],
            &["--rate", "0.001"],
            &["--interval", "2days"],
            &["--duration", "8days"],
            // The reference sample would come before retention removed anything.
            &["--duration", "5m"],
            &["--executors", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
