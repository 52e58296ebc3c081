//! Workflows in the chaos workload. One client submits two-step workflows all through the run:
//! `produce` writes a value unique to its attempt as its output `value`; `consume` receives it as
//! its input. Both append `start`/`end` lines to the run's ledger like every task (so the
//! completion checks cover them) and their values to the workflow ledger. At the end every
//! acknowledged workflow is read back:
//!
//! - it exists (an acknowledged workflow is never lost);
//! - once succeeded, every attempt of its `consume` saw exactly the output the cluster kept for
//!   `produce`: never nothing (a step never starts before its input exists) and never an older
//!   attempt's value (an output is not seen twice);
//! - the output kept is the value the attempt with `produce`'s final token wrote (no output lost
//!   or made up).

use crate::checks::CheckResult;
use colony_client::{Channel, Client};
use colony_proto::pb;
use colony_proto::pb::admin_client::AdminClient;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;
use tokio::sync::watch;

/// The namespace workflow tasks live in: the task checks that follow submissions by key skip it.
pub const NAMESPACE: &str = "chaos-workflows";
/// Time between two workflow submissions.
const SUBMIT_EVERY: Duration = Duration::from_millis(400);

/// The workflow the client submits as number `n`.
pub fn spec(n: u64, ledger: &Path, values: &Path) -> pb::WorkflowSpec {
    let (ledger, values) = (ledger.display(), values.display());
    let step = |name: &str, script: String| pb::WorkflowStep {
        name: name.to_owned(),
        task: Some(pb::TaskSpec {
            resources: Some(pb::Resources {
                cpu_millis: 250,
                memory_bytes: 64 << 20,
                ..Default::default()
            }),
            timeout_ms: Some(30_000),
            max_retries: 20,
            run: Some(pb::task_spec::Run::Process(pb::ProcessRun {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), script],
                env: Default::default(),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let attempt = "$COLONY_TASK_ID $COLONY_FENCING_TOKEN $COLONY_EXECUTOR_ID";
    let produce = format!(
        "echo \"start {attempt}\" >> {ledger}; v=\"$COLONY_TASK_ID-$COLONY_FENCING_TOKEN-$$\"; \
         printf %s \"$v\" > \"$COLONY_OUTPUT_DIR/value\"; echo \"produce $COLONY_TASK_ID $COLONY_FENCING_TOKEN $v\" >> {values}; \
         sleep 0.2; echo \"end {attempt}\" >> {ledger}"
    );
    let consume = format!(
        "echo \"start {attempt}\" >> {ledger}; v=$(cat \"$COLONY_INPUT_DIR/value\" 2>/dev/null); \
         echo \"consume $COLONY_TASK_ID $COLONY_FENCING_TOKEN $v\" >> {values}; \
         sleep 0.1; echo \"end {attempt}\" >> {ledger}"
    );
    pb::WorkflowSpec {
        name: format!("cwf-{n}"),
        namespace: NAMESPACE.into(),
        steps: vec![
            pb::WorkflowStep { outputs: vec!["value".into()], ..step("produce", produce) },
            pb::WorkflowStep {
                after: vec!["produce".into()],
                inputs: [("value".to_owned(), "produce.value".to_owned())].into(),
                ..step("consume", consume)
            },
        ],
        ..Default::default()
    }
}

/// What the workflow client did.
#[derive(Clone, Debug, Default)]
pub struct Submitted {
    pub acknowledged: Vec<u64>,
    /// Submissions whose outcome is unknown (they may exist; nothing is checked about them).
    pub unknown: u64,
}

/// Submits a workflow every `SUBMIT_EVERY`, to each server in turn, until told to stop.
pub async fn client(
    servers: Vec<(String, Channel)>,
    ledger: std::path::PathBuf,
    values: std::path::PathBuf,
    mut stop: watch::Receiver<bool>,
) -> Submitted {
    let mut submitted = Submitted::default();
    let mut n = 0u64;
    while !*stop.borrow() {
        let (_, channel) = &servers[n as usize % servers.len()];
        let request = pb::SubmitWorkflowRequest { spec: Some(spec(n, &ledger, &values)) };
        let mut admin = AdminClient::new(channel.clone());
        match tokio::time::timeout(crate::workload::CALL_TIMEOUT, admin.submit_workflow(request))
            .await
        {
            Ok(Ok(answer)) => match answer.into_inner().workflow {
                Some(workflow) => submitted.acknowledged.push(workflow.id),
                None => submitted.unknown += 1,
            },
            _ => submitted.unknown += 1,
        }
        n += 1;
        tokio::select! {
            _ = tokio::time::sleep(SUBMIT_EVERY) => {}
            _ = stop.changed() => {}
        }
    }
    submitted
}

/// The workflow checks' findings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WorkflowReport {
    pub acknowledged: u64,
    pub unknown: u64,
    pub succeeded: u64,
    /// Acknowledged workflows that ended otherwise (allowed: a task can exhaust its retries).
    pub not_succeeded: u64,
    pub lost: CheckResult,
    /// A consumer attempt that saw no value, or another value than the one kept.
    pub inputs_wrong: CheckResult,
    /// A kept output that is not the value its producer's final attempt wrote.
    pub outputs_wrong: CheckResult,
}

/// `(task, token) -> value` for each kind of line of the workflow ledger.
fn parse_values(text: &str) -> BTreeMap<&str, BTreeMap<(u64, u64), Vec<String>>> {
    let mut lines: BTreeMap<&str, BTreeMap<(u64, u64), Vec<String>>> = BTreeMap::new();
    for line in text.lines() {
        let mut fields = line.splitn(4, ' ');
        let (Some(kind), Some(task), Some(token)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (Ok(task), Ok(token)) = (task.parse::<u64>(), token.parse::<u64>()) else { continue };
        let value = fields.next().unwrap_or_default().to_owned();
        lines.entry(kind).or_default().entry((task, token)).or_default().push(value);
    }
    lines
}

/// Reads every acknowledged workflow back and checks it against the workflow ledger.
pub async fn check(client: &Client, submitted: &Submitted, values_text: &str) -> WorkflowReport {
    let mut report = WorkflowReport {
        acknowledged: submitted.acknowledged.len() as u64,
        unknown: submitted.unknown,
        ..Default::default()
    };
    let values = parse_values(values_text);
    let empty = BTreeMap::new();
    let produced = values.get("produce").unwrap_or(&empty);
    let consumed = values.get("consume").unwrap_or(&empty);
    for &id in &submitted.acknowledged {
        let request = pb::GetWorkflowRequest { id, consistency: None };
        let answer =
            client.call("get workflow", |mut c| async move { c.get_workflow(request).await }).await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                report
                    .lost
                    .add(|| format!("workflow {id} was acknowledged but cannot be read: {e:#}"));
                continue;
            }
        };
        let state = answer.workflow.as_ref().map(|w| w.state).unwrap_or_default();
        if state != pb::WorkflowState::Succeeded as i32 {
            report.not_succeeded += 1;
            continue;
        }
        report.succeeded += 1;
        let task = |step: &str| answer.tasks.iter().find(|t| t.step == step).map(|t| t.id);
        let (Some(producer), Some(consumer)) = (task("produce"), task("consume")) else {
            report.lost.add(|| format!("workflow {id} succeeded without both steps' tasks"));
            continue;
        };
        let request =
            pb::GetTaskOutputRequest { id: producer, name: "value".into(), consistency: None };
        let kept = client
            .call("get task output", |mut c| {
                let request = request.clone();
                async move { c.get_task_output(request).await }
            })
            .await
            .ok()
            .and_then(|o| o.outputs.into_iter().next())
            .map(|o| String::from_utf8_lossy(&o.data).into_owned());
        let Some(kept) = kept else {
            report
                .outputs_wrong
                .add(|| format!("workflow {id}: task {producer}'s output value is gone"));
            continue;
        };
        let request = pb::GetTaskRequest { id: producer, consistency: None };
        let final_token = client
            .call("get task", |mut c| async move { c.get_task(request).await })
            .await
            .ok()
            .and_then(|t| t.task)
            .and_then(|t| t.fencing_token);
        let wrote: BTreeSet<&String> = final_token
            .and_then(|token| produced.get(&(producer, token)))
            .into_iter()
            .flatten()
            .collect();
        if !wrote.contains(&kept) {
            report.outputs_wrong.add(|| {
                format!("workflow {id}: task {producer} keeps {kept:?}, but its final attempt (token {final_token:?}) wrote {wrote:?}")
            });
        }
        let seen: Vec<&String> = consumed
            .range((consumer, 0)..=(consumer, u64::MAX))
            .flat_map(|(_, values)| values.iter())
            .collect();
        if seen.is_empty() {
            report.inputs_wrong.add(|| {
                format!(
                    "workflow {id}: consumer task {consumer} succeeded but no attempt of it ran"
                )
            });
        }
        for value in seen.into_iter().filter(|v| **v != kept) {
            report.inputs_wrong.add(|| {
                format!("workflow {id}: an attempt of task {consumer} saw {value:?}, not the kept output {kept:?}")
            });
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workflow_ledger_parses_by_kind_task_and_token() {
        let values =
            parse_values("produce 4 7 4-7-100\nconsume 5 9 4-7-100\nconsume 5 10 \ngarbage\n");
        assert_eq!(values["produce"][&(4, 7)], vec!["4-7-100".to_owned()]);
        assert_eq!(values["consume"][&(5, 10)], vec![String::new()]);
        assert_eq!(values.len(), 2);
    }
}
