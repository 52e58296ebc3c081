//! `colony server`: runs one server node with its logging set up.

use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};
use colony_core::{parse_memory_bytes, Retention};
use colony_server::audit::AuditConfig;
use colony_server::ServerConfig;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Trace export, for servers and executors.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Export traces (one per task, across servers and executors) over OTLP/gRPC to this
    /// receiver, http://HOST:PORT. Spans the receiver does not take are dropped and counted.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// The share of new tasks traced, from 0 to 1; a submission whose `traceparent` says sampled
    /// is always traced.
    #[arg(long, default_value_t = 0.1, value_name = "RATIO")]
    trace_sample_ratio: f64,
}

impl TraceArgs {
    /// Starts exporting as `service` (inside the runtime); nothing without --otlp-endpoint.
    pub fn start(&self, service: &'static str, instance: String) -> Result<()> {
        let Some(endpoint) = &self.otlp_endpoint else { return Ok(()) };
        let config = colony_process::trace::TraceConfig {
            endpoint: endpoint.clone(),
            sample_ratio: self.trace_sample_ratio,
            service,
            instance,
        };
        colony_process::trace::init(&config).map_err(|e| anyhow::anyhow!(e))?;
        tracing::info!(%endpoint, ratio = self.trace_sample_ratio, "exporting traces");
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(endpoint) = &self.otlp_endpoint {
            let config = colony_process::trace::TraceConfig {
                endpoint: endpoint.clone(),
                sample_ratio: self.trace_sample_ratio,
                service: "",
                instance: String::new(),
            };
            config.validate().map_err(|e| anyhow::anyhow!(e))?;
        }
        Ok(())
    }
}

/// The flags of `colony server`; examples are in its help.
#[derive(Debug, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    config: crate::config_file::ConfigArg,
    #[command(flatten)]
    trace: TraceArgs,
    /// This server's id; needed the first time, remembered in the data directory after.
    #[arg(long)]
    id: Option<u64>,
    /// Where the Raft log, snapshots and state live.
    #[arg(long)]
    data_dir: PathBuf,
    /// HOST:PORT to serve on and advertise to peers; needed the first time.
    #[arg(long, value_parser = colony_client::parse_endpoint)]
    listen: Option<String>,
    /// HOST:PORT to bind instead of --listen's address, which peers, clients and executors are
    /// still told: 0.0.0.0:7101 in a pod whose --listen is its DNS name, so loopback (and
    /// `kubectl port-forward`) is served too. Not remembered: give it at every start.
    #[arg(long, value_parser = colony_client::parse_endpoint)]
    bind: Option<String>,
    /// Create a new cluster with this server as its first member.
    #[arg(long, conflicts_with = "join")]
    bootstrap: bool,
    /// With --bootstrap: start the new cluster from this backup (`colony cluster snapshot save`).
    /// The data directory must be empty. Attempts and executors from before the backup are
    /// stopped; executors register again.
    #[arg(long, requires = "bootstrap")]
    restore: Option<PathBuf>,
    /// With --restore: refuse a backup of any other cluster than this one.
    #[arg(long, requires = "restore")]
    restore_expect_cluster_id: Option<String>,
    /// Join an existing cluster through any of these servers (comma-separated HOST:PORT).
    #[arg(long, value_delimiter = ',', value_parser = colony_client::parse_endpoint)]
    join: Vec<String>,
    /// Build a snapshot, and purge the log behind it, after this many log entries.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_logs: u64,
    /// Leader heartbeat interval. Heartbeats go on a timer of their own, not behind log appends,
    /// so a loaded leader keeps its followers (0 elections in 60 s of 500 clients on 2 cores).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_ms: u64,
    /// Election timeout, lower bound (each follower picks a random timeout in [min, max)). A
    /// follower that heard a leader also waits out the leader lease (the upper bound) first: a
    /// dead leader is replaced after about max + [min, max).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    election_timeout_ms_min: u64,
    /// Election timeout, upper bound.
    #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    election_timeout_ms_max: u64,
    /// Raft entries the leader keeps in flight; each is appended and fsynced on its own, so fewer,
    /// larger batches of client commands beat many small ones.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    proposals_in_flight: u64,
    /// Client commands batched into one Raft entry.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=4096))]
    proposal_commands_max: u64,
    /// Serve Prometheus metrics (`/metrics`), `/healthz` and `/readyz` over HTTP on HOST:PORT.
    #[arg(long, value_parser = colony_client::parse_endpoint)]
    metrics_listen: Option<String>,
    /// How often executors heartbeat to the leader.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    executor_heartbeat_interval: Duration,
    /// An executor silent this long is declared down and its tasks rescheduled.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    executor_heartbeat_timeout: Duration,
    /// A new leader declares no executor down for this long, so executors can reconnect to it first.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    executor_leader_grace: Duration,
    /// A task may preempt running tasks at least this much lower in priority; 0 turns preemption off.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(0..=1000))]
    preemption_priority_gap_min: u16,
    /// Finished tasks (with their outputs and idempotency keys) are removed this long after they
    /// finish, unless an unfinished task depends on them.
    #[arg(long, default_value = "72h", value_parser = humantime::parse_duration)]
    task_retention: Duration,
    /// At most this many finished tasks are kept; beyond it the oldest are removed first.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    finished_tasks_max: u64,
    /// Executors down (or admitted and never connected) this long are removed; one that comes
    /// back must join again.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    executor_gc_after: Duration,
    /// While this server leads, write a backup into this directory (at once, then every
    /// --backup-interval), atomically; `colony server --bootstrap --restore FILE` restores one.
    #[arg(long)]
    backup_dir: Option<PathBuf>,
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration, requires = "backup_dir")]
    backup_interval: Duration,
    /// Backups kept in --backup-dir; the oldest go first.
    #[arg(long, default_value_t = 168, value_parser = clap::value_parser!(u64).range(1..=100_000), requires = "backup_dir")]
    backup_keep: u64,
    /// The audit trail (DATA_DIR/audit/) starts a new file past this size (e.g. 64Mi, 1Gi).
    #[arg(long, default_value = "64Mi")]
    audit_file_max: String,
    /// Audit files kept besides the current one; the oldest go first. The trail takes at most
    /// (this + 1) x --audit-file-max.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    audit_files_kept: u64,
    /// Log lines on stdout as text or as JSON objects; the level comes from RUST_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Set by `colony dev`: stop when this process (the parent) exits, however it exits.
    #[arg(long, hide = true)]
    parent_pid: Option<i32>,
    /// Serve every read from this server's own state, even when a client asks for a
    /// linearizable one. Breaks linearizability on purpose: only for the chaos suite's negative
    /// control, which must catch it.
    #[arg(long, hide = true)]
    unsafe_stale_reads: bool,
    /// Check every state-machine invariant after each applied entry and abort on a violation.
    /// Walks the whole state each time: for the chaos suite and tests, not for real clusters.
    #[arg(long, hide = true)]
    check_invariants: bool,
}

fn config(args: &ServerArgs) -> Result<ServerConfig> {
    if args.election_timeout_ms_min >= args.election_timeout_ms_max {
        bail!(
            "--election-timeout-ms-min ({}) must be below --election-timeout-ms-max ({})",
            args.election_timeout_ms_min,
            args.election_timeout_ms_max
        );
    }
    if args.heartbeat_ms >= args.election_timeout_ms_min {
        bail!(
            "--heartbeat-ms ({}) must be below --election-timeout-ms-min ({}), or followers start elections under a healthy leader",
            args.heartbeat_ms,
            args.election_timeout_ms_min
        );
    }
    let mut config = ServerConfig::new(args.data_dir.clone());
    config.id = args.id;
    config.listen = args.listen.clone();
    config.bind = args.bind.clone();
    config.bootstrap = args.bootstrap;
    config.restore = args.restore.clone();
    config.restore_expect_cluster_id = args.restore_expect_cluster_id.clone();
    config.join = args.join.clone();
    config.snapshot_logs_threshold = args.snapshot_logs;
    config.heartbeat_interval = Duration::from_millis(args.heartbeat_ms);
    config.election_timeout_min = Duration::from_millis(args.election_timeout_ms_min);
    config.election_timeout_max = Duration::from_millis(args.election_timeout_ms_max);
    config.proposals_in_flight_max = args.proposals_in_flight as usize;
    config.proposal_commands_max = args.proposal_commands_max as usize;
    config.metrics_listen = args.metrics_listen.clone();
    if args.executor_heartbeat_interval.is_zero()
        || args.executor_heartbeat_interval >= args.executor_heartbeat_timeout
    {
        bail!(
            "--executor-heartbeat-interval ({}) must be above zero and below --executor-heartbeat-timeout ({})",
            humantime::format_duration(args.executor_heartbeat_interval),
            humantime::format_duration(args.executor_heartbeat_timeout)
        );
    }
    config.executor_heartbeat_interval = args.executor_heartbeat_interval;
    config.executor_heartbeat_timeout = args.executor_heartbeat_timeout;
    config.executor_leader_grace = args.executor_leader_grace;
    config.preemption_priority_gap_min = args.preemption_priority_gap_min;
    config.retention = retention(args)?;
    if args.backup_interval < Duration::from_secs(1) {
        bail!(
            "--backup-interval {} is too short: at least 1s",
            humantime::format_duration(args.backup_interval)
        );
    }
    config.backup_dir = args.backup_dir.clone();
    config.backup_interval = args.backup_interval;
    config.backup_keep = args.backup_keep as usize;
    config.audit = audit(args)?;
    config.unsafe_stale_reads = args.unsafe_stale_reads;
    config.check_invariants = args.check_invariants;
    Ok(config)
}

/// The retention flags, each at least a second and at most ten years.
fn retention(args: &ServerArgs) -> Result<Retention> {
    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
    let ms = |flag: &str, value: Duration| -> Result<u64> {
        if !(MIN..=MAX).contains(&value) {
            bail!(
                "--{flag} {} is out of range: it must be at least 1s and at most 10 years",
                humantime::format_duration(value)
            );
        }
        Ok(value.as_millis() as u64)
    };
    Ok(Retention {
        task_retention_ms: ms("task-retention", args.task_retention)?,
        finished_tasks_max: args.finished_tasks_max,
        executor_gc_after_ms: ms("executor-gc-after", args.executor_gc_after)?,
        ..Retention::DEFAULT
    })
}

/// The audit trail's rotation: files of 1 MiB to 64 GiB.
fn audit(args: &ServerArgs) -> Result<AuditConfig> {
    const MIN: u64 = 1 << 20;
    const MAX: u64 = 64 << 30;
    let bytes = parse_memory_bytes(&args.audit_file_max)
        .map_err(|e| anyhow::anyhow!("invalid --audit-file-max {:?}: {e}", args.audit_file_max))?;
    if !(MIN..=MAX).contains(&bytes) {
        bail!(
            "--audit-file-max {} is out of range: it must be at least 1Mi and at most 64Gi",
            args.audit_file_max
        );
    }
    Ok(AuditConfig { file_bytes_max: bytes, files_kept: args.audit_files_kept as usize })
}

pub fn init_logging(format: LogFormat) -> Result<()> {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env()
        .context("invalid RUST_LOG")?;
    // Logs go to stdout, so a server that fails has only its `error:` line on stderr.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

/// Asks the kernel to send SIGTERM when the parent exits, then checks the parent is still the one
/// that started us (it may have exited before the request took effect).
pub fn exit_with_parent(parent: i32) -> Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)
        .context("cannot ask to be stopped with the parent")?;
    if nix::unistd::getppid() != Pid::from_raw(parent) {
        bail!("the parent process {parent} has already exited");
    }
    Ok(())
}

pub async fn run(args: ServerArgs, global: &crate::GlobalArgs) -> Result<()> {
    let mut config = config(&args)?;
    args.trace.validate()?;
    // The global `--token`: a server join token, needed the first time a server joins.
    config.token = global.token.clone();
    if let Some(parent) = args.parent_pid {
        exit_with_parent(parent)?;
    }
    init_logging(args.log_format)?;
    args.config.log();
    let instance = args.id.map_or_else(|| args.data_dir.display().to_string(), |id| id.to_string());
    args.trace.start("colony-server", instance)?;
    colony_server::run(config).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        args: ServerArgs,
    }

    fn parse(argv: &[&str]) -> Result<ServerConfig> {
        let harness =
            Harness::try_parse_from(std::iter::once("server").chain(argv.iter().copied()))?;
        config(&harness.args)
    }

    #[test]
    fn flags_become_the_config() {
        let config = match parse(&[
            "--id",
            "2",
            "--data-dir",
            "/d",
            "--listen",
            "127.0.0.1:7102",
            "--join",
            "a:1,b:2",
            "--heartbeat-ms",
            "50",
        ]) {
            Ok(config) => config,
            Err(e) => panic!("{e:#}"),
        };
        assert_eq!(config.id, Some(2));
        assert_eq!(config.listen.as_deref(), Some("127.0.0.1:7102"));
        assert_eq!(config.join, vec!["a:1".to_owned(), "b:2".to_owned()]);
        assert!(!config.bootstrap);
        assert_eq!(config.heartbeat_interval, Duration::from_millis(50));
        assert_eq!(config.snapshot_logs_threshold, 20_000);
        assert_eq!(config.retention, Retention::DEFAULT);
    }

    #[test]
    fn retention_flags_are_bounded() {
        let config = parse(&[
            "--data-dir",
            "/d",
            "--task-retention",
            "90s",
            "--finished-tasks-max",
            "5000",
            "--executor-gc-after",
            "1h",
        ]);
        assert!(config.is_ok_and(|c| c.retention
            == Retention {
                task_retention_ms: 90_000,
                finished_tasks_max: 5000,
                executor_gc_after_ms: 3_600_000,
                ..Retention::DEFAULT
            }));
        for bad in [
            ["--task-retention", "0s"],
            ["--task-retention", "11years"],
            ["--task-retention", "soon"],
            ["--finished-tasks-max", "0"],
            ["--finished-tasks-max", "-1"],
            ["--executor-gc-after", "0s"],
            ["--executor-gc-after", "500ms"],
            // A restore starts a new cluster: it needs --bootstrap.
            ["--restore", "/b.snap"],
        ] {
            let argv = ["--data-dir", "/d", bad[0], bad[1]];
            assert!(parse(&argv).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn backup_flags_are_bounded() {
        let backups = |extra: &[&str]| {
            let mut argv = vec!["--data-dir", "/d", "--backup-dir", "/b"];
            argv.extend_from_slice(extra);
            parse(&argv)
        };
        assert!(backups(&["--backup-interval", "30m", "--backup-keep", "48"]).is_ok_and(|c| {
            c.backup_interval == Duration::from_secs(1800) && c.backup_keep == 48
        }));
        assert!(backups(&["--backup-keep", "0"]).is_err());
        assert!(backups(&["--backup-interval", "10ms"]).is_err());
        assert!(parse(&["--data-dir", "/d", "--backup-keep", "5"]).is_err(), "needs --backup-dir");
    }

    #[test]
    fn audit_flags_are_bounded() {
        let audit = |extra: &[&str]| {
            let mut argv = vec!["--data-dir", "/d"];
            argv.extend_from_slice(extra);
            parse(&argv).map(|c| c.audit)
        };
        assert!(audit(&[]).is_ok_and(|a| a.file_bytes_max == 64 << 20 && a.files_kept == 8));
        assert!(audit(&["--audit-file-max", "16Mi", "--audit-files-kept", "2"])
            .is_ok_and(|a| a.file_bytes_max == 16 << 20 && a.files_kept == 2));
        for bad in [
            ["--audit-file-max", "1Ki"],
            ["--audit-file-max", "65Gi"],
            ["--audit-file-max", "lots"],
            ["--audit-files-kept", "0"],
        ] {
            assert!(audit(&bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_restart_needs_only_the_data_dir() {
        assert!(parse(&["--data-dir", "/d"]).is_ok_and(|c| c.id.is_none() && c.listen.is_none()));
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(parse(&["--data-dir", "/d", "--bootstrap", "--join", "a:1"]).is_err());
        assert!(parse(&["--bootstrap"]).is_err());
        assert!(parse(&["--data-dir", "/d", "--listen", "nohost"]).is_err());
        assert!(parse(&["--data-dir", "/d", "--election-timeout-ms-min", "900"])
            .is_err_and(|e| e.to_string().contains("must be below")));
        assert!(parse(&["--data-dir", "/d", "--heartbeat-ms", "500"])
            .is_err_and(|e| e.to_string().contains("must be below")));
    }
}
