//! What only the leader does: create the cluster CA once, run scheduling rounds (placements,
//! preemptions, deadlines, drain deadlines), and declare executors down when they fall silent.
//! Runs while this server leads and is aborted when it stops leading.

use crate::node::{unix_ms, Node};
use colony_core::scheduler::{plan_with, Oracle, PlanConfig};
use colony_core::{ClusterCaRecord, Command, CommandError, ExecutorSpec, ExecutorState, ModelVersion, Outcome, TaskSpec};
use colony_model::Predictor;
use colony_quic::ClusterCa;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rounds also run on this tick, for backoffs, deadlines and drain deadlines that pass quietly.
const SCHEDULE_TICK: Duration = Duration::from_millis(100);
const DETECTOR_TICK: Duration = Duration::from_millis(250);

pub async fn run(node: Arc<Node>) {
    let leader_since = Instant::now();
    tracing::info!("leading: scheduler and failure detector started");
    ensure_ca(&node).await;
    let config = PlanConfig { preemption_priority_gap_min: node.config.preemption_priority_gap_min, ..PlanConfig::default() };
    let mut model = CurrentModel::default();
    // Two loops, polled together: a long run of scheduling rounds never delays failure detection.
    let scheduling = async {
        loop {
            tokio::select! {
                _ = node.scheduler_wake.notified() => {}
                _ = tokio::time::sleep(SCHEDULE_TICK) => {}
            }
            // Keep going while rounds fill up: a deep queue drains without waiting for ticks.
            while schedule_round(&node, &config, &mut model).await {}
        }
    };
    let detecting = async {
        let mut detector = tokio::time::interval(DETECTOR_TICK);
        loop {
            detector.tick().await;
            detect_down(&node, leader_since).await;
        }
    };
    tokio::join!(scheduling, detecting);
}

/// The bootstrap leader creates the CA; later leaders find it in the state.
async fn ensure_ca(node: &Node) {
    loop {
        if node.state().machine.ca().is_some() {
            return;
        }
        let ca = match ClusterCa::generate(&node.cluster_id) {
            Ok(ca) => ca,
            Err(e) => {
                tracing::error!("cannot create the cluster CA: {e}");
                return;
            }
        };
        let record = ClusterCaRecord { cert_pem: ca.cert_pem().to_owned(), key_pem: ca.key_pem().to_owned() };
        match node.proposer.propose(Command::InitCa(record)).await {
            Ok(_) => {
                tracing::info!("created the cluster CA");
                return;
            }
            Err(crate::proposer::ProposeError::Rejected(CommandError::CaExists)) => return,
            Err(e) => {
                tracing::warn!("cannot commit the cluster CA yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// One round: plan against the applied state, commit, push assignments. Returns whether the
/// round was full (more work is probably waiting).
async fn schedule_round(node: &Node, config: &PlanConfig, model: &mut CurrentModel) -> bool {
    let started = Instant::now();
    let plan = {
        let state = node.state();
        let now = unix_ms().max(state.machine.now_unix_ms());
        model.refresh(&state.machine, now, node.config.model_stale_after);
        match &model.predictor {
            Some((_, predictor)) => plan_with(&state.machine, now, config, &Predictions(predictor)),
            None => plan_with(&state.machine, now, config, &colony_core::scheduler::NoModel),
        }
    };
    if plan.is_empty() {
        return false;
    }
    let full = plan.placements.len() >= config.placements_max;
    let metrics = &node.metrics;
    metrics.scheduling_attempts.inc_by(plan.placements.len() as u64);
    let mut commands = Vec::new();
    if !plan.expire.is_empty() {
        commands.push(Command::ExpireTasks { ids: plan.expire });
    }
    if !plan.drain_evictions.is_empty() {
        commands.push(Command::EvictTasks { ids: plan.drain_evictions, reason: "drain deadline passed".to_owned() });
    }
    if !plan.placements.is_empty() || !plan.unschedulable.is_empty() {
        commands.push(Command::PlaceTasks { placements: plan.placements, unschedulable: plan.unschedulable });
    }
    let results = futures::future::join_all(commands.into_iter().map(|c| node.proposer.propose(c))).await;
    let now = unix_ms();
    for result in results {
        match result {
            Ok(Outcome::Placed { assigned, evicted, rejected }) => {
                metrics.scheduling_rejections.inc_by(rejected.len() as u64);
                metrics.preemptions.inc_by(evicted.len() as u64);
                metrics.placements.inc_by(assigned.len() as u64);
                {
                    let state = node.state();
                    for a in assigned.iter().filter(|a| a.attempt == 1) {
                        if let Some(task) = state.machine.get_task(a.task) {
                            metrics.placement_seconds.observe(now.saturating_sub(task.created_unix_ms) as f64 / 1000.0);
                        }
                    }
                }
                node.sessions.kill_superseded(node, &evicted, "preempted by a higher-priority task");
                node.sessions.assign(node, &assigned);
                for (task, why) in rejected {
                    tracing::debug!(task_id = %task, "placement refused at commit: {why}");
                }
            }
            Ok(Outcome::Expired { ids }) if !ids.is_empty() => tracing::info!(count = ids.len(), "tasks timed out before starting"),
            Ok(Outcome::Evicted { ids }) if !ids.is_empty() => {
                node.sessions.kill_superseded(node, &ids, "the drain deadline passed");
                tracing::info!(count = ids.len(), "attempts evicted at a drain deadline");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("scheduling round not committed: {e}");
                return false;
            }
        }
    }
    metrics.scheduling_round_seconds.observe(started.elapsed().as_secs_f64());
    full
}

/// Declares down every up or draining executor the leader has not heard from within the
/// heartbeat timeout. A new leader first waits out a grace period, so that executors can find it.
async fn detect_down(node: &Node, leader_since: Instant) {
    let (timeout, grace) = (node.config.executor_heartbeat_timeout, node.config.executor_leader_grace);
    if leader_since.elapsed() < grace {
        return;
    }
    let heartbeats = node.sessions.last_heartbeats();
    let silent: Vec<(colony_core::ExecutorId, Duration)> = {
        let state = node.state();
        state
            .machine
            .executors()
            .filter(|e| matches!(e.state, ExecutorState::Up | ExecutorState::Draining))
            .filter_map(|e| {
                let last = heartbeats.get(&e.id).copied().unwrap_or(leader_since);
                let silence = last.elapsed();
                (silence > timeout).then_some((e.id, silence))
            })
            .collect()
    };
    for (id, silence) in silent {
        let reason = format!("no heartbeat for {:.1}s", silence.as_secs_f64());
        match node.proposer.propose(Command::MarkExecutorDown { id, reason: reason.clone() }).await {
            Ok(Outcome::MarkedDown { rescheduled, lost, .. }) => {
                // A connected but silent executor must reconnect and register again to come back.
                node.sessions.close(id, "declared down");
                node.metrics.executors_marked_down.inc();
                node.metrics.task_retries.inc_by(rescheduled.len() as u64);
                tracing::warn!(executor_id = %id, rescheduled = rescheduled.len(), lost = lost.len(), "executor declared down: {reason}");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(executor_id = %id, "cannot declare the executor down: {e}"),
        }
    }
}

/// The registry's current model, decoded once per version. No model, a stale one (older than
/// `--model-stale-after`) or one that does not decode means declared resources and default order.
#[derive(Default)]
struct CurrentModel {
    predictor: Option<(ModelVersion, Predictor)>,
    /// The version last looked at, decodable or not, so a bad one is logged once.
    seen: Option<ModelVersion>,
}

impl CurrentModel {
    fn refresh(&mut self, state: &colony_core::StateMachine, now_unix_ms: u64, stale_after: Duration) {
        let Some(record) = state.current_model() else {
            self.predictor = None;
            self.seen = None;
            return;
        };
        if now_unix_ms.saturating_sub(record.created_unix_ms) > stale_after.as_millis() as u64 {
            if self.predictor.take().is_some() {
                tracing::info!(version = %record.version, "the current model is stale; scheduling on declared resources");
            }
            return;
        }
        if self.seen == Some(record.version) {
            return;
        }
        self.seen = Some(record.version);
        match Predictor::from_model(&record.feature_schema, &record.weights) {
            Ok(predictor) => {
                tracing::info!(version = %record.version, "scheduling with model");
                self.predictor = Some((record.version, predictor));
            }
            Err(e) => {
                tracing::warn!(version = %record.version, "the current model cannot be used: {e}");
                self.predictor = None;
            }
        }
    }
}

struct Predictions<'a>(&'a Predictor);

impl Oracle for Predictions<'_> {
    fn peak_memory_bytes(&self, task: &TaskSpec, executor: &ExecutorSpec) -> Option<f64> {
        Some(self.0.predict(task, Some(executor)).peak_memory_bytes)
    }

    fn runtime_ms(&self, task: &TaskSpec, executor: &ExecutorSpec) -> Option<f64> {
        Some(self.0.predict(task, Some(executor)).runtime_ms)
    }
}
