//! Starting, running and stopping one server.

use crate::config::ServerConfig;

/// Runs a server until SIGTERM or SIGINT, then shuts it down gracefully.
pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    anyhow::bail!("server not built yet: {}", config.data_dir.display())
}
