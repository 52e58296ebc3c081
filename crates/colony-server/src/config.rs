//! How a server is started: the flags of `colony server`, as one struct.

use colony_core::Retention;
use std::path::PathBuf;
use std::time::Duration;

/// Everything `colony server` needs. A restarted server needs only `data_dir`: the rest is
/// remembered in `data_dir/node.json`.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// This server's id; required the first time, checked against the data directory after.
    pub id: Option<u64>,
    pub data_dir: PathBuf,
    /// `HOST:PORT` to serve gRPC on and advertise to peers; required the first time.
    pub listen: Option<String>,
    /// `HOST:PORT` to bind instead of `listen`'s address (which is still what peers, clients and
    /// executors are told): `0.0.0.0:7101` where `listen` is a name that resolves to one of
    /// several interfaces (a pod's DNS name), so loopback is served too.
    pub bind: Option<String>,
    /// Create a new cluster with this server as its only member.
    pub bootstrap: bool,
    /// With `bootstrap`: start the new cluster from this backup file.
    pub restore: Option<PathBuf>,
    /// Refuse a backup of any other cluster than this one.
    pub restore_expect_cluster_id: Option<String>,
    /// Servers of an existing cluster to join through (any member will do).
    pub join: Vec<String>,
    /// A server join token, needed the first time a server joins (not on restarts).
    pub token: Option<String>,
    /// Build a snapshot (and purge the log behind it) after this many entries.
    pub snapshot_logs_threshold: u64,
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Raft entries the proposer keeps in flight. openraft 0.9 appends (and fsyncs) each entry
    /// on its own, so fewer, larger batches beat many small ones.
    pub proposals_in_flight_max: usize,
    /// Client commands batched into one Raft entry.
    pub proposal_commands_max: usize,
    /// `HOST:PORT` for `/metrics`, `/healthz` and `/readyz` over HTTP; none when unset.
    pub metrics_listen: Option<String>,
    /// How often executors heartbeat (told to them when they connect).
    pub executor_heartbeat_interval: Duration,
    /// An executor silent this long is declared down and its attempts rescheduled.
    pub executor_heartbeat_timeout: Duration,
    /// A new leader declares nothing down for this long, so executors can find it first.
    pub executor_leader_grace: Duration,
    /// A task may preempt tasks at least this much lower in priority; 0 turns preemption off.
    pub preemption_priority_gap_min: u16,
    /// A model older than this is not used for scheduling.
    pub model_stale_after: Duration,
    /// What the leader removes, and when (`Command::Collect`).
    pub retention: Retention,
    /// Where the leader writes scheduled backups; none when unset.
    pub backup_dir: Option<PathBuf>,
    pub backup_interval: Duration,
    /// Backups kept in `backup_dir`; the oldest go first.
    pub backup_keep: usize,
    /// How the audit trail rotates.
    pub audit: crate::audit::AuditConfig,
    /// Serve every read from this server's applied state, as if each asked for `stale`. Breaks
    /// linearizability on purpose: the chaos suite's negative control, never for real clusters.
    pub unsafe_stale_reads: bool,
    /// Check every state-machine invariant after each applied entry and abort on a violation
    /// (debug builds always do). Walks the whole state each time: for the chaos suite and tests.
    pub check_invariants: bool,
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        ServerConfig {
            id: None,
            data_dir,
            listen: None,
            bind: None,
            bootstrap: false,
            restore: None,
            restore_expect_cluster_id: None,
            join: Vec::new(),
            token: None,
            snapshot_logs_threshold: 20_000,
            heartbeat_interval: Duration::from_millis(30),
            election_timeout_min: Duration::from_millis(100),
            election_timeout_max: Duration::from_millis(150),
            proposals_in_flight_max: 4,
            proposal_commands_max: 1024,
            metrics_listen: None,
            executor_heartbeat_interval: Duration::from_millis(500),
            executor_heartbeat_timeout: Duration::from_secs(3),
            executor_leader_grace: Duration::from_secs(5),
            preemption_priority_gap_min: 100,
            model_stale_after: Duration::from_secs(7 * 24 * 3600),
            retention: Retention::DEFAULT,
            audit: crate::audit::AuditConfig::default(),
            backup_dir: None,
            backup_interval: Duration::from_secs(3600),
            backup_keep: 168,
            unsafe_stale_reads: false,
            check_invariants: false,
        }
    }
}
