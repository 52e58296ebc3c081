//! One server's Prometheus metrics. `colony_process::serve_http` serves them beside `/healthz`
//! and `/readyz`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::time::Duration;

/// What a scrape reads from the running server.
pub struct Scrape<'a> {
    pub machine: &'a colony_core::StateMachine,
    pub leader_known: bool,
    pub snapshot_stats: &'a colony_store::SnapshotStats,
    pub executors_connected: usize,
    pub heartbeat_age_max: Duration,
}

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
    /// Entries in this server's log, after the last purge.
    pub raft_log_entries: IntGauge,
    raft_snapshots_built: IntCounter,
    raft_snapshots_installed: IntCounter,
    raft_snapshot_build_seconds: Histogram,
    raft_snapshot_bytes: IntGauge,
    pub raft_proposal_seconds: Histogram,
    pub raft_proposal_commands: Histogram,
    pub raft_proposals_failed: IntCounter,
    pub submit_seconds: Histogram,
    /// Round trips between agents, labelled by role (`server` to `server` for Raft, `server` to
    /// `leader` for forwarded requests), never by address.
    pub agent_communication_seconds: HistogramVec,
    pub quic_connections: IntGauge,
    /// QUIC failures by kind: `handshake` (TLS refused or failed), `protocol` (a malformed or
    /// unexpected message dropped the connection).
    pub quic_errors: IntCounterVec,
    pub scheduling_attempts: IntCounter,
    pub scheduling_rejections: IntCounter,
    pub reports_refused: IntCounter,
    pub blocked_shapes: IntGauge,
    pub placements: IntCounter,
    pub preemptions: IntCounter,
    pub task_retries: IntCounter,
    pub executors_marked_down: IntCounter,
    /// Scheduled backups this server wrote as leader, by outcome (`ok`, `failed`).
    pub backups: IntCounterVec,
    /// When this server last wrote a good scheduled backup (0: never).
    pub backup_last_success: prometheus::Gauge,
    /// The configured backup interval (0: scheduled backups are off).
    pub backup_interval: prometheus::Gauge,
    /// What this leader's retention removed, by kind (`tasks`, `executors`, `acl_tokens`,
    /// `join_tokens`).
    pub retention_removed: IntCounterVec,
    /// From submission to the first assignment's commit.
    pub placement_seconds: Histogram,
    pub scheduling_round_seconds: Histogram,
    tasks_pending: IntGauge,
    tasks: IntGaugeVec,
    topics: IntGauge,
    /// Messages kept (`kept`), their payload bytes (`bytes`), deliveries awaiting an ack
    /// (`in_flight`).
    messages: IntGaugeVec,
    executors: IntGaugeVec,
    executors_connected: IntGauge,
    executor_heartbeat_age_max: prometheus::Gauge,
    resource_utilization: prometheus::GaugeVec,
    allocation_efficiency: HistogramVec,
    system_health: IntGaugeVec,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> Result<C, prometheus::Error> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        colony_process::trace::register(&registry)?;
        let gauge = |name: &str, help: &str| register(&registry, IntGauge::new(name, help)?);
        let latency = |name: &str, help: &str| {
            let buckets = vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            register(
                &registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?,
            )
        };
        Ok(Metrics {
            raft_term: gauge("colony_raft_term", "Current Raft term.")?,
            raft_is_leader: gauge("colony_raft_is_leader", "1 when this server is the leader.")?,
            raft_commit_index: gauge(
                "colony_raft_commit_index",
                "Last log index known committed.",
            )?,
            raft_applied_index: gauge(
                "colony_raft_applied_index",
                "Last log index applied to the state machine.",
            )?,
            raft_last_log_index: gauge(
                "colony_raft_last_log_index",
                "Last log index in this server's log.",
            )?,
            raft_snapshot_index: gauge(
                "colony_raft_snapshot_index",
                "Last log index covered by the latest snapshot.",
            )?,
            raft_leader_changes: register(
                &registry,
                IntCounter::new(
                    "colony_raft_leader_changes_total",
                    "Times this server saw a new leader.",
                )?,
            )?,
            raft_log_entries: gauge(
                "colony_raft_log_entries",
                "Entries in this server's Raft log after the last purge.",
            )?,
            raft_snapshots_built: register(
                &registry,
                IntCounter::new(
                    "colony_raft_snapshots_built_total",
                    "Snapshots this server built.",
                )?,
            )?,
            raft_snapshots_installed: register(
                &registry,
                IntCounter::new(
                    "colony_raft_snapshots_installed_total",
                    "Snapshots received from a leader and installed.",
                )?,
            )?,
            raft_snapshot_build_seconds: latency(
                "colony_raft_snapshot_build_seconds",
                "Building, writing and fsyncing one snapshot.",
            )?,
            raft_snapshot_bytes: gauge(
                "colony_raft_snapshot_bytes",
                "Size of the latest snapshot built or installed.",
            )?,
            raft_proposal_seconds: latency(
                "colony_raft_proposal_seconds",
                "Time from proposing a Raft entry to its being applied.",
            )?,
            raft_proposal_commands: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "colony_raft_proposal_commands",
                        "Client commands batched into one Raft entry.",
                    )
                    .buckets(prometheus::exponential_buckets(1.0, 4.0, 7)?),
                )?,
            )?,
            raft_proposals_failed: register(
                &registry,
                IntCounter::new(
                    "colony_raft_proposals_failed_total",
                    "Raft entries that failed to commit.",
                )?,
            )?,
            submit_seconds: latency(
                "colony_task_submit_seconds",
                "Task submissions on the leader, from arrival to commit.",
            )?,
            agent_communication_seconds: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "colony_agent_communication_seconds",
                        "Round-trip time of messages between agents.",
                    )
                    .buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 0.5, 1.0,
                    ]),
                    &["source", "destination"],
                )?,
            )?,
            quic_connections: gauge(
                "colony_quic_connections",
                "Executor QUIC connections open on this server.",
            )?,
            quic_errors: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "colony_quic_errors_total",
                        "Executor QUIC connections that failed, by kind.",
                    ),
                    &["kind"],
                )?,
            )?,
            scheduling_attempts: register(
                &registry,
                IntCounter::new(
                    "colony_scheduling_attempts_total",
                    "Placements the scheduler proposed.",
                )?,
            )?,
            scheduling_rejections: register(
                &registry,
                IntCounter::new(
                    "colony_scheduling_rejections_total",
                    "Proposed placements refused at commit (the state had changed).",
                )?,
            )?,
            blocked_shapes: register(
                &registry,
                IntGauge::new(
                    "colony_scheduler_blocked_shapes",
                    "Task shapes that found no room, skipped until capacity, labels or capabilities change.",
                )?,
            )?,
            reports_refused: register(
                &registry,
                IntCounter::new(
                    "colony_reports_refused_total",
                    "Executor status reports refused (invalid, or stale at commit) and answered so.",
                )?,
            )?,
            placements: register(
                &registry,
                IntCounter::new("colony_placements_total", "Placements committed.")?,
            )?,
            preemptions: register(
                &registry,
                IntCounter::new(
                    "colony_preemptions_total",
                    "Attempts evicted to make room for higher priority.",
                )?,
            )?,
            task_retries: register(
                &registry,
                IntCounter::new(
                    "colony_task_retries_total",
                    "Attempts lost with an executor and retried.",
                )?,
            )?,
            executors_marked_down: register(
                &registry,
                IntCounter::new(
                    "colony_executors_marked_down_total",
                    "Executors this leader declared down.",
                )?,
            )?,
            backups: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "colony_backups_total",
                        "Scheduled backups this server wrote as leader, by outcome.",
                    ),
                    &["outcome"],
                )?,
            )?,
            backup_last_success: register(
                &registry,
                prometheus::Gauge::new(
                    "colony_backup_last_success_timestamp_seconds",
                    "When this server last wrote a good scheduled backup (unix seconds; 0: never).",
                )?,
            )?,
            backup_interval: register(
                &registry,
                prometheus::Gauge::new(
                    "colony_backup_interval_seconds",
                    "The scheduled backup interval (0: scheduled backups are off).",
                )?,
            )?,
            retention_removed: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "colony_retention_removed_total",
                        "What this leader's retention removed, by kind.",
                    ),
                    &["kind"],
                )?,
            )?,
            placement_seconds: latency(
                "colony_task_placement_seconds",
                "From submission to the first assignment's commit.",
            )?,
            scheduling_round_seconds: latency(
                "colony_scheduling_round_seconds",
                "One scheduling round: plan, commit, push.",
            )?,
            executors: register(
                &registry,
                IntGaugeVec::new(Opts::new("colony_executors", "Executors by state."), &["state"])?,
            )?,
            executors_connected: gauge(
                "colony_executors_connected",
                "Executors with a session on this server (the leader).",
            )?,
            executor_heartbeat_age_max: register(
                &registry,
                prometheus::Gauge::new(
                    "colony_executor_heartbeat_age_seconds_max",
                    "The oldest heartbeat among connected executors.",
                )?,
            )?,
            resource_utilization: register(
                &registry,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "colony_resource_utilization",
                        "Allocated over capacity, 0..1, across up executors.",
                    ),
                    &["resource_type", "agent"],
                )?,
            )?,
            allocation_efficiency: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "colony_allocation_efficiency",
                        "Per executor, allocated over capacity, observed at each scrape.",
                    )
                    .buckets(vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
                    &["resource_type"],
                )?,
            )?,
            tasks_pending: gauge(
                "colony_tasks_pending",
                "Tasks waiting to be placed (queue depth).",
            )?,
            tasks: register(
                &registry,
                IntGaugeVec::new(Opts::new("colony_tasks", "Tasks by state."), &["state"])?,
            )?,
            topics: gauge("colony_topics", "Topics and mailboxes in the replicated state.")?,
            messages: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "colony_messages",
                        "Messages kept in topics (kept), their payload bytes (bytes), and deliveries awaiting an ack (in_flight).",
                    ),
                    &["state"],
                )?,
            )?,
            system_health: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new("colony_system_health", "1 for the component's current status."),
                    &["component", "status"],
                )?,
            )?,
            registry,
        })
    }

    /// The text exposition, with the state-derived gauges brought up to date first.
    pub fn render(&self, scrape: &Scrape<'_>) -> Result<String, prometheus::Error> {
        let (counts, ready) = {
            let mut by_state: std::collections::BTreeMap<&str, i64> =
                colony_core::ExecutorState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
            let (mut capacity, mut allocated) =
                (colony_core::Resources::default(), colony_core::Resources::default());
            for executor in scrape.machine.executors() {
                *by_state.entry(executor.state.as_str()).or_default() += 1;
                if executor.state == colony_core::ExecutorState::Up {
                    capacity.add(&executor.spec.capacity);
                    allocated.add(&executor.allocated);
                    for (kind, used, total) in
                        resource_pairs(&executor.allocated, &executor.spec.capacity)
                    {
                        if total > 0.0 {
                            self.allocation_efficiency
                                .with_label_values(&[kind])
                                .observe(used / total);
                        }
                    }
                }
            }
            for (executor_state, count) in by_state {
                self.executors.with_label_values(&[executor_state]).set(count);
            }
            for (kind, used, total) in resource_pairs(&allocated, &capacity) {
                self.resource_utilization
                    .with_label_values(&[kind, "cluster"])
                    .set(if total > 0.0 { used / total } else { 0.0 });
            }
            (scrape.machine.count_by_state(), scrape.leader_known)
        };
        let stats = scrape.snapshot_stats;
        let catch_up =
            |counter: &IntCounter, total: u64| counter.inc_by(total.saturating_sub(counter.get()));
        catch_up(
            &self.raft_snapshots_built,
            stats.built.load(std::sync::atomic::Ordering::Relaxed),
        );
        catch_up(
            &self.raft_snapshots_installed,
            stats.installed.load(std::sync::atomic::Ordering::Relaxed),
        );
        for micros in stats.take_build_micros() {
            self.raft_snapshot_build_seconds.observe(micros as f64 / 1e6);
        }
        self.raft_snapshot_bytes
            .set(stats.last_bytes.load(std::sync::atomic::Ordering::Relaxed) as i64);
        self.executors_connected.set(scrape.executors_connected as i64);
        self.executor_heartbeat_age_max.set(scrape.heartbeat_age_max.as_secs_f64());
        for (state, count) in &counts {
            self.tasks.with_label_values(&[state.as_str()]).set(*count as i64);
        }
        self.tasks_pending
            .set(counts.get(&colony_core::TaskState::Pending).copied().unwrap_or(0) as i64);
        let totals = scrape.machine.messaging().totals();
        self.topics.set(totals.topics as i64);
        self.messages.with_label_values(&["kept"]).set(totals.messages as i64);
        self.messages.with_label_values(&["bytes"]).set(totals.bytes as i64);
        self.messages.with_label_values(&["in_flight"]).set(totals.in_flight as i64);
        let (up, down) = if ready { (1, 0) } else { (0, 1) };
        self.system_health.with_label_values(&["server", "healthy"]).set(up);
        self.system_health.with_label_values(&["server", "degraded"]).set(down);
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

fn resource_pairs(
    used: &colony_core::Resources,
    total: &colony_core::Resources,
) -> [(&'static str, f64, f64); 3] {
    [
        ("cpu", used.cpu_millis as f64, total.cpu_millis as f64),
        ("memory", used.memory_bytes as f64, total.memory_bytes as f64),
        ("gpu", f64::from(used.gpus), f64::from(total.gpus)),
    ]
}
