//! What an executor is started with: where the cluster is, who it is, and what it offers.

use colony_core::Resources;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
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
    /// Where attempts' working directories are made; `None`: beside the data directory
    /// (`DATA_DIR-work`), never inside it.
    pub work_dir: Option<PathBuf>,
    /// The user tasks run as; `None`: `nobody` when the executor runs as root, else the
    /// executor's own user.
    pub run_as: Option<String>,
    /// Refuse to start when the host lacks a cgroup controller limits need, rather than run
    /// attempts unlimited.
    pub require_limits: bool,
    /// Run attempts in control groups; `false` only to measure what containment costs
    /// (`--unsafe-no-limits`).
    pub cgroups: bool,
    /// Processes one attempt may hold at once.
    pub task_pids_max: u64,
    /// The ports leased to agent instances that ask for one.
    pub ports: RangeInclusive<u16>,
    /// The host agent instances are registered at; `None`: the address this executor reaches
    /// the leader from.
    pub advertise_host: Option<String>,
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
            .field("work_dir", &self.work_dir)
            .field("run_as", &self.run_as)
            .field("require_limits", &self.require_limits)
            .field("cgroups", &self.cgroups)
            .field("task_pids_max", &self.task_pids_max)
            .field("ports", &self.ports)
            .field("advertise_host", &self.advertise_host)
            .finish()
    }
}
