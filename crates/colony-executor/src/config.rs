//! What an executor is started with: where the cluster is, who it is, and what it offers.

use colony_core::Resources;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// An executor's configuration, as the `colony executor` command builds it.
#[derive(Clone)]
pub struct ExecutorConfig {
    /// Servers to connect to (`host:port`), tried in order; any one of them finds the leader.
    pub servers: Vec<String>,
    /// A join token (`colony1.<hex>.<hex>`), needed only until the executor has an identity.
    pub token: Option<String>,
    /// Where the identity and the attempts' working directories live.
    pub data_dir: PathBuf,
    pub name: String,
    pub capacity: Resources,
    pub labels: BTreeMap<String, String>,
    pub capabilities: BTreeSet<String>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// Written by hand so the join token, a secret, never reaches a log.
impl fmt::Debug for ExecutorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecutorConfig")
            .field("servers", &self.servers)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("data_dir", &self.data_dir)
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("labels", &self.labels)
            .field("capabilities", &self.capabilities)
            .field("metrics_listen", &self.metrics_listen)
            .finish()
    }
}
