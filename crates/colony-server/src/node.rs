//! What the parts of a running server share: its identity, Raft, the proposer, storage, metrics,
//! the executor sessions, and the applied state. `start` builds it; the admin service, the
//! executor gateway and the leader's duties use it. It imports none of them.

use crate::audit::Audit;
use crate::config::ServerConfig;
use crate::metrics::{Metrics, Scrape};
use crate::peers::Peers;
use crate::proposer::{ProposeError, Proposer};
use crate::sessions::Sessions;
use crate::tls::ServerTls;
use colony_core::leader::Effect;
use colony_core::{Command, Outcome};
use colony_store::{Applied, LogStore, SharedState, SnapshotStats, TypeConfig};
use openraft::Raft;
use std::collections::VecDeque;
use std::sync::{Arc, RwLockReadGuard};
use tokio::sync::Notify;

/// A running server's shared parts.
pub struct Node {
    id: u64,
    cluster_id: String,
    raft: Raft<TypeConfig>,
    proposer: Proposer,
    peers: Peers,
    log: LogStore,
    metrics: Arc<Metrics>,
    config: ServerConfig,
    snapshot_stats: Arc<SnapshotStats>,
    sessions: Sessions,
    /// Wakes the leader's scheduler: work arrived or capacity was freed.
    scheduler_wake: Notify,
    state: SharedState,
    tls: ServerTls,
    ca_fingerprint: colony_quic::Fingerprint,
    audit: Audit,
}

/// What `Node::new` takes.
pub struct Parts {
    pub id: u64,
    pub cluster_id: String,
    pub raft: Raft<TypeConfig>,
    pub proposer: Proposer,
    pub peers: Peers,
    pub log: LogStore,
    pub metrics: Arc<Metrics>,
    pub config: ServerConfig,
    pub snapshot_stats: Arc<SnapshotStats>,
    pub sessions: Sessions,
    pub state: SharedState,
    pub tls: ServerTls,
    pub ca_fingerprint: colony_quic::Fingerprint,
    pub audit: Audit,
}

impl Node {
    pub fn new(parts: Parts) -> Node {
        let Parts {
            id,
            cluster_id,
            raft,
            proposer,
            peers,
            log,
            metrics,
            config,
            snapshot_stats,
            sessions,
            state,
            tls,
            ca_fingerprint,
            audit,
        } = parts;
        Node {
            id,
            cluster_id,
            raft,
            proposer,
            peers,
            log,
            metrics,
            config,
            snapshot_stats,
            sessions,
            scheduler_wake: Notify::new(),
            state,
            tls,
            ca_fingerprint,
            audit,
        }
    }

    /// The SHA-256 of the cluster CA's certificate: what tokens pin.
    pub fn ca_fingerprint(&self) -> colony_quic::Fingerprint {
        self.ca_fingerprint
    }

    pub fn ca_pem(&self) -> &str {
        &self.tls.ca_pem
    }

    /// The CA with its key, on the server that created the cluster, for the first leader.
    pub fn local_ca(&self) -> Option<(String, String)> {
        self.tls.local_ca()
    }

    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The last log index this server knows committed.
    pub fn committed_index(&self) -> u64 {
        self.log.committed_index().unwrap_or(0)
    }

    /// The applied state, for reads. Held briefly: the state machine waits on it to apply.
    pub fn state(&self) -> RwLockReadGuard<'_, Applied> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A copy of the applied state as it is now. Its maps are persistent, so the copy takes a
    /// moment under the read lock, and apply goes on while the caller walks or encodes it.
    pub fn state_copy(&self) -> Applied {
        self.state().clone()
    }

    /// A backup file of the applied state as it is now; O(state) work, for a blocking thread.
    pub fn backup(&self) -> Result<Vec<u8>, colony_store::backup::BackupError> {
        let state = self.state_copy();
        colony_store::backup::encode(&state, &self.cluster_id, self.id, colony_process::unix_ms())
    }

    /// Refuses every later proposal and waits for those in Raft: a stopping leader's log stops
    /// growing, so a follower can hold all of it and take over.
    pub async fn stop_proposing(&self) {
        self.proposer.stop().await;
    }

    pub fn wake_scheduler(&self) {
        self.scheduler_wake.notify_one();
    }

    /// Resolves when something woke the scheduler.
    pub async fn scheduler_woken(&self) {
        self.scheduler_wake.notified().await;
    }

    /// Proposes one command, waits until it is committed and applied, and lets the leader
    /// component act on its outcome (assignments out, superseded attempts killed, rounds woken).
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        let outcome = self.proposer.propose(command).await?;
        let effects = self.committed(&outcome);
        self.perform(effects).await;
        Ok(outcome)
    }

    /// Proposes `commands` in this order (they commit in this order), and for each one
    /// committed lets the leader component act on its outcome, as [`Node::propose`] does.
    pub async fn propose_all(&self, commands: Vec<Command>) -> Vec<Result<Outcome, ProposeError>> {
        let results = self.proposer.propose_all(commands).await;
        for outcome in results.iter().flatten() {
            let effects = self.committed(outcome);
            self.perform(effects).await;
        }
        results
    }

    /// Performs what the leader component handed back: proposals (one at a time, in order, each
    /// outcome fed back in) and scheduler wake-ups. A proposal that fails is logged: the
    /// component decides again on its next input.
    pub async fn perform(&self, effects: Vec<Effect>) {
        let mut queue = VecDeque::from(effects);
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Propose(command) => match self.proposer.propose(command).await {
                    Ok(outcome) => queue.extend(self.committed(&outcome)),
                    Err(e) => tracing::debug!("a leader proposal was not committed: {e}"),
                },
                Effect::WakeScheduler => self.wake_scheduler(),
                // Sessions perform sends and closes under their own lock and never hand them back.
                Effect::Send { .. } | Effect::Close { .. } => {}
            }
        }
    }

    fn committed(&self, outcome: &Outcome) -> Vec<Effect> {
        if let Some(effects) = colony_core::leader::Leader::committed_without_sessions(outcome) {
            return effects;
        }
        let state = self.state();
        if let Outcome::MarkedDown { id, rescheduled, lost } = outcome {
            self.metrics.executors_marked_down.inc();
            self.metrics.task_retries.inc_by(rescheduled.len() as u64);
            let reason =
                state.machine.get_executor(*id).and_then(|e| e.reason.as_deref()).unwrap_or("");
            tracing::warn!(executor_id = %id, rescheduled = rescheduled.len(), lost = lost.len(), "executor declared down: {reason}");
        }
        self.sessions.committed(&state.machine, outcome)
    }

    /// The Prometheus text, with the state-derived gauges brought up to date first.
    pub fn metrics_text(&self) -> Result<String, String> {
        let leader_known = self.raft.metrics().borrow().current_leader.is_some();
        let (executors_connected, heartbeat_age_max) =
            (self.sessions.connected(), self.sessions.heartbeat_age_max());
        let state = self.state();
        let scrape = Scrape {
            machine: &state.machine,
            leader_known,
            snapshot_stats: &self.snapshot_stats,
            executors_connected,
            heartbeat_age_max,
        };
        self.metrics.render(&scrape).map_err(|e| e.to_string())
    }
}

impl colony_process::Probe for Node {
    fn metrics_text(&self) -> Result<String, String> {
        Node::metrics_text(self)
    }

    /// Ready once a leader is known.
    fn ready(&self) -> Result<(), String> {
        match self.raft.metrics().borrow().current_leader {
            Some(_) => Ok(()),
            None => Err("not ready: no leader known".to_owned()),
        }
    }
}
