//! The verdict of a run, as `report.json` and as the table people read: faults by kind,
//! operations, every checker's count, recovery times, and where everything was kept.

use crate::checks::{CheckResult, Linearizability};
use crate::history::{Call, Op, Outcome};
use crate::run::NegativeControl;
use comfy_table::{presets, ContentArrangement, Table};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize)]
pub struct FaultRecord {
    pub nemesis: String,
    pub detail: String,
    /// Set when the fault could not be (fully) applied.
    pub error: Option<String>,
    pub start_ms: u64,
    pub healed_ms: u64,
    /// From the heal to the first acknowledged write; None if none came within a minute.
    pub recovery_ms: Option<u64>,
    /// Processes that had exited on their own by the heal.
    pub exited: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct OperationCounts {
    pub invoked: u64,
    pub ok: u64,
    pub fail: u64,
    pub unknown: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Paths {
    pub dir: PathBuf,
    pub history: PathBuf,
    pub ledger: PathBuf,
    pub logs: PathBuf,
    pub data: PathBuf,
    pub report: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Paths {
        Paths {
            dir: dir.to_owned(),
            history: dir.join("history.jsonl"),
            ledger: dir.join("ledger"),
            logs: dir.join("logs"),
            data: dir.join("data"),
            report: dir.join("report.json"),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    /// What the workflow client submitted and what the workflow checks found.
    pub workflows: crate::workflows::WorkflowReport,
    /// What the message publisher and consumer did and what the message checks found.
    pub messages: crate::messages::MessageReport,
    pub servers: u8,
    pub executors: u8,
    pub duration_s: u64,
    pub nemeses: Vec<String>,
    pub negative_control: Option<NegativeControl>,
    pub faults_by_kind: BTreeMap<String, u64>,
    pub faults: Vec<FaultRecord>,
    pub operations: BTreeMap<String, OperationCounts>,
    pub reads_saw: BTreeMap<String, u64>,
    pub lost_acknowledged: CheckResult,
    pub phantom_tasks: CheckResult,
    pub over_commits: CheckResult,
    pub duplicate_completions: CheckResult,
    pub stale_completions: CheckResult,
    pub leaders_per_term: CheckResult,
    pub terms_backwards: CheckResult,
    pub terms_seen: u64,
    pub divergence: CheckResult,
    pub linearizability: Linearizability,
    pub recovery_ms_p50: u64,
    pub recovery_ms_max: u64,
    pub not_recovered: u64,
    pub unexpected_exits: Vec<String>,
    /// Tasks still unfinished when the run stopped waiting for them (None: all finished).
    pub unfinished_tasks: Option<u64>,
    pub ledger_lines: u64,
    pub ledger_unreadable: u64,
    pub final_state_error: Option<String>,
    pub servers_read: Vec<String>,
    pub paths: Paths,
    /// For a negative control: whether the checkers caught the deliberate bug.
    pub negative_control_caught: Option<bool>,
    pub valid: bool,
}

impl Report {
    /// Every promise the run saw broken, one line each; empty means the run is valid.
    pub fn violations(&self) -> Vec<String> {
        let mut found = Vec::new();
        let checks = [
            ("acknowledged submissions lost", &self.lost_acknowledged),
            ("tasks nobody submitted", &self.phantom_tasks),
            ("executors over capacity", &self.over_commits),
            ("duplicate completions", &self.duplicate_completions),
            ("completions from superseded attempts", &self.stale_completions),
            ("terms with more than one leader", &self.leaders_per_term),
            ("terms going backwards", &self.terms_backwards),
            ("servers disagreeing at the end", &self.divergence),
            ("acknowledged workflows lost", &self.workflows.lost),
            ("workflow steps that saw the wrong input", &self.workflows.inputs_wrong),
            ("workflow outputs not the final attempt's", &self.workflows.outputs_wrong),
            ("acknowledged messages lost", &self.messages.lost),
            ("messages nobody published", &self.messages.made_up),
            ("messages delivered after a confirmed ack", &self.messages.after_ack),
            ("messages stored twice", &self.messages.stored_twice),
        ];
        for (what, check) in checks {
            if check.violations > 0 {
                found.push(format!("{what}: {}", check.violations));
            }
        }
        match self.linearizability.verdict {
            crate::checks::LinearVerdict::Valid => {}
            crate::checks::LinearVerdict::Invalid => {
                found.push(format!("not linearizable: {} tasks", self.linearizability.invalid_keys))
            }
            crate::checks::LinearVerdict::Unknown => found.push(format!(
                "linearizability unknown: {} tasks ran out of search budget",
                self.linearizability.unknown_keys
            )),
        }
        if self.not_recovered > 0 {
            found.push(format!(
                "no write acknowledged within a minute of {} heals",
                self.not_recovered
            ));
        }
        if let Some(e) = &self.final_state_error {
            found.push(format!("final state unreadable: {e}"));
        }
        if self.servers_read.len() != usize::from(self.servers) {
            found.push(format!(
                "final state read from {} of {} servers",
                self.servers_read.len(),
                self.servers
            ));
        }
        if self.ledger_unreadable > 0 {
            found.push(format!("{} unreadable ledger lines", self.ledger_unreadable));
        }
        // The workflow checks must have had something to check.
        if self.workflows.succeeded == 0 {
            found.push(format!(
                "no workflow succeeded ({} acknowledged): the workflow checks checked nothing",
                self.workflows.acknowledged
            ));
        }
        if self.messages.acknowledged == 0 {
            found
                .push("no message was acknowledged: the message checks checked nothing".to_owned());
        }
        found
    }
}

/// Calls by kind: invoked, and how each ended.
pub fn count_operations(ops: &[Op]) -> BTreeMap<String, OperationCounts> {
    let mut counts: BTreeMap<String, OperationCounts> = BTreeMap::new();
    for op in ops {
        let name = match op.call {
            Call::Submit => "submit",
            Call::Read => "read",
            Call::Cancel => "cancel",
            Call::Executors => "read executors",
        };
        let entry = counts.entry(name.to_owned()).or_insert(OperationCounts {
            invoked: 0,
            ok: 0,
            fail: 0,
            unknown: 0,
        });
        entry.invoked += 1;
        match op.outcome {
            Outcome::Fail { .. } => entry.fail += 1,
            Outcome::Unknown { .. } => entry.unknown += 1,
            _ => entry.ok += 1,
        }
    }
    counts
}

/// The value at fraction `p` of `sorted` (nearest rank); 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn faults_by_kind(faults: &[FaultRecord]) -> BTreeMap<String, u64> {
    let mut kinds = BTreeMap::new();
    for fault in faults {
        *kinds.entry(fault.nemesis.clone()).or_default() += 1;
    }
    kinds
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    table
}

fn verdict(check: &CheckResult) -> String {
    if check.violations == 0 {
        "0".to_owned()
    } else {
        format!("{}  VIOLATION", check.violations)
    }
}

/// Prints the report for people.
pub fn print(report: &Report) {
    println!(
        "Chaos run: seed {}, {} servers, {} executors, {} s of faults",
        report.seed, report.servers, report.executors, report.duration_s
    );
    println!();
    let mut faults =
        table(&["FAULT", "INJECTED", "RECOVERY P50 (ms)", "RECOVERY MAX (ms)", "FAILED TO APPLY"]);
    for (kind, count) in &report.faults_by_kind {
        let mut times: Vec<u64> = report
            .faults
            .iter()
            .filter(|f| &f.nemesis == kind)
            .filter_map(|f| f.recovery_ms)
            .collect();
        times.sort_unstable();
        let errors =
            report.faults.iter().filter(|f| &f.nemesis == kind && f.error.is_some()).count();
        let (p50, max) = match times.last() {
            Some(max) => (percentile(&times, 0.5).to_string(), max.to_string()),
            None => ("-".to_owned(), "-".to_owned()),
        };
        faults.add_row(vec![kind.clone(), count.to_string(), p50, max, errors.to_string()]);
    }
    println!("{faults}");
    println!();
    let mut ops = table(&["OPERATION", "INVOKED", "OK", "FAIL", "UNKNOWN"]);
    for (name, c) in &report.operations {
        ops.add_row(vec![
            name.clone(),
            c.invoked.to_string(),
            c.ok.to_string(),
            c.fail.to_string(),
            c.unknown.to_string(),
        ]);
    }
    println!("{ops}");
    println!();
    let lin = &report.linearizability;
    let mut checks = table(&["CHECK", "RESULT"]);
    checks.add_row(vec!["acknowledged writes lost".to_owned(), verdict(&report.lost_acknowledged)]);
    checks.add_row(vec!["tasks nobody submitted".to_owned(), verdict(&report.phantom_tasks)]);
    checks.add_row(vec!["over-commits seen".to_owned(), verdict(&report.over_commits)]);
    checks
        .add_row(vec!["duplicate completions".to_owned(), verdict(&report.duplicate_completions)]);
    checks.add_row(vec![
        "completions from stale tokens".to_owned(),
        verdict(&report.stale_completions),
    ]);
    checks.add_row(vec![
        format!("terms with >1 leader (of {} seen)", report.terms_seen),
        verdict(&report.leaders_per_term),
    ]);
    checks.add_row(vec!["terms going backwards".to_owned(), verdict(&report.terms_backwards)]);
    checks.add_row(vec!["servers diverged at the end".to_owned(), verdict(&report.divergence)]);
    let w = &report.workflows;
    checks.add_row(vec![
        format!(
            "workflows lost ({} acknowledged, {} unknown; {} succeeded)",
            w.acknowledged, w.unknown, w.succeeded
        ),
        verdict(&w.lost),
    ]);
    checks
        .add_row(vec!["workflow inputs not the kept output".to_owned(), verdict(&w.inputs_wrong)]);
    checks.add_row(vec![
        "workflow outputs not the final attempt's".to_owned(),
        verdict(&w.outputs_wrong),
    ]);
    let m = &report.messages;
    checks.add_row(vec![
        format!(
            "messages lost ({} acknowledged, {} unknown; {} delivered, {} redelivered)",
            m.acknowledged, m.unknown, m.delivered, m.redelivered
        ),
        verdict(&m.lost),
    ]);
    checks.add_row(vec!["messages nobody published".to_owned(), verdict(&m.made_up)]);
    checks.add_row(vec![
        "messages delivered after a confirmed ack".to_owned(),
        verdict(&m.after_ack),
    ]);
    checks.add_row(vec!["messages stored twice".to_owned(), verdict(&m.stored_twice)]);
    checks.add_row(vec![
        "linearizability".to_owned(),
        format!(
            "{:?} ({} tasks, {} operations, searched in {:.0} ms)",
            lin.verdict,
            lin.keys,
            lin.operations,
            lin.seconds * 1000.0
        )
        .to_lowercase(),
    ]);
    checks.add_row(vec![
        "recovery after heal p50 / max".to_owned(),
        format!(
            "{} ms / {} ms ({} heals without recovery)",
            report.recovery_ms_p50, report.recovery_ms_max, report.not_recovered
        ),
    ]);
    checks.add_row(vec![
        "unfinished tasks at the end".to_owned(),
        report.unfinished_tasks.map_or("0".to_owned(), |n| n.to_string()),
    ]);
    checks.add_row(vec![
        "processes that exited on their own".to_owned(),
        report.unexpected_exits.len().to_string(),
    ]);
    println!("{checks}");
    let examples = [
        &report.lost_acknowledged,
        &report.phantom_tasks,
        &report.over_commits,
        &report.duplicate_completions,
        &report.stale_completions,
        &report.leaders_per_term,
        &report.terms_backwards,
        &report.divergence,
    ];
    for example in examples.iter().flat_map(|c| c.examples.iter()).chain(&lin.examples).take(10) {
        println!("  e.g. {example}");
    }
    for exit in report.unexpected_exits.iter().take(10) {
        println!("  exited: {exit}");
    }
    println!();
    println!("history {}", report.paths.history.display());
    println!("logs    {}", report.paths.logs.display());
    println!("data    {}", report.paths.data.display());
    println!("report  {}", report.paths.report.display());
    println!();
    if let Some(caught) = report.negative_control_caught {
        println!(
            "negative control: the deliberate bug was {}",
            if caught { "CAUGHT" } else { "NOT caught" }
        );
    }
    let violations = report.violations();
    if violations.is_empty() {
        println!("VALID: no violations");
    } else {
        println!("INVALID: {}", violations.join("; "));
    }
}
