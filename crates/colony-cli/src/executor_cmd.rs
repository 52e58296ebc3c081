//! `colony executor`: runs one executor agent with its logging set up.

use crate::server_cmd::{exit_with_parent, init_logging, LogFormat};
use anyhow::{anyhow, Context as _, Result};
use clap::Args;
use colony_core::{parse_cpu_millis, parse_memory_bytes, Resources};
use colony_executor::ExecutorConfig;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// The flags of `colony executor`.
#[derive(Debug, Args)]
pub struct ExecutorArgs {
    #[command(flatten)]
    config: crate::config_file::ConfigArg,
    #[command(flatten)]
    trace: crate::server_cmd::TraceArgs,
    /// Servers to connect to (comma-separated HOST:PORT); any one finds the leader.
    #[arg(long, required = true, value_delimiter = ',', value_parser = colony_client::parse_endpoint)]
    join: Vec<String>,
    /// Where the executor keeps its identity (key and certificate) and its journal; owner-only,
    /// and out of every task's reach.
    #[arg(long)]
    data_dir: PathBuf,
    /// Where tasks' working directories are made (default: DATA_DIR-work, beside the data
    /// directory; never inside it).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The user tasks run as (default: `nobody` when the executor runs as root, otherwise the
    /// executor's own user).
    #[arg(long, value_name = "USER")]
    run_as: Option<String>,
    /// Refuse to start when this host lacks a cgroup controller (memory, cpu, pids) that
    /// enforces tasks' limits; `--require-limits=false` runs them unlimited instead.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    require_limits: bool,
    /// Run tasks without control groups: no memory, CPU or process limits, and a kill reaches
    /// only a task's process group. Only for measuring what containment costs.
    #[arg(long)]
    unsafe_no_limits: bool,
    /// Processes (and threads) one task attempt may hold at once.
    #[arg(
        long,
        default_value_t = colony_executor::TASK_PIDS_MAX_DEFAULT,
        value_parser = clap::value_parser!(u64).range(1..=4_194_304)
    )]
    task_pids_max: u64,
    /// The ports this executor leases to agent instances that ask for one (COLONY_PORT), LOW-HIGH.
    #[arg(long, default_value = "20000-29999", value_parser = parse_port_range, value_name = "LOW-HIGH")]
    ports: std::ops::RangeInclusive<u16>,
    /// The host agent instances here are registered at (default: this executor's address as
    /// the leader sees it from here, the local address of its connection).
    #[arg(long, value_name = "HOST")]
    advertise_host: Option<String>,
    /// A name for people (default: the data directory's name).
    #[arg(long)]
    name: Option<String>,
    /// CPU offered: millicores (500m) or cores (4).
    #[arg(long, default_value = "1")]
    cpu: String,
    /// Memory offered (512Mi, 8Gi).
    #[arg(long, default_value = "1Gi")]
    memory: String,
    /// GPUs offered; each attempt gets its own indices in CUDA_VISIBLE_DEVICES.
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// A custom resource offered, NAME=COUNT (repeatable).
    #[arg(long = "resource", value_name = "NAME=COUNT")]
    resources: Vec<String>,
    /// A label tasks can require, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// A capability tasks can require, such as `shell` (repeatable).
    #[arg(long = "capability", value_name = "NAME")]
    capabilities: Vec<String>,
    /// Serve Prometheus metrics (`/metrics`), `/healthz` and `/readyz` over HTTP on HOST:PORT.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Set by `colony dev`: stop when this process (the parent) exits, however it exits.
    #[arg(long, hide = true)]
    parent_pid: Option<i32>,
}

fn config(args: &ExecutorArgs, global: &crate::GlobalArgs) -> Result<ExecutorConfig> {
    let custom = crate::task_cmd::custom_resources(&args.resources)?;
    let capacity = Resources {
        cpu_millis: parse_cpu_millis(&args.cpu).context("invalid --cpu")?,
        memory_bytes: parse_memory_bytes(&args.memory).context("invalid --memory")?,
        gpus: args.gpus,
        custom,
    };
    let name = match &args.name {
        Some(name) => name.clone(),
        None => args
            .data_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                anyhow!("cannot name the executor after {}; pass --name", args.data_dir.display())
            })?,
    };
    let spec = colony_core::ExecutorSpec {
        name: name.clone(),
        capacity: capacity.clone(),
        labels: crate::task_cmd::pairs("label", &args.labels)?,
        capabilities: args.capabilities.iter().cloned().collect::<BTreeSet<_>>(),
    };
    spec.validate(&colony_core::Limits::default()).context("invalid executor")?;
    if let Some(host) = &args.advertise_host {
        if host.is_empty() || host.len() > 253 || !host.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(anyhow!("--advertise-host {host:?} is not a host name or address"));
        }
    }
    Ok(ExecutorConfig {
        servers: args.join.clone(),
        // The global `--token`: an executor join token, needed only the first time.
        token: global.token.clone(),
        data_dir: args.data_dir.clone(),
        name,
        capacity,
        labels: spec.labels,
        capabilities: spec.capabilities,
        metrics_listen: args.metrics_listen,
        work_dir: args.work_dir.clone(),
        run_as: args.run_as.clone(),
        require_limits: args.require_limits,
        cgroups: !args.unsafe_no_limits,
        task_pids_max: args.task_pids_max,
        ports: args.ports.clone(),
        advertise_host: args.advertise_host.clone(),
    })
}

/// `LOW-HIGH`, both ports above 0, in order.
fn parse_port_range(text: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (low, high) = text.split_once('-').ok_or("expected LOW-HIGH, such as 20000-29999")?;
    let port = |p: &str| match p.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{p:?} is not a port (1-65535)")),
        Ok(p) => Ok(p),
    };
    let (low, high) = (port(low)?, port(high)?);
    if low > high {
        return Err(format!("{low}-{high} is not in order"));
    }
    Ok(low..=high)
}

pub async fn run(args: ExecutorArgs, global: &crate::GlobalArgs) -> Result<()> {
    let config = config(&args, global)?;
    args.trace.validate()?;
    if let Some(parent) = args.parent_pid {
        exit_with_parent(parent)?;
    }
    init_logging(args.log_format)?;
    args.config.log();
    args.trace.start("colony-executor", config.name.clone())?;
    colony_executor::run(config, async {
        colony_process::shutdown_signal().await;
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::parse_port_range;

    #[test]
    fn port_ranges_are_checked() {
        assert_eq!(parse_port_range("20000-29999"), Ok(20_000..=29_999));
        assert_eq!(parse_port_range("7-7"), Ok(7..=7));
        for bad in ["", "20000", "0-10", "10-5", "1-65536", "a-b", "-", "20000-29999-1"] {
            assert!(parse_port_range(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
