//! One server's Prometheus metrics, and the HTTP endpoint serving them beside `/healthz` (alive)
//! and `/readyz` (storage open and a leader known).

use crate::node::Node;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use std::sync::{Arc, OnceLock};

/// Every metric a server exports. Names start with `colony_`; no label carries a task id.
pub struct Metrics {
    registry: Registry,
    pub raft_term: IntGauge,
    pub raft_is_leader: IntGauge,
    pub raft_commit_index: IntGauge,
    pub raft_applied_index: IntGauge,
    pub raft_last_log_index: IntGauge,
    pub raft_snapshot_index: IntGauge,
    pub raft_leader_changes: IntCounter,
    pub raft_proposal_seconds: Histogram,
    pub raft_proposal_commands: Histogram,
    pub raft_proposals_failed: IntCounter,
    pub submit_seconds: Histogram,
    /// Round trips between agents, labelled by role (`server` to `server` for Raft, `server` to
    /// `leader` for forwarded requests), never by address.
    pub agent_communication_seconds: HistogramVec,
    tasks_pending: IntGauge,
    tasks: IntGaugeVec,
    system_health: IntGaugeVec,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, collector: C) -> Result<C, prometheus::Error> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        let gauge = |name: &str, help: &str| register(&registry, IntGauge::new(name, help)?);
        let latency = |name: &str, help: &str| {
            let buckets = vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
            register(&registry, Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?)
        };
        Ok(Metrics {
            raft_term: gauge("colony_raft_term", "Current Raft term.")?,
            raft_is_leader: gauge("colony_raft_is_leader", "1 when this server is the leader.")?,
            raft_commit_index: gauge("colony_raft_commit_index", "Last log index known committed.")?,
            raft_applied_index: gauge("colony_raft_applied_index", "Last log index applied to the state machine.")?,
            raft_last_log_index: gauge("colony_raft_last_log_index", "Last log index in this server's log.")?,
            raft_snapshot_index: gauge("colony_raft_snapshot_index", "Last log index covered by the latest snapshot.")?,
            raft_leader_changes: register(&registry, IntCounter::new("colony_raft_leader_changes_total", "Times this server saw a new leader.")?)?,
            raft_proposal_seconds: latency("colony_raft_proposal_seconds", "Time from proposing a Raft entry to its being applied.")?,
            raft_proposal_commands: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("colony_raft_proposal_commands", "Client commands batched into one Raft entry.")
                        .buckets(prometheus::exponential_buckets(1.0, 4.0, 7)?),
                )?,
            )?,
            raft_proposals_failed: register(&registry, IntCounter::new("colony_raft_proposals_failed_total", "Raft entries that failed to commit.")?)?,
            submit_seconds: latency("colony_task_submit_seconds", "Task submissions on the leader, from arrival to commit.")?,
            agent_communication_seconds: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new("colony_agent_communication_seconds", "Round-trip time of messages between agents.")
                        .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
                    &["source", "destination"],
                )?,
            )?,
            tasks_pending: gauge("colony_tasks_pending", "Tasks waiting to be placed (queue depth).")?,
            tasks: register(&registry, IntGaugeVec::new(Opts::new("colony_tasks", "Tasks by state."), &["state"])?)?,
            system_health: register(
                &registry,
                IntGaugeVec::new(Opts::new("colony_system_health", "1 for the component's current status."), &["component", "status"])?,
            )?,
            registry,
        })
    }

    /// The text exposition, with the state-derived gauges brought up to date first.
    fn render(&self, node: &Node) -> Result<String, prometheus::Error> {
        let (counts, ready) = {
            let state = node.state();
            (state.machine.count_by_state(), node.raft.metrics().borrow().current_leader.is_some())
        };
        for (state, count) in &counts {
            self.tasks.with_label_values(&[state.as_str()]).set(*count as i64);
        }
        self.tasks_pending.set(counts.get(&colony_core::TaskState::Pending).copied().unwrap_or(0) as i64);
        let (up, down) = if ready { (1, 0) } else { (0, 1) };
        self.system_health.with_label_values(&["server", "healthy"]).set(up);
        self.system_health.with_label_values(&["server", "degraded"]).set(down);
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// The node the HTTP handlers read, set once the node exists (the listener opens before Raft).
pub type NodeCell = Arc<OnceLock<Arc<Node>>>;

async fn serve_metrics(State((metrics, node)): State<(Arc<Metrics>, NodeCell)>) -> impl IntoResponse {
    let Some(node) = node.get() else { return (StatusCode::SERVICE_UNAVAILABLE, "starting".to_owned()) };
    match metrics.render(node) {
        Ok(text) => (StatusCode::OK, text),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn serve_ready(State((_, node)): State<(Arc<Metrics>, NodeCell)>) -> impl IntoResponse {
    match node.get().map(|n| n.raft.metrics().borrow().current_leader) {
        Some(Some(leader)) => (StatusCode::OK, format!("ready: leader {leader}\n")),
        Some(None) => (StatusCode::SERVICE_UNAVAILABLE, "not ready: no leader known\n".to_owned()),
        None => (StatusCode::SERVICE_UNAVAILABLE, "not ready: storage not open yet\n".to_owned()),
    }
}

/// The routes of `--metrics-listen`.
pub fn router(metrics: Arc<Metrics>, node: NodeCell) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(serve_ready))
        .with_state((metrics, node))
}
