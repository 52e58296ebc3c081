//! The placement algorithm: which pending tasks go to which executors, which tasks must be
//! evicted to make room, and which fit nowhere. Pure: the leader runs it against its applied
//! state and proposes the result, and `apply` re-validates every placement, so a plan made
//! against a stale state can be refused but can never over-commit.

use crate::executor::{Executor, ExecutorState};
use crate::ids::TaskId;
use crate::resources::Resources;
use crate::state_machine::{constraint_mismatch, Placement, StateMachine};
use crate::task::{PlacementPolicy, Task};
use std::collections::BTreeSet;

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
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig { placements_max: 4096, scan_max: 16_384, misses_in_a_row_max: 512, preemption_priority_gap_min: 100, preemptions_max: 64 }
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
        self.placements.is_empty() && self.unschedulable.is_empty() && self.expire.is_empty() && self.drain_evictions.is_empty()
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
    let share = |free: u64, want: u64, total: u64| if total == 0 { 0.0 } else { free.saturating_sub(want) as f64 / total as f64 };
    share(candidate.free.cpu_millis, request.cpu_millis, capacity.cpu_millis)
        + share(candidate.free.memory_bytes, request.memory_bytes, capacity.memory_bytes)
}

/// One scheduling round at time `now_unix_ms`.
pub fn plan(state: &StateMachine, now_unix_ms: u64, config: &PlanConfig) -> Plan {
    let mut plan = Plan { expire: state.overdue(now_unix_ms).take(config.placements_max).collect(), ..Plan::default() };
    for executor in state.executors() {
        let due = executor.state == ExecutorState::Draining && executor.drain_deadline_unix_ms.is_some_and(|d| d <= now_unix_ms);
        if due {
            plan.drain_evictions.extend(executor.tasks.iter().copied());
        }
    }
    let mut candidates: Vec<Candidate> =
        state.executors().filter(|e| e.state == ExecutorState::Up).map(|executor| Candidate { executor, free: executor.free() }).collect();
    let expiring: BTreeSet<TaskId> = plan.expire.iter().copied().collect();
    let mut evicted: BTreeSet<TaskId> = BTreeSet::new();
    let mut misses = 0;
    for task in state.pending().take(config.scan_max) {
        if plan.placements.len() >= config.placements_max || misses >= config.misses_in_a_row_max {
            break;
        }
        if task.not_before_unix_ms > now_unix_ms || expiring.contains(&task.id) {
            continue;
        }
        if let Some(index) = best_fit(&candidates, task) {
            candidates[index].free.sub(&task.spec.resources);
            plan.placements.push(Placement { task: task.id, executor: candidates[index].executor.id, evict: Vec::new() });
            misses = 0;
            continue;
        }
        misses += 1;
        if let Some(reason) = never_fits(&candidates, task) {
            if task.reason.as_deref() != Some(reason.as_str()) {
                plan.unschedulable.push((task.id, reason));
            }
            continue;
        }
        let preemptions = plan.placements.iter().filter(|p| !p.evict.is_empty()).count();
        if config.preemption_priority_gap_min > 0 && preemptions < config.preemptions_max {
            if let Some((index, victims)) = preemption(state, &candidates, task, &evicted, config.preemption_priority_gap_min) {
                let candidate = &mut candidates[index];
                for victim in &victims {
                    if let Some(victim_task) = state.get_task(*victim) {
                        candidate.free.add(&victim_task.spec.resources);
                    }
                    evicted.insert(*victim);
                }
                candidate.free.sub(&task.spec.resources);
                plan.placements.push(Placement { task: task.id, executor: candidate.executor.id, evict: victims });
                misses = 0;
            }
        }
    }
    plan
}

fn best_fit(candidates: &[Candidate], task: &Task) -> Option<usize> {
    let request = &task.spec.resources;
    let mut best: Option<(usize, f64)> = None;
    for (index, candidate) in candidates.iter().enumerate() {
        if !request.fits_in(&candidate.free) || constraint_mismatch(&task.spec, &candidate.executor.spec).is_some() {
            continue;
        }
        let score = match task.spec.placement {
            PlacementPolicy::BinPack => leftover(candidate, request),
            PlacementPolicy::Spread => -leftover(candidate, request),
        };
        if best.is_none_or(|(_, best_score)| score < best_score) {
            best = Some((index, score));
        }
    }
    best.map(|(index, _)| index)
}

/// Why no up executor could run the task even empty, or None when one could.
fn never_fits(candidates: &[Candidate], task: &Task) -> Option<String> {
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
        match task.spec.resources.first_shortfall(&candidate.executor.spec.capacity) {
            None => return None,
            Some(why) => {
                shortfall.get_or_insert(why);
            }
        }
    }
    shortfall.or(mismatch).map(|why| format!("unschedulable: no executor has {why}"))
}

/// The executor where evicting the fewest, lowest-priority attempts makes room, and those
/// attempts. Only attempts at least `gap_min` below the task's priority are candidates.
fn preemption(state: &StateMachine, candidates: &[Candidate], task: &Task, evicted: &BTreeSet<TaskId>, gap_min: u16) -> Option<(usize, Vec<TaskId>)> {
    let request = &task.spec.resources;
    let mut best: Option<(usize, Vec<TaskId>, (u16, usize))> = None;
    for (index, candidate) in candidates.iter().enumerate() {
        if constraint_mismatch(&task.spec, &candidate.executor.spec).is_some() || !request.fits_in(&candidate.executor.spec.capacity) {
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
            free.add(&victim.spec.resources);
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
