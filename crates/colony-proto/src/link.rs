//! Conversions for the executor link: what an executor sends becomes leader inputs and commands,
//! and the leader's messages become frames. Anything no honest executor sends is a
//! `ConversionError`.

use crate::convert::ConversionError;
use crate::pb;
use colony_core::leader::{RunningAttempt, ToExecutor};
use colony_core::{
    AttemptOutcome, AttemptResult, AttemptStatus, Command, ExecutorId, FencingToken, Limits,
    StateMachine, TaskId, WorkflowLimits,
};

/// The attempts an executor lists in `Hello` or a heartbeat.
pub fn running_attempts(running: &[pb::RunningTask]) -> Vec<RunningAttempt> {
    running
        .iter()
        .map(|r| RunningAttempt { task: TaskId(r.task_id), token: FencingToken(r.fencing_token) })
        .collect()
}

/// An executor's status report as the command that records it, with every text bounded by
/// `limits` before it is kept.
pub fn report_command(
    executor: ExecutorId,
    report: &pb::StatusReport,
    limits: &Limits,
    workflow_limits: &WorkflowLimits,
) -> Result<Command, ConversionError> {
    let status = match report.status.as_ref().ok_or(ConversionError::Missing("report.status"))? {
        pb::status_report::Status::Started(_) => AttemptStatus::Started,
        pb::status_report::Status::Finished(finished) => {
            let outcome = match pb::AttemptOutcome::try_from(finished.outcome) {
                Ok(pb::AttemptOutcome::Succeeded) => AttemptOutcome::Succeeded,
                Ok(pb::AttemptOutcome::Failed) => AttemptOutcome::Failed,
                Ok(pb::AttemptOutcome::TimedOut) => AttemptOutcome::TimedOut,
                Ok(pb::AttemptOutcome::OomKilled) => AttemptOutcome::OomKilled,
                Ok(pb::AttemptOutcome::Unspecified) | Err(_) => {
                    return Err(ConversionError::AttemptOutcome(finished.outcome))
                }
            };
            for (field, text, max) in [
                ("stdout tail", &finished.stdout_tail, limits.output_tail_bytes_max),
                ("stderr tail", &finished.stderr_tail, limits.output_tail_bytes_max),
                ("message", &finished.message, limits.message_bytes_max),
            ] {
                if text.len() > max {
                    return Err(ConversionError::TooLong { field, bytes: text.len(), max });
                }
            }
            let result = AttemptResult {
                outcome,
                exit_code: finished.exit_code,
                stdout_tail: finished.stdout_tail.clone(),
                stderr_tail: finished.stderr_tail.clone(),
                message: finished.message.clone(),
                peak_memory_bytes: finished.peak_memory_bytes,
            };
            if finished.outputs.is_empty() {
                AttemptStatus::Finished(result)
            } else {
                let sizes = finished.outputs.iter().map(|(name, data)| (name.as_str(), data.len()));
                match workflow_limits.check_outputs(limits.name_bytes_max, sizes) {
                    Ok(()) => AttemptStatus::FinishedWithOutputs(
                        result,
                        finished.outputs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    ),
                    // Outputs past the limits never reach the log: the attempt failed.
                    Err(message) => AttemptStatus::Finished(AttemptResult {
                        outcome: AttemptOutcome::Failed,
                        message,
                        ..result
                    }),
                }
            }
        }
        pb::status_report::Status::Health(health) => {
            let max = colony_core::agent::ENDPOINT_ADDRESS_BYTES_MAX;
            if health.address.len() > max {
                return Err(ConversionError::TooLong {
                    field: "health address",
                    bytes: health.address.len(),
                    max,
                });
            }
            AttemptStatus::Health { healthy: health.healthy, address: health.address.clone() }
        }
    };
    Ok(Command::Report {
        executor,
        task: TaskId(report.task_id),
        token: FencingToken(report.fencing_token),
        status,
    })
}

/// The frame body for a leader's message. An assignment carries its task's spec from `state`;
/// `None` when the task is not there.
pub fn server_message(
    message: &ToExecutor,
    state: &StateMachine,
) -> Option<pb::server_message::Body> {
    Some(match message {
        ToExecutor::Assign { task, attempt, token } => {
            let task = state.get_task(*task)?;
            let mut spec: pb::TaskSpec = (&task.spec).into();
            // A `memory_auto` task runs with what the scheduler sized for it: its memory limit.
            if let (true, Some(resources)) = (task.spec.memory_auto, spec.resources.as_mut()) {
                resources.memory_bytes = task.allocated.memory_bytes;
            }
            pb::server_message::Body::Assign(pb::Assign {
                task_id: task.id.0,
                attempt: *attempt,
                fencing_token: token.0,
                spec: Some(spec),
                inputs: state.task_inputs(task.id).into_iter().collect(),
                outputs: state.task_declared_outputs(task.id).into_iter().collect(),
                // Set by the leader's sessions when the task is traced.
                traceparent: String::new(),
                agent: state.agent_of_task(task.id).and_then(|(key, _)| state.get_agent(key)).map(
                    |agent| pb::AgentRun {
                        port: agent.spec.port,
                        health: agent.spec.health.as_ref().map(pb::HealthCheck::from),
                    },
                ),
            })
        }
        ToExecutor::Kill { task, token, reason } => pb::server_message::Body::Kill(pb::Kill {
            task_id: task.0,
            fencing_token: token.0,
            reason: reason.to_string(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(outcome: i32, stdout_tail: String) -> pb::StatusReport {
        pb::StatusReport {
            report_id: 1,
            task_id: 5,
            fencing_token: 9,
            status: Some(pb::status_report::Status::Finished(pb::Finished {
                outcome,
                stdout_tail,
                ..Default::default()
            })),
            traceparent: String::new(),
        }
    }

    #[test]
    fn reports_become_commands_and_bad_ones_are_refused() {
        let limits = Limits::default();
        let wl = WorkflowLimits::default();
        let ok = report_command(
            ExecutorId(2),
            &finished(pb::AttemptOutcome::Succeeded as i32, "done".into()),
            &limits,
            &wl,
        );
        assert!(
            matches!(
                ok,
                Ok(Command::Report {
                    executor: ExecutorId(2),
                    task: TaskId(5),
                    token: FencingToken(9),
                    ..
                })
            ),
            "{ok:?}"
        );
        let unspecified = report_command(ExecutorId(2), &finished(0, String::new()), &limits, &wl);
        assert_eq!(unspecified, Err(ConversionError::AttemptOutcome(0)));
        let long = "x".repeat(limits.output_tail_bytes_max + 1);
        let too_long = report_command(
            ExecutorId(2),
            &finished(pb::AttemptOutcome::Failed as i32, long),
            &limits,
            &wl,
        );
        assert!(
            matches!(too_long, Err(ConversionError::TooLong { field: "stdout tail", .. })),
            "{too_long:?}"
        );
        // Outputs past a limit turn a success into a failure that names the output.
        let mut big = finished(pb::AttemptOutcome::Succeeded as i32, String::new());
        if let Some(pb::status_report::Status::Finished(f)) = big.status.as_mut() {
            f.outputs.insert("notes".into(), vec![0; wl.output_bytes_max + 1]);
        }
        match report_command(ExecutorId(2), &big, &limits, &wl) {
            Ok(Command::Report { status: AttemptStatus::Finished(result), .. }) => {
                assert_eq!(result.outcome, AttemptOutcome::Failed);
                assert!(
                    result.message.starts_with("output notes is 262145 bytes"),
                    "{}",
                    result.message
                );
            }
            other => panic!("{other:?}"),
        }
        let empty =
            pb::StatusReport { report_id: 1, task_id: 5, fencing_token: 9, ..Default::default() };
        assert_eq!(
            report_command(ExecutorId(2), &empty, &limits, &wl),
            Err(ConversionError::Missing("report.status"))
        );
    }
}
