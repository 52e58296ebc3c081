//! `colony learner`: follows finished tasks, trains the runtime/memory model and publishes the
//! versions that beat both the current model and a per-kind baseline.

use crate::server_cmd::{exit_with_parent, init_logging, LogFormat};
use anyhow::Result;
use clap::Args;
use colony_learn::learner::LearnerConfig;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct LearnerArgs {
    #[command(flatten)]
    config: crate::config_file::ConfigArg,
    /// Servers to follow and publish through (comma-separated HOST:PORT).
    #[arg(long, required = true, value_delimiter = ',', value_parser = colony_client::parse_endpoint)]
    join: Vec<String>,
    /// Where the learner keeps its cursor into the finished-task feed and its examples.
    #[arg(long)]
    data_dir: PathBuf,
    /// auto (a GPU when one is usable, else the CPU), cpu, or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Retrain once this many new examples arrived.
    #[arg(long, default_value_t = 200)]
    retrain_every: usize,
    /// Or once this long passed with at least one new example.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    retrain_interval: Duration,
    /// Never train on fewer examples.
    #[arg(long, default_value_t = 100)]
    min_examples: usize,
    /// Serve Prometheus metrics (`/metrics`), `/healthz` and `/readyz` over HTTP on HOST:PORT.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Set by `colony dev`: stop when this process (the parent) exits, however it exits.
    #[arg(long, hide = true)]
    parent_pid: Option<i32>,
}

pub async fn run(args: LearnerArgs, global: &crate::GlobalArgs) -> Result<()> {
    // The global `--token`: a learner join token, needed only the first time (the learner keeps
    // the certificate it is issued in its data directory).
    let mut config =
        LearnerConfig::new(args.join.clone(), global.token.clone(), args.data_dir.clone());
    config.device = args.device.parse().map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    config.metrics_listen = args.metrics_listen;
    config.retrain_every_examples = args.retrain_every;
    config.retrain_interval = args.retrain_interval;
    config.min_examples = args.min_examples;
    config.validate()?;
    if let Some(parent) = args.parent_pid {
        exit_with_parent(parent)?;
    }
    init_logging(args.log_format)?;
    args.config.log();
    colony_learn::learner::run(config, async {
        colony_process::shutdown_signal().await;
    })
    .await
}
