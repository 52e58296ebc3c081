//! The checkers: what a run's history, ledger, status samples and final server states must
//! satisfy. Each returns the number of violations and a few examples; none can pass by skipping.

use crate::check::task_model::{Input, Obs, Output, TaskModel, TaskState};
use crate::check::wgl::{self, Operation, Verdict};
use crate::history::{Call, ExecutorView, Op, Outcome};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Examples kept per check; the count is always complete.
const EXAMPLES_MAX: usize = 10;

#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckResult {
    pub violations: u64,
    pub examples: Vec<String>,
}

impl CheckResult {
    pub(crate) fn add(&mut self, example: impl FnOnce() -> String) {
        self.violations += 1;
        if self.examples.len() < EXAMPLES_MAX {
            self.examples.push(example());
        }
    }
}

/// One line an attempt appended to the ledger.
#[derive(Clone, Debug)]
pub struct LedgerLine {
    pub end: bool,
    pub task: u64,
    pub token: u64,
    pub executor: u64,
}

pub fn parse_ledger(text: &str) -> (Vec<LedgerLine>, u64) {
    let mut lines = Vec::new();
    let mut unreadable = 0;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let parsed = match words.as_slice() {
            [kind @ ("start" | "end"), task, token, executor] => {
                task.parse().ok().zip(token.parse().ok()).zip(executor.parse().ok()).map(
                    |((task, token), executor)| LedgerLine {
                        end: *kind == "end",
                        task,
                        token,
                        executor,
                    },
                )
            }
            _ => None,
        };
        match parsed {
            Some(l) => lines.push(l),
            None => unreadable += 1,
        }
    }
    (lines, unreadable)
}

/// A task as one server holds it at the end.
#[derive(Clone, Debug)]
pub struct FinalTask {
    pub key: Option<String>,
    /// A workflow's task: created by the cluster, not submitted by key.
    pub workflow: bool,
    pub status: Option<TaskState>,
    pub token: Option<u64>,
    pub executor: Option<u64>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// What one server holds at the end, read from its own state.
#[derive(Clone, Debug, Default)]
pub struct ServerFinal {
    pub name: String,
    pub tasks: BTreeMap<u64, FinalTask>,
    pub executors: Vec<ExecutorView>,
    pub applied_index: u64,
    pub digest: String,
}

/// One sample of one server's own view of Raft.
#[derive(Clone, Debug, Serialize)]
pub struct StatusSample {
    pub time_ns: u64,
    pub server: String,
    pub node_id: u64,
    pub term: u64,
    pub state: String,
    pub leader_id: Option<u64>,
}

/// Every acknowledged submission is in every server's final state, under its key; no task is
/// there that nobody submitted.
pub fn acknowledged_present(ops: &[Op], finals: &[ServerFinal]) -> (CheckResult, CheckResult) {
    let mut lost = CheckResult::default();
    let mut phantom = CheckResult::default();
    let acked: BTreeMap<&str, u64> = ops
        .iter()
        .filter_map(|op| match (&op.outcome, &op.key) {
            (Outcome::Submitted { id, .. }, Some(key)) => Some((key.as_str(), *id)),
            _ => None,
        })
        .collect();
    let invoked: BTreeSet<&str> = ops
        .iter()
        .filter(|op| op.call == Call::Submit)
        .filter_map(|op| op.key.as_deref())
        .collect();
    for server in finals {
        for (key, id) in &acked {
            match server.tasks.get(id) {
                Some(task) if task.key.as_deref() == Some(*key) => {}
                Some(task) => lost.add(|| {
                    format!(
                        "{}: task {id} acknowledged for key {key} holds key {:?}",
                        server.name, task.key
                    )
                }),
                None => lost.add(|| {
                    format!(
                        "{}: task {id} (key {key}) was acknowledged but is missing",
                        server.name
                    )
                }),
            }
        }
        for (id, task) in server.tasks.iter().filter(|(_, t)| !t.workflow) {
            if !task.key.as_deref().is_some_and(|k| invoked.contains(k)) {
                phantom.add(|| {
                    format!("{}: task {id} (key {:?}) was never submitted", server.name, task.key)
                });
            }
        }
    }
    (lost, phantom)
}

fn over(view: &ExecutorView) -> bool {
    view.cpu_millis.0 > view.cpu_millis.1 || view.memory_bytes.0 > view.memory_bytes.1
}

/// No executor over capacity in any read or any server's final state, where the final state's
/// allocations must also equal what its running tasks hold.
pub fn capacity(ops: &[Op], finals: &[ServerFinal]) -> CheckResult {
    let mut result = CheckResult::default();
    for op in ops {
        if let Outcome::Executors { executors } = &op.outcome {
            for view in executors.iter().filter(|v| over(v)) {
                result.add(|| format!("read #{} on {}: executor {} holds {:?} cpu, {:?} memory (allocated, capacity)", op.index, op.server, view.id, view.cpu_millis, view.memory_bytes));
            }
        }
    }
    for server in finals {
        let mut held: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for task in server
            .tasks
            .values()
            .filter(|t| matches!(t.status, Some(TaskState::Assigned | TaskState::Running)))
        {
            if let Some(executor) = task.executor {
                let entry = held.entry(executor).or_default();
                entry.0 += task.cpu_millis;
                entry.1 += task.memory_bytes;
            }
        }
        for view in &server.executors {
            let sum = held.get(&view.id).copied().unwrap_or_default();
            if over(view) || sum.0 > view.cpu_millis.1 || sum.1 > view.memory_bytes.1 {
                result.add(|| {
                    format!(
                        "{}: executor {} over capacity: allocated {:?}, tasks hold {sum:?}",
                        server.name,
                        view.id,
                        (view.cpu_millis, view.memory_bytes)
                    )
                });
            }
        }
    }
    result
}

/// At most one completion per attempt, and no task finished by a report from a superseded
/// attempt: a succeeded task's token is the newest any attempt of it ever had, and that
/// attempt did finish.
pub fn completions(
    ledger: &[LedgerLine],
    ops: &[Op],
    finals: &[ServerFinal],
) -> (CheckResult, CheckResult) {
    let mut duplicates = CheckResult::default();
    let mut stale = CheckResult::default();
    // The executors each (task, token) ended on, once per ending.
    let mut ends: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new();
    let mut newest: BTreeMap<u64, u64> = BTreeMap::new();
    for line in ledger {
        let top = newest.entry(line.task).or_default();
        *top = (*top).max(line.token);
        if line.end {
            ends.entry((line.task, line.token)).or_default().push(line.executor);
        }
    }
    for op in ops {
        let obs = match &op.outcome {
            Outcome::Read { obs: Some(obs) }
            | Outcome::Cancelled { obs }
            | Outcome::Submitted { obs, .. } => obs,
            _ => continue,
        };
        if let (Some(task), Some(token)) = (op.task, obs.token) {
            let top = newest.entry(task).or_default();
            *top = (*top).max(token);
        }
    }
    for ((task, token), executors) in ends.iter().filter(|(_, e)| e.len() > 1) {
        duplicates.add(|| format!("task {task} attempt with token {token} completed {} times (on executors {executors:?})", executors.len()));
    }
    let Some(reference) = finals.first() else { return (duplicates, stale) };
    for (id, task) in reference.tasks.iter().filter(|(_, t)| t.status == Some(TaskState::Succeeded))
    {
        let token = task.token.unwrap_or(0);
        let top = newest.get(id).copied().unwrap_or(0);
        if token < top {
            stale.add(|| {
                format!("task {id} succeeded with token {token}, but token {top} had been issued")
            });
        } else if !ends.contains_key(&(*id, token)) {
            stale.add(|| format!("task {id} succeeded with token {token}, but no attempt with that token finished"));
        }
    }
    (duplicates, stale)
}

/// One leader per term (each server's own claim to lead, across every sample), and no server's term going backwards (its samples
/// span restarts of the same node id).
pub fn leaders(samples: &[StatusSample]) -> (CheckResult, CheckResult, u64) {
    let mut per_term: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for sample in samples {
        if sample.state == "leader" {
            per_term.entry(sample.term).or_default().insert(sample.node_id);
        }
    }
    let mut two_leaders = CheckResult::default();
    for (term, leaders) in per_term.iter().filter(|(_, l)| l.len() > 1) {
        two_leaders.add(|| format!("term {term} had leaders {leaders:?}"));
    }
    let mut backwards = CheckResult::default();
    let mut last: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut sorted: Vec<&StatusSample> = samples.iter().collect();
    sorted.sort_by_key(|s| s.time_ns);
    for sample in sorted {
        if let Some(&(term, at)) = last.get(&sample.node_id) {
            if sample.term < term {
                backwards.add(|| {
                    format!(
                        "node {} ({}) went from term {term} (at {} ms) back to {} (at {} ms)",
                        sample.node_id,
                        sample.server,
                        at / 1_000_000,
                        sample.term,
                        sample.time_ns / 1_000_000
                    )
                });
            }
        }
        let entry = last.entry(sample.node_id).or_insert((sample.term, sample.time_ns));
        if sample.term >= entry.0 {
            *entry = (sample.term, sample.time_ns);
        }
    }
    (two_leaders, backwards, per_term.len() as u64)
}

/// Every server ends at the same applied index with the same state digest.
pub fn converged(finals: &[ServerFinal]) -> CheckResult {
    let mut result = CheckResult::default();
    let distinct: BTreeSet<(u64, &str)> =
        finals.iter().map(|f| (f.applied_index, f.digest.as_str())).collect();
    if distinct.len() > 1 {
        let views: Vec<String> = finals
            .iter()
            .map(|f| format!("{}: index {} sha256 {:.12}", f.name, f.applied_index, f.digest))
            .collect();
        result.add(|| format!("servers disagree: {}", views.join("; ")));
    }
    result
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearVerdict {
    Valid,
    Invalid,
    Unknown,
}

#[derive(Clone, Debug, Serialize)]
pub struct Linearizability {
    pub verdict: LinearVerdict,
    pub keys: u64,
    pub operations: u64,
    pub invalid_keys: u64,
    pub unknown_keys: u64,
    pub examples: Vec<String>,
    pub seconds: f64,
}

fn as_model_op(op: &Op) -> Option<Operation<Input, Output>> {
    let (input, output) = match (&op.call, &op.outcome) {
        (_, Outcome::Fail { .. }) | (Call::Executors, _) => return None,
        (Call::Submit, Outcome::Submitted { existing, obs, .. }) => {
            (Input::Submit, Output::Submitted { existing: *existing, obs: *obs })
        }
        (Call::Read, Outcome::Read { obs }) => (Input::Read, Output::Read(*obs)),
        (Call::Cancel, Outcome::Cancelled { obs }) => (Input::Cancel, Output::Cancelled(*obs)),
        (Call::Cancel, Outcome::CancelRefused) => (Input::Cancel, Output::CancelRefused),
        (Call::Cancel, Outcome::CancelNotFound) => (Input::Cancel, Output::CancelNotFound),
        (Call::Submit, Outcome::Unknown { .. }) => (Input::Submit, Output::Unknown),
        (Call::Cancel, Outcome::Unknown { .. }) => (Input::Cancel, Output::Unknown),
        _ => return None,
    };
    Some(Operation {
        id: op.index,
        client: op.client,
        call: op.invoke_ns,
        ret: op.complete_ns,
        input,
        output,
    })
}

/// The Wing-Gong-Lowe search on each task's own history (a task is independent of the others in
/// this model), each with its own time budget: a key that runs out is `unknown`, never valid.
pub fn linearizable(ops: &[Op], budget_per_key: Duration) -> Linearizability {
    let started = Instant::now();
    let mut by_key: BTreeMap<&str, Vec<Operation<Input, Output>>> = BTreeMap::new();
    for op in ops {
        if let (Some(key), Some(model_op)) = (op.key.as_deref(), as_model_op(op)) {
            by_key.entry(key).or_default().push(model_op);
        }
    }
    let by_index: BTreeMap<usize, &Op> = ops.iter().map(|op| (op.index, op)).collect();
    let mut result = Linearizability {
        verdict: LinearVerdict::Valid,
        keys: by_key.len() as u64,
        operations: 0,
        invalid_keys: 0,
        unknown_keys: 0,
        examples: Vec::new(),
        seconds: 0.0,
    };
    for (key, history) in &by_key {
        result.operations += history.len() as u64;
        match wgl::check(&TaskModel, history, budget_per_key) {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable(witness) => {
                result.invalid_keys += 1;
                if result.examples.len() < EXAMPLES_MAX {
                    let placed: Vec<String> = witness
                        .linearized
                        .iter()
                        .filter_map(|i| by_index.get(i))
                        .map(|op| describe(op))
                        .collect();
                    let stuck: Vec<String> = witness
                        .unplaceable
                        .iter()
                        .filter_map(|i| by_index.get(i))
                        .map(|op| describe(op))
                        .collect();
                    result.examples.push(format!(
                        "task {key}: after [{}] the model is in {}, where none of [{}] can happen",
                        placed.join(", "),
                        witness.states.join(" or "),
                        stuck.join(", ")
                    ));
                }
            }
            Verdict::Unknown { explored } => {
                result.unknown_keys += 1;
                if result.examples.len() < EXAMPLES_MAX {
                    result
                        .examples
                        .push(format!("key {key}: search budget spent after {explored} steps"));
                }
            }
        }
    }
    result.verdict = if result.invalid_keys > 0 {
        LinearVerdict::Invalid
    } else if result.unknown_keys > 0 {
        LinearVerdict::Unknown
    } else {
        LinearVerdict::Valid
    };
    result.seconds = started.elapsed().as_secs_f64();
    result
}

/// One call in a line: what, where, when, and what came back.
fn describe(op: &Op) -> String {
    let when = match op.complete_ns {
        Some(end) => format!("{}-{} ms", op.invoke_ns / 1_000_000, end / 1_000_000),
        None => format!("{} ms-?", op.invoke_ns / 1_000_000),
    };
    let what = match &op.outcome {
        Outcome::Submitted { existing, obs, .. } => format!(
            "submitted{} {:?}/{:?}",
            if *existing { " (existing)" } else { "" },
            obs.status,
            obs.token
        ),
        Outcome::Read { obs: Some(obs) } => format!("read {:?}/{:?}", obs.status, obs.token),
        Outcome::Read { obs: None } => "read not found".to_owned(),
        Outcome::Cancelled { obs } => format!("cancelled {:?}", obs.token),
        Outcome::CancelRefused => "cancel refused".to_owned(),
        Outcome::CancelNotFound => "cancel not found".to_owned(),
        Outcome::Unknown { .. } => format!("{:?} unknown", op.call).to_lowercase(),
        Outcome::Executors { .. } | Outcome::Fail { .. } => format!("{:?}", op.call).to_lowercase(),
    };
    format!("#{} {what} via {} @{when}", op.index, op.server)
}

/// Reads that saw a status, for the report's "what the workload saw" line.
pub fn observed(ops: &[Op]) -> BTreeMap<String, u64> {
    let mut seen = BTreeMap::new();
    for op in ops {
        if let Outcome::Read { obs: Some(Obs { status, .. }) } = &op.outcome {
            *seen.entry(format!("{status:?}").to_lowercase()).or_default() += 1;
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Call;

    fn op(
        index: usize,
        call: Call,
        key: &str,
        task: Option<u64>,
        span: (u64, Option<u64>),
        outcome: Outcome,
    ) -> Op {
        Op {
            index,
            client: 1,
            server: "s1".into(),
            call,
            key: Some(key.into()),
            task,
            invoke_ns: span.0,
            complete_ns: span.1,
            outcome,
        }
    }

    fn obs(status: TaskState, token: Option<u64>) -> Obs {
        Obs { status, token }
    }

    fn final_task(key: &str, status: TaskState, token: Option<u64>) -> FinalTask {
        FinalTask {
            key: Some(key.into()),
            workflow: false,
            status: Some(status),
            token,
            executor: Some(1),
            cpu_millis: 500,
            memory_bytes: 1 << 20,
        }
    }

    fn server(name: &str, tasks: &[(u64, FinalTask)]) -> ServerFinal {
        ServerFinal {
            name: name.into(),
            tasks: tasks.iter().cloned().collect(),
            digest: "d".into(),
            applied_index: 10,
            ..Default::default()
        }
    }

    #[test]
    fn a_lost_acknowledged_submission_and_a_phantom_task_are_counted() {
        let ops = vec![
            op(
                0,
                Call::Submit,
                "a",
                None,
                (0, Some(5)),
                Outcome::Submitted { id: 1, existing: false, obs: obs(TaskState::Pending, None) },
            ),
            op(1, Call::Submit, "b", None, (0, None), Outcome::Unknown { error: "timeout".into() }),
        ];
        let good = server(
            "s1",
            &[
                (1, final_task("a", TaskState::Succeeded, Some(3))),
                (2, final_task("b", TaskState::Pending, None)),
            ],
        );
        let (lost, phantom) = acknowledged_present(&ops, std::slice::from_ref(&good));
        assert_eq!((lost.violations, phantom.violations), (0, 0));
        let bad = server(
            "s2",
            &[
                (2, final_task("b", TaskState::Pending, None)),
                (3, final_task("zzz", TaskState::Pending, None)),
            ],
        );
        let (lost, phantom) = acknowledged_present(&ops, &[good, bad]);
        assert_eq!((lost.violations, phantom.violations), (1, 1), "{lost:?} {phantom:?}");
    }

    #[test]
    fn over_capacity_in_a_read_or_in_final_tasks_is_counted() {
        let view = |allocated| ExecutorView {
            id: 1,
            state: "up".into(),
            cpu_millis: (allocated, 1000),
            memory_bytes: (0, 1 << 30),
        };
        let ops = vec![Op {
            index: 0,
            client: 1,
            server: "s1".into(),
            call: Call::Executors,
            key: None,
            task: None,
            invoke_ns: 0,
            complete_ns: Some(1),
            outcome: Outcome::Executors { executors: vec![view(500), view(1500)] },
        }];
        assert_eq!(capacity(&ops, &[]).violations, 1);
        let mut running = server(
            "s1",
            &[
                (1, final_task("a", TaskState::Running, Some(1))),
                (2, final_task("b", TaskState::Running, Some(2))),
                (3, final_task("c", TaskState::Running, Some(3))),
            ],
        );
        running.executors = vec![view(1000)];
        // Three running tasks of 500m on a 1000m executor: the tasks hold more than it has.
        assert_eq!(capacity(&[], &[running]).violations, 1);
    }

    #[test]
    fn duplicate_and_superseded_completions_are_counted() {
        let line = |end, task, token| LedgerLine { end, task, token, executor: 1 };
        let ledger = vec![
            line(false, 1, 5),
            line(true, 1, 5),
            line(false, 2, 6),
            line(true, 2, 6),
            line(false, 2, 7),
            line(true, 2, 7),
            line(true, 2, 7),
        ];
        let finals = [server(
            "s1",
            &[
                (1, final_task("a", TaskState::Succeeded, Some(5))),
                (2, final_task("b", TaskState::Succeeded, Some(6))),
            ],
        )];
        let (duplicates, stale) = completions(&ledger, &[], &finals);
        assert_eq!(duplicates.violations, 1, "token 7 ended twice");
        assert_eq!(stale.violations, 1, "task 2 finished with token 6 after 7 was issued");
        let clean = [server("s1", &[(1, final_task("a", TaskState::Succeeded, Some(5)))])];
        assert_eq!(completions(&ledger[..2], &[], &clean).1.violations, 0);
    }

    #[test]
    fn two_leaders_in_a_term_and_a_term_going_back_are_counted() {
        let sample = |time_ns, node_id, term, state: &str| StatusSample {
            time_ns,
            server: format!("s{node_id}"),
            node_id,
            term,
            state: state.into(),
            leader_id: None,
        };
        let fine = [
            sample(1, 1, 2, "leader"),
            sample(1, 2, 2, "follower"),
            sample(2, 2, 3, "leader"),
            sample(3, 1, 3, "follower"),
        ];
        let (two, back, terms) = leaders(&fine);
        assert_eq!((two.violations, back.violations, terms), (0, 0, 2));
        let broken = [
            sample(1, 1, 4, "leader"),
            sample(1, 2, 4, "leader"),
            sample(2, 3, 5, "follower"),
            sample(3, 3, 4, "follower"),
        ];
        let (two, back, _) = leaders(&broken);
        assert_eq!((two.violations, back.violations), (1, 1));
    }

    #[test]
    fn diverged_servers_are_counted() {
        let a = server("s1", &[]);
        let mut b = server("s2", &[]);
        assert_eq!(converged(&[a.clone(), b.clone()]).violations, 0);
        b.digest = "other".into();
        assert_eq!(converged(&[a, b]).violations, 1);
    }

    #[test]
    fn a_stale_read_makes_the_history_invalid_and_a_failed_read_is_ignored() {
        let ops = vec![
            op(
                0,
                Call::Submit,
                "a",
                None,
                (0, Some(10)),
                Outcome::Submitted { id: 1, existing: false, obs: obs(TaskState::Pending, None) },
            ),
            op(
                1,
                Call::Cancel,
                "a",
                Some(1),
                (20, Some(30)),
                Outcome::Cancelled { obs: obs(TaskState::Cancelled, None) },
            ),
            op(
                2,
                Call::Read,
                "a",
                Some(1),
                (40, Some(50)),
                Outcome::Fail { error: "unavailable".into() },
            ),
        ];
        let valid = linearizable(&ops, Duration::from_secs(1));
        assert!(matches!(valid.verdict, LinearVerdict::Valid), "{valid:?}");
        let mut stale = ops.clone();
        stale.push(op(
            3,
            Call::Read,
            "a",
            Some(1),
            (60, Some(70)),
            Outcome::Read { obs: Some(obs(TaskState::Pending, None)) },
        ));
        let invalid = linearizable(&stale, Duration::from_secs(1));
        assert!(matches!(invalid.verdict, LinearVerdict::Invalid), "{invalid:?}");
        assert!(invalid.examples[0].contains("#3 read Pending"), "{:?}", invalid.examples);
    }
}
