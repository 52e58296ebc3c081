//! What only the leader does, as I/O around `colony_core::leader`: create the cluster CA once,
//! run scheduling rounds (plan, propose, hand the outcomes to the leader component), and tick the
//! failure detector. Runs while this server leads and is aborted when it stops leading.

use crate::node::Node;
use crate::proposer::ProposeError;
use colony_core::leader::{round_commands, ModelDecision, ModelTracker};
use colony_core::scheduler::{plan_remembering, Blocked, NoModel, Oracle, PlanConfig};
use colony_core::{
    ClusterCaRecord, Command, CommandError, ExecutorSpec, ModelVersion, Outcome, TaskSpec,
};
use colony_model::Predictor;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rounds also run on this tick, for backoffs, deadlines and drain deadlines that pass quietly.
const SCHEDULE_TICK: Duration = Duration::from_millis(100);
const DETECTOR_TICK: Duration = Duration::from_millis(250);
/// How long to wait before proposing the cluster CA again after a failed commit.
const CA_RETRY: Duration = Duration::from_millis(500);
/// The least time between the end of one run of scheduling rounds and the next.
const ROUND_PAUSE: Duration = Duration::from_millis(5);
/// How often the leader looks for something retention should remove.
const RETENTION_TICK: Duration = Duration::from_secs(1);

pub async fn run(node: Arc<Node>) {
    tracing::info!("leading: scheduler and failure detector started");
    ensure_ca(&node).await;
    let config = PlanConfig {
        preemption_priority_gap_min: node.config().preemption_priority_gap_min,
        ..PlanConfig::default()
    };
    let mut model = CurrentModel::default();
    // Task shapes that found no room, kept while this server leads (as Nomad's blocked
    // evaluations are): skipped until capacity, labels or capabilities change.
    let mut blocked = Blocked::default();
    // Two loops, polled together: a long run of scheduling rounds never delays failure detection.
    let scheduling = async {
        loop {
            tokio::select! {
                _ = node.scheduler_woken() => {}
                _ = tokio::time::sleep(SCHEDULE_TICK) => {}
            }
            // Keep going while rounds fill up: a deep queue drains without waiting for ticks.
            while schedule_round(&node, &config, &mut model, &mut blocked).await {}
            // The last round placed what it could. Without a pause, a stream of submissions that
            // nothing can place yet (no executor, or not enough room) would wake a round per
            // submission, each scanning the same unplaceable head of the queue: a busy loop that
            // takes the CPU the submissions need. A wake-up during the pause is kept (Notify
            // stores one), so a placeable task waits at most this long.
            tokio::time::sleep(ROUND_PAUSE).await;
        }
    };
    let detecting = async {
        let mut detector = tokio::time::interval(DETECTOR_TICK);
        loop {
            detector.tick().await;
            let effects = {
                let state = node.state();
                node.sessions().tick(&state.machine)
            };
            node.perform(effects).await;
        }
    };
    tokio::join!(scheduling, detecting, collect_garbage(&node), back_up(&node));
}

/// Scheduled backups, while leading: one at once, then one every `--backup-interval`, each
/// written atomically into `--backup-dir`, keeping the newest `--backup-keep`.
async fn back_up(node: &Arc<Node>) {
    let Some(dir) = node.config().backup_dir.clone() else { return };
    let mut tick = tokio::time::interval(node.config().backup_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (writer, into) = (node.clone(), dir.clone());
        let written = tokio::task::spawn_blocking(move || write_backup(&writer, &into)).await;
        let metrics = node.metrics();
        match written {
            Ok(Ok(path)) => {
                metrics.backups.with_label_values(&["ok"]).inc();
                metrics.backup_last_success.set(colony_process::unix_ms() as f64 / 1000.0);
                tracing::info!(path = %path.display(), "wrote a scheduled backup");
            }
            Ok(Err(e)) => {
                metrics.backups.with_label_values(&["failed"]).inc();
                tracing::error!("scheduled backup into {} failed: {e:#}", dir.display());
            }
            Err(e) => {
                metrics.backups.with_label_values(&["failed"]).inc();
                tracing::error!("scheduled backup task failed: {e}");
            }
        }
    }
}

/// Backup files are named by when they were taken, so their names sort oldest first.
const BACKUP_PREFIX: &str = "colony-backup-";
const BACKUP_SUFFIX: &str = ".snap";

fn write_backup(node: &Node, dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    colony_process::private_dir(dir).with_context(|| format!("cannot use {}", dir.display()))?;
    let bytes = node.backup()?;
    let path = dir.join(format!("{BACKUP_PREFIX}{:013}{BACKUP_SUFFIX}", colony_process::unix_ms()));
    colony_store::backup::write_atomically(&path, &bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let mut kept: Vec<std::path::PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(BACKUP_PREFIX) && n.ends_with(BACKUP_SUFFIX))
        })
        .collect();
    kept.sort();
    let excess = kept.len().saturating_sub(node.config().backup_keep);
    for old in &kept[..excess] {
        std::fs::remove_file(old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(path)
}

/// Retention: when the applied state holds something the policy says to remove, propose
/// `Collect` (again at once while a command reports `more`). An idle cluster writes nothing.
async fn collect_garbage(node: &Node) {
    let retention = node.config().retention;
    let mut tick = tokio::time::interval(RETENTION_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let due = node.state().machine.collectable(&retention, colony_process::unix_ms());
        if !due {
            continue;
        }
        loop {
            let collected = match node.propose(Command::Collect(retention)).await {
                Ok(Outcome::Collected(collected)) => collected,
                Ok(other) => {
                    tracing::warn!("retention committed with an unexpected outcome: {other:?}");
                    break;
                }
                Err(e) => {
                    tracing::warn!("retention not committed: {e}");
                    break;
                }
            };
            let removed = &node.metrics().retention_removed;
            removed.with_label_values(&["tasks"]).inc_by(collected.tasks.len() as u64);
            removed.with_label_values(&["executors"]).inc_by(collected.executors.len() as u64);
            removed.with_label_values(&["acl_tokens"]).inc_by(collected.acl_tokens);
            removed.with_label_values(&["join_tokens"]).inc_by(collected.join_tokens);
            if !collected.executors.is_empty() {
                tracing::info!(executors = ?collected.executors, "removed executors down too long");
            }
            tracing::debug!(
                tasks = collected.tasks.len(),
                held = collected.held,
                more = collected.more,
                "retention"
            );
            if !collected.more {
                break;
            }
        }
    }
}

/// The server that bootstrapped the cluster created the CA (its own certificate is signed by it);
/// as the first leader it replicates it, so any later leader can sign certificates. Other
/// servers find it in the state.
async fn ensure_ca(node: &Node) {
    loop {
        if node.state().machine.ca().is_some() {
            return;
        }
        let Some((cert_pem, key_pem)) = node.local_ca() else {
            tracing::warn!("leading, but the cluster CA is not replicated here yet; waiting");
            tokio::time::sleep(CA_RETRY).await;
            continue;
        };
        match node.propose(Command::InitCa(ClusterCaRecord { cert_pem, key_pem })).await {
            Ok(_) => {
                tracing::info!("replicated the cluster CA");
                return;
            }
            Err(ProposeError::Rejected(CommandError::CaExists)) => return,
            Err(e) => {
                tracing::warn!("cannot commit the cluster CA yet: {e}");
                tokio::time::sleep(CA_RETRY).await;
            }
        }
    }
}

/// One round: plan against the applied state, commit, and let the leader component send the
/// assignments and kills. Returns whether the round was full (more work is probably waiting).
async fn schedule_round(
    node: &Node,
    config: &PlanConfig,
    model: &mut CurrentModel,
    blocked: &mut Blocked,
) -> bool {
    let started = Instant::now();
    let plan = {
        let state = node.state();
        let now = colony_process::unix_ms().max(state.machine.now_unix_ms());
        model.refresh(&state.machine, now, node.config().model_stale_after);
        let oracle: &dyn Oracle = match &model.predictor {
            Some(predictor) => &Predictions(predictor),
            None => &NoModel,
        };
        plan_remembering(&state.machine, now, config, oracle, blocked)
    };
    node.metrics().blocked_shapes.set(blocked.len() as i64);
    if plan.is_empty() {
        return false;
    }
    let full = plan.placements.len() >= config.placements_max;
    let metrics = node.metrics();
    metrics.scheduling_attempts.inc_by(plan.placements.len() as u64);
    let results =
        futures::future::join_all(round_commands(plan).into_iter().map(|c| node.propose(c))).await;
    let now = colony_process::unix_ms();
    for result in results {
        match result {
            Ok(Outcome::Placed { assigned, evicted, rejected }) => {
                metrics.scheduling_rejections.inc_by(rejected.len() as u64);
                metrics.preemptions.inc_by(evicted.len() as u64);
                metrics.placements.inc_by(assigned.len() as u64);
                let state = node.state();
                for a in assigned.iter().filter(|a| a.attempt == 1) {
                    if let Some(task) = state.machine.get_task(a.task) {
                        metrics
                            .placement_seconds
                            .observe(now.saturating_sub(task.created_unix_ms) as f64 / 1000.0);
                    }
                }
                for (task, why) in rejected {
                    tracing::debug!(task_id = %task, "placement refused at commit: {why}");
                }
            }
            Ok(Outcome::Expired { ids }) if !ids.is_empty() => {
                tracing::info!(count = ids.len(), "tasks timed out before starting")
            }
            Ok(Outcome::Evicted { ids }) if !ids.is_empty() => {
                tracing::info!(count = ids.len(), "attempts evicted at a drain deadline")
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

/// The model the scheduler uses, decoded once per version; `ModelTracker` decides when.
#[derive(Default)]
struct CurrentModel {
    tracker: ModelTracker,
    predictor: Option<Predictor>,
}

impl CurrentModel {
    fn refresh(
        &mut self,
        state: &colony_core::StateMachine,
        now_unix_ms: u64,
        stale_after: Duration,
    ) {
        let current = state.current_model();
        match self.tracker.refresh(current, now_unix_ms, stale_after) {
            ModelDecision::NoModel => self.predictor = None,
            ModelDecision::Stale { version, was_in_use } => {
                self.predictor = None;
                if was_in_use {
                    tracing::info!(%version, "the current model is stale; scheduling on declared resources");
                }
            }
            ModelDecision::Keep => {}
            ModelDecision::Decode(version) => {
                let Some(record) = current else { return };
                self.predictor = decode(version, &record.feature_schema, &record.weights);
                self.tracker.decoded(version, self.predictor.is_some());
            }
        }
    }
}

fn decode(version: ModelVersion, feature_schema: &str, weights: &[u8]) -> Option<Predictor> {
    match Predictor::from_model(feature_schema, weights) {
        Ok(predictor) => {
            tracing::info!(%version, "scheduling with model");
            Some(predictor)
        }
        Err(e) => {
            tracing::warn!(%version, "the current model cannot be used: {e}");
            None
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
