//! The placement algorithm: which pending tasks go to which executors, which tasks must be
//! evicted to make room, and which fit nowhere. Pure: the leader runs it against its applied
//! state and proposes the result, and `apply` re-validates every placement, so a plan made
//! against a stale state can be refused but can never over-commit.

use crate::executor::{Executor, ExecutorSpec, ExecutorState};
use crate::ids::{ExecutorId, TaskId};
use crate::resources::Resources;
use crate::state_machine::{constraint_mismatch, Placement, StateMachine};
use crate::task::{PlacementPolicy, Task, TaskSpec};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

/// What the leader knows beyond the state: the current model's predictions. The planner uses
/// them to choose, and what it chooses travels in the log, so replicas never predict.
pub trait Oracle {
    /// Predicted peak memory of the task on an executor like `executor`, in bytes.
    fn peak_memory_bytes(&self, task: &TaskSpec, executor: &ExecutorSpec) -> Option<f64>;
    /// Predicted runtime of the task on an executor like `executor`, in milliseconds.
    fn runtime_ms(&self, task: &TaskSpec, executor: &ExecutorSpec) -> Option<f64>;
}

/// No model: declared resources and the default order.
pub struct NoModel;

impl Oracle for NoModel {
    fn peak_memory_bytes(&self, _: &TaskSpec, _: &ExecutorSpec) -> Option<f64> {
        None
    }

    fn runtime_ms(&self, _: &TaskSpec, _: &ExecutorSpec) -> Option<f64> {
        None
    }
}

/// Bounds on one scheduling round.
#[derive(Clone, Debug)]
pub struct PlanConfig {
    pub placements_max: usize,
    /// Pending tasks examined at most, so a deep queue on a full cluster costs bounded time.
    pub scan_max: usize,
    /// Stop scanning after this many tasks in a row found no room: the cluster is full.
    pub misses_in_a_row_max: usize,
    /// A task may evict tasks whose priority is at least this much lower; 0 disables preemption.
    pub preemption_priority_gap_min: u16,
    /// Placements with evictions in one round, at most.
    pub preemptions_max: usize,
    /// A `memory_auto` task gets the predicted peak times this (and at least the floor).
    pub memory_auto_margin: f64,
    /// What a `memory_auto` task gets when no model can predict.
    pub memory_auto_fallback_bytes: u64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            placements_max: 4096,
            scan_max: 16_384,
            misses_in_a_row_max: 512,
            preemption_priority_gap_min: 100,
            preemptions_max: 64,
            memory_auto_margin: 1.25,
            memory_auto_fallback_bytes: 512 << 20,
        }
    }
}

/// What the leader proposes after one round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub placements: Vec<Placement>,
    /// Pending tasks no executor could ever run, with the reason; only where the reason changed.
    pub unschedulable: Vec<(TaskId, String)>,
    /// Tasks past their deadline that never started.
    pub expire: Vec<TaskId>,
    /// Attempts on draining executors whose drain deadline has passed.
    pub drain_evictions: Vec<TaskId>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.placements.is_empty()
            && self.unschedulable.is_empty()
            && self.expire.is_empty()
            && self.drain_evictions.is_empty()
    }
}

/// Task shapes that found no room, kept between scheduling rounds so that a queue of tasks no
/// executor can take costs one check per shape instead of one per task, and never holds back a
/// task that fits (Nomad's blocked evaluations). The leader keeps one while it leads and passes
/// it to every [`plan_remembering`].
///
/// A shape is what decides whether a task can be placed: its request as sized for the round,
/// the labels and capabilities it requires, and its priority (which decides what it may
/// preempt). A round forgets a shape when it could have become placeable:
/// - every shape, when the up executors or any of their specs (capacity, labels, capabilities)
///   differ from what the last round saw;
/// - every shape that fits some executor's capacity, when any up executor has more free room in
///   any resource than the last round left it (the last round's own placements and evictions
///   counted). Shapes no executor could run even empty stay: free room cannot help them;
/// - every shape that fits some executor's capacity and could preempt (preemption on and its
///   priority at least the gap), after each round. A new victim can arrive with free room
///   unchanged (a task finishes as another leader's assignment of the same size lands), and
///   seeing that takes a look at every running task, which this bookkeeping exists to avoid.
///   Within a round they are still judged once per shape.
///
/// Checking is O(up executors) per round and one hash lookup per task.
#[derive(Debug, Default)]
pub struct Blocked {
    /// Shapes by a hash of their fields. A bucket holds the full shapes and a lookup compares
    /// every field, so a hash collision can never skip a task of another shape.
    shapes: HashMap<u64, Vec<BlockedShape>>,
    count: usize,
    /// The up executors in id order as the last round left them; empty while nothing is kept.
    executors: Vec<Mark>,
    skipped: usize,
}

/// What a round found for a shape.
#[derive(Debug)]
enum Verdict {
    /// No up executor could run it even empty; the reason every task of the shape is given.
    NeverFits(String),
    /// Some executor could run it, but none had room and it could evict nothing.
    NoRoom,
}

#[derive(Debug)]
struct BlockedShape {
    request: Resources,
    labels: BTreeMap<String, String>,
    capabilities: BTreeSet<String>,
    priority: u16,
    verdict: Verdict,
}

/// An up executor as the last round left it.
#[derive(Debug)]
struct Mark {
    id: ExecutorId,
    spec: ExecutorSpec,
    free: Resources,
}

/// The hash of a task's shape, computed without allocating. `DefaultHasher::new` has fixed
/// keys, so a shape hashes alike in every round; the hash only finds a bucket, and nothing
/// iterates the map into a plan.
fn shape_hash(request: &Resources, spec: &TaskSpec) -> u64 {
    let mut hasher = DefaultHasher::new();
    request.cpu_millis.hash(&mut hasher);
    request.memory_bytes.hash(&mut hasher);
    request.gpus.hash(&mut hasher);
    request.custom.hash(&mut hasher);
    spec.labels.hash(&mut hasher);
    spec.capabilities.hash(&mut hasher);
    spec.priority.hash(&mut hasher);
    hasher.finish()
}

/// Whether a task of `priority` could evict anything at all, even a priority-0 task.
fn may_preempt(priority: u16, config: &PlanConfig) -> bool {
    config.preemption_priority_gap_min > 0
        && config.preemptions_max > 0
        && priority >= config.preemption_priority_gap_min
}

/// Whether `shape` may be kept into the next round by its verdict and priority alone.
fn keeps(shape: &BlockedShape, config: &PlanConfig) -> bool {
    match shape.verdict {
        Verdict::NeverFits(_) => true,
        Verdict::NoRoom => !may_preempt(shape.priority, config),
    }
}

impl Blocked {
    /// How many shapes are blocked.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// How many tasks the last round skipped because their shape was blocked.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    fn find(&self, hash: u64, request: &Resources, spec: &TaskSpec) -> Option<&Verdict> {
        let bucket = self.shapes.get(&hash)?;
        let shape = bucket.iter().find(|shape| {
            shape.priority == spec.priority
                && shape.request == *request
                && shape.labels == spec.labels
                && shape.capabilities == spec.capabilities
        })?;
        Some(&shape.verdict)
    }

    /// Adds a shape the round found blocked; the caller looked it up first, so it is new.
    fn insert(&mut self, hash: u64, request: Resources, spec: &TaskSpec, verdict: Verdict) {
        self.shapes.entry(hash).or_default().push(BlockedShape {
            request,
            labels: spec.labels.clone(),
            capabilities: spec.capabilities.clone(),
            priority: spec.priority,
            verdict,
        });
        self.count += 1;
    }

    fn retain(&mut self, keep: impl Fn(&BlockedShape) -> bool) {
        self.shapes.retain(|_, bucket| {
            bucket.retain(&keep);
            !bucket.is_empty()
        });
        self.count = self.shapes.values().map(Vec::len).sum();
    }

    /// Forgets the shapes free room could help.
    fn forget_no_room(&mut self) {
        self.retain(|shape| matches!(shape.verdict, Verdict::NeverFits(_)));
    }

    /// Before a round: forgets what could have become placeable since the last one.
    fn revalidate(&mut self, candidates: &[Candidate], config: &PlanConfig) {
        self.skipped = 0;
        let same_executors = self.executors.len() == candidates.len()
            && self.executors.iter().zip(candidates).all(|(mark, candidate)| {
                mark.id == candidate.executor.id && mark.spec == candidate.executor.spec
            });
        if !same_executors {
            self.shapes.clear();
            self.count = 0;
            self.executors.clear();
            return;
        }
        let grew = self
            .executors
            .iter()
            .zip(candidates)
            .any(|(mark, candidate)| !candidate.free.fits_in(&mark.free));
        if grew {
            self.forget_no_room();
        }
        // The config may have changed between rounds.
        self.retain(|shape| keeps(shape, config));
    }

    /// After a round: keeps what may be carried over, and the executors it was judged against.
    fn record(&mut self, candidates: &[Candidate], config: &PlanConfig) {
        self.retain(|shape| keeps(shape, config));
        if self.is_empty() {
            self.executors.clear();
            return;
        }
        // `revalidate` left the marks either matching `candidates` one for one, or empty.
        if self.executors.len() == candidates.len() {
            for (mark, candidate) in self.executors.iter_mut().zip(candidates) {
                assert_eq!(mark.id, candidate.executor.id, "blocked marks out of step");
                mark.free.clone_from(&candidate.free);
            }
        } else {
            self.executors = candidates
                .iter()
                .map(|candidate| Mark {
                    id: candidate.executor.id,
                    spec: candidate.executor.spec.clone(),
                    free: candidate.free.clone(),
                })
                .collect();
        }
    }
}

struct Candidate<'a> {
    executor: &'a Executor,
    free: Resources,
}

/// The fraction of an executor left free after placing `request`: bin-packing picks the
/// smallest, spreading the largest.
fn leftover(candidate: &Candidate, request: &Resources) -> f64 {
    let capacity = &candidate.executor.spec.capacity;
    let share = |free: u64, want: u64, total: u64| {
        if total == 0 {
            0.0
        } else {
            free.saturating_sub(want) as f64 / total as f64
        }
    };
    share(candidate.free.cpu_millis, request.cpu_millis, capacity.cpu_millis)
        + share(candidate.free.memory_bytes, request.memory_bytes, capacity.memory_bytes)
}

/// One scheduling round at time `now_unix_ms`, without a model.
pub fn plan(state: &StateMachine, now_unix_ms: u64, config: &PlanConfig) -> Plan {
    plan_with(state, now_unix_ms, config, &NoModel)
}

/// What a task asks for this round: its declared resources, with memory sized for `memory_auto`
/// (the largest prediction over the executor classes, so it fits wherever it lands).
fn request(
    task: &Task,
    state: &StateMachine,
    config: &PlanConfig,
    oracle: &dyn Oracle,
    classes: &[&ExecutorSpec],
) -> Resources {
    let mut request = task.spec.resources.clone();
    if task.spec.memory_auto {
        let peak = classes
            .iter()
            .filter_map(|class| oracle.peak_memory_bytes(&task.spec, class))
            .fold(None, |max: Option<f64>, x| Some(max.map_or(x, |m| m.max(x))));
        let predicted =
            peak.map(|bytes| (bytes * config.memory_auto_margin).min(u64::MAX as f64) as u64);
        request.memory_bytes = predicted
            .unwrap_or(config.memory_auto_fallback_bytes)
            .max(state.limits().memory_auto_floor_bytes);
    }
    request
}

/// Executors the model cannot tell apart share a class: one prediction per class and task.
fn class_key(spec: &ExecutorSpec) -> (u64, &BTreeMap<String, String>) {
    (spec.capacity.cpu_millis, &spec.labels)
}

/// One scheduling round at time `now_unix_ms`, using `oracle`'s predictions: deadline-bound
/// tasks are ordered by their latest start (deadline minus predicted runtime) within a priority
/// and go to the executor predicted to finish them soonest; `memory_auto` tasks are sized.
/// Remembers blocked shapes within the round only (see [`plan_remembering`]).
pub fn plan_with(
    state: &StateMachine,
    now_unix_ms: u64,
    config: &PlanConfig,
    oracle: &dyn Oracle,
) -> Plan {
    let mut candidates = up_candidates(state);
    round(state, now_unix_ms, config, oracle, &mut candidates, &mut Blocked::default())
}

/// Like [`plan_with`], with the shapes that found no room in earlier rounds: a task of a shape
/// still in `blocked` once it has dropped what could have become placeable is skipped without
/// being judged again. The leader keeps one `Blocked` while it leads and passes it every round.
pub fn plan_remembering(
    state: &StateMachine,
    now_unix_ms: u64,
    config: &PlanConfig,
    oracle: &dyn Oracle,
    blocked: &mut Blocked,
) -> Plan {
    let mut candidates = up_candidates(state);
    blocked.revalidate(&candidates, config);
    let plan = round(state, now_unix_ms, config, oracle, &mut candidates, blocked);
    blocked.record(&candidates, config);
    plan
}

/// The executors that may receive work, in id order, with what each can still take.
fn up_candidates(state: &StateMachine) -> Vec<Candidate<'_>> {
    state
        .executors()
        .filter(|e| e.state == ExecutorState::Up)
        .map(|executor| Candidate { executor, free: executor.free() })
        .collect()
}

/// One round against `candidates`, skipping the tasks whose shape `blocked` holds and adding
/// the shapes that find no room.
fn round<'a>(
    state: &'a StateMachine,
    now_unix_ms: u64,
    config: &PlanConfig,
    oracle: &dyn Oracle,
    candidates: &mut [Candidate<'a>],
    blocked: &mut Blocked,
) -> Plan {
    let mut plan = Plan {
        expire: state.overdue(now_unix_ms).take(config.placements_max).collect(),
        ..Plan::default()
    };
    for executor in state.executors() {
        let due = executor.state == ExecutorState::Draining
            && executor.drain_deadline_unix_ms.is_some_and(|d| d <= now_unix_ms);
        if due {
            plan.drain_evictions.extend(executor.tasks.iter().copied());
        }
    }
    let expiring: BTreeSet<TaskId> = plan.expire.iter().copied().collect();
    let mut evicted: BTreeSet<TaskId> = BTreeSet::new();
    let mut misses = 0;
    let mut preemptions = 0;
    let mut classes: Vec<&ExecutorSpec> = Vec::new();
    for candidate in candidates.iter() {
        if !classes.iter().any(|c| class_key(c) == class_key(&candidate.executor.spec)) {
            classes.push(&candidate.executor.spec);
        }
    }
    // With no executor up every task misses, and the loop below stops after
    // `misses_in_a_row_max` of them: scanning further would only be sorted and dropped.
    let scan = match candidates.is_empty() {
        true => config.misses_in_a_row_max,
        false => config.scan_max,
    };
    let mut scanned: Vec<(&Task, Option<u64>)> = state
        .pending()
        .take(scan)
        .filter(|task| task.not_before_unix_ms <= now_unix_ms && !expiring.contains(&task.id))
        .map(|task| {
            // The latest start that still meets the deadline, on the fastest class.
            let latest_start = task.spec.deadline_unix_ms.map(|deadline| {
                let fastest = classes
                    .iter()
                    .filter_map(|c| oracle.runtime_ms(&task.spec, c))
                    .fold(f64::INFINITY, f64::min);
                let runtime = if fastest.is_finite() { fastest as u64 } else { 0 };
                deadline.saturating_sub(runtime)
            });
            (task, latest_start)
        })
        .collect();
    // Stable: priority first, as the index orders it; within a priority, least slack first.
    scanned.sort_by_key(|(task, latest_start)| {
        (std::cmp::Reverse(task.spec.priority), latest_start.unwrap_or(u64::MAX))
    });
    for (task, _) in scanned {
        if plan.placements.len() >= config.placements_max || misses >= config.misses_in_a_row_max {
            break;
        }
        let request = request(task, state, config, oracle, &classes);
        // Hashing costs a little per task, so only while some shape is blocked.
        let mut hash = None;
        if !blocked.is_empty() {
            let shape = shape_hash(&request, &task.spec);
            hash = Some(shape);
            if let Some(verdict) = blocked.find(shape, &request, &task.spec) {
                if let Verdict::NeverFits(reason) = verdict {
                    if task.reason.as_deref() != Some(reason.as_str()) {
                        plan.unschedulable.push((task.id, reason.clone()));
                    }
                }
                blocked.skipped += 1;
                continue;
            }
        }
        let memory_bytes = task.spec.memory_auto.then_some(request.memory_bytes);
        if let Some(index) = best_fit(candidates, task, &request, oracle) {
            candidates[index].free.sub(&request);
            plan.placements.push(Placement {
                task: task.id,
                executor: candidates[index].executor.id,
                evict: Vec::new(),
                memory_bytes,
            });
            misses = 0;
            continue;
        }
        let hash = hash.unwrap_or_else(|| shape_hash(&request, &task.spec));
        // Not a miss: that no executor could run it says nothing about whether the cluster is
        // full.
        if let Some(reason) = never_fits(candidates, task, &request) {
            if task.reason.as_deref() != Some(reason.as_str()) {
                plan.unschedulable.push((task.id, reason.clone()));
            }
            blocked.insert(hash, request, &task.spec, Verdict::NeverFits(reason));
            continue;
        }
        misses += 1;
        if config.preemption_priority_gap_min > 0 && preemptions < config.preemptions_max {
            if let Some((index, victims)) = preemption(
                state,
                candidates,
                task,
                &request,
                &evicted,
                config.preemption_priority_gap_min,
            ) {
                let candidate = &mut candidates[index];
                for victim in &victims {
                    if let Some(victim_task) = state.get_task(*victim) {
                        candidate.free.add(&victim_task.allocated);
                    }
                    evicted.insert(*victim);
                }
                candidate.free.sub(&request);
                plan.placements.push(Placement {
                    task: task.id,
                    executor: candidate.executor.id,
                    evict: victims,
                    memory_bytes,
                });
                preemptions += 1;
                misses = 0;
                // The victims may give back more of some resource than the task takes, so a
                // shape that found no room earlier may fit now. Preemptions per round are
                // bounded, and so is this.
                blocked.forget_no_room();
                continue;
            }
        }
        blocked.insert(hash, request, &task.spec, Verdict::NoRoom);
    }
    plan
}

/// The executor to place on: for a deadline-bound task with a model, the one predicted to finish
/// it soonest; otherwise (and among equals) by bin-packing or spreading.
fn best_fit(
    candidates: &[Candidate],
    task: &Task,
    request: &Resources,
    oracle: &dyn Oracle,
) -> Option<usize> {
    let mut best: Option<(usize, (f64, f64))> = None;
    let mut runtimes: Vec<(&ExecutorSpec, f64)> = Vec::new();
    for (index, candidate) in candidates.iter().enumerate() {
        if !request.fits_in(&candidate.free)
            || constraint_mismatch(&task.spec, &candidate.executor.spec).is_some()
        {
            continue;
        }
        let runtime = if task.spec.deadline_unix_ms.is_some() {
            let spec = &candidate.executor.spec;
            match runtimes.iter().find(|(class, _)| class_key(class) == class_key(spec)) {
                Some((_, runtime)) => *runtime,
                None => {
                    let runtime = oracle.runtime_ms(&task.spec, spec).unwrap_or(0.0);
                    runtimes.push((spec, runtime));
                    runtime
                }
            }
        } else {
            0.0
        };
        let fit = match task.spec.placement {
            PlacementPolicy::BinPack => leftover(candidate, request),
            PlacementPolicy::Spread => -leftover(candidate, request),
        };
        let score = (runtime, fit);
        if best.is_none_or(|(_, best_score)| score < best_score) {
            best = Some((index, score));
        }
    }
    best.map(|(index, _)| index)
}

/// Why no up executor could run the task even empty, or None when one could.
fn never_fits(candidates: &[Candidate], task: &Task, request: &Resources) -> Option<String> {
    if candidates.is_empty() {
        return Some("unschedulable: no executor is up".to_owned());
    }
    let mut mismatch = None;
    let mut shortfall = None;
    for candidate in candidates {
        if let Some(why) = constraint_mismatch(&task.spec, &candidate.executor.spec) {
            mismatch.get_or_insert(why);
            continue;
        }
        match request.first_shortfall(&candidate.executor.spec.capacity) {
            None => return None,
            Some(why) => {
                shortfall.get_or_insert(why);
            }
        }
    }
    let why = shortfall.map(|s| s.to_string()).or(mismatch.map(|m| m.to_string()))?;
    Some(format!("unschedulable: no executor has {why}"))
}

/// The executor where evicting the fewest, lowest-priority attempts makes room, and those
/// attempts. Only attempts at least `gap_min` below the task's priority are candidates.
fn preemption(
    state: &StateMachine,
    candidates: &[Candidate],
    task: &Task,
    request: &Resources,
    evicted: &BTreeSet<TaskId>,
    gap_min: u16,
) -> Option<(usize, Vec<TaskId>)> {
    let mut best: Option<(usize, Vec<TaskId>, (u16, usize))> = None;
    for (index, candidate) in candidates.iter().enumerate() {
        if constraint_mismatch(&task.spec, &candidate.executor.spec).is_some()
            || !request.fits_in(&candidate.executor.spec.capacity)
        {
            continue;
        }
        let mut victims: Vec<&Task> = candidate
            .executor
            .tasks
            .iter()
            .filter(|id| !evicted.contains(id))
            .filter_map(|id| state.get_task(*id))
            .filter(|victim| victim.spec.priority.saturating_add(gap_min) <= task.spec.priority)
            .collect();
        // Lowest priority first; among equals the youngest, which has lost the least work.
        victims.sort_by_key(|victim| (victim.spec.priority, std::cmp::Reverse(victim.id)));
        let mut free = candidate.free.clone();
        let mut chosen = Vec::new();
        for victim in victims {
            if request.fits_in(&free) {
                break;
            }
            free.add(&victim.allocated);
            chosen.push(victim);
        }
        if chosen.is_empty() || !request.fits_in(&free) {
            continue;
        }
        let cost = (chosen.iter().map(|v| v.spec.priority).max().unwrap_or(0), chosen.len());
        if best.as_ref().is_none_or(|(_, _, best_cost)| cost < *best_cost) {
            best = Some((index, chosen.iter().map(|v| v.id).collect(), cost));
        }
    }
    best.map(|(index, victims, _)| (index, victims))
}

#[cfg(test)]
mod tests;
