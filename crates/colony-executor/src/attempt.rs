//! One task attempt as the executor sees it: who it is, how it ended, and the conversion of that
//! ending into the `Finished` report the server commits.

use crate::runner::OUTPUT_TAIL_BYTES_MAX;
use colony_core::{ExecutorId, FencingToken, Outputs, TaskId};
use colony_proto::pb;
use tokio::sync::oneshot;

/// The attempt an execution belongs to; every process learns it through `COLONY_*` variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Attempt {
    pub task_id: TaskId,
    pub attempt: u32,
    pub fencing_token: FencingToken,
    pub executor_id: ExecutorId,
}

/// Resolves when the attempt must stop: a kill was requested, or whoever could request one is
/// gone (so an abandoned attempt never outlives its owner).
pub(crate) type KillSignal = oneshot::Receiver<()>;

/// How an attempt ended. `Killed` is never reported: a killed attempt was already superseded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Succeeded,
    Failed,
    TimedOut,
    /// Passed its memory limit; the kernel killed it.
    OomKilled,
    Killed,
}

impl Outcome {
    /// The label value of `colony_executor_attempts_total{outcome}`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::OomKilled => "oom_killed",
            Outcome::Killed => "killed",
        }
    }
}

/// What an attempt leaves behind: its outcome and the last bytes it wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AttemptResult {
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub stdout_tail: String,
    pub stderr_tail: String,
    pub message: String,
    /// The most memory the attempt's process group held at once, as sampled.
    pub peak_memory_bytes: Option<u64>,
    /// What a successful attempt wrote to `$COLONY_OUTPUT_DIR` (checked against the limits).
    pub outputs: Outputs,
}

impl AttemptResult {
    pub(crate) fn succeeded() -> AttemptResult {
        AttemptResult::ended(Outcome::Succeeded, String::new())
    }

    pub(crate) fn failed(message: impl Into<String>) -> AttemptResult {
        AttemptResult::ended(Outcome::Failed, message.into())
    }

    pub(crate) fn ended(outcome: Outcome, message: String) -> AttemptResult {
        AttemptResult {
            outcome,
            exit_code: None,
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            message,
            peak_memory_bytes: None,
            outputs: Outputs::new(),
        }
    }

    /// The report body, or `None` for a killed attempt, which is not reported.
    pub(crate) fn finished(&self) -> Option<pb::Finished> {
        let outcome = match self.outcome {
            Outcome::Succeeded => pb::AttemptOutcome::Succeeded,
            Outcome::Failed => pb::AttemptOutcome::Failed,
            Outcome::TimedOut => pb::AttemptOutcome::TimedOut,
            Outcome::OomKilled => pb::AttemptOutcome::OomKilled,
            Outcome::Killed => return None,
        };
        // Whatever produced them, the texts fit what the server accepts.
        Some(pb::Finished {
            outcome: outcome as i32,
            exit_code: self.exit_code,
            stdout_tail: str_tail(&self.stdout_tail, OUTPUT_TAIL_BYTES_MAX).to_owned(),
            stderr_tail: str_tail(&self.stderr_tail, OUTPUT_TAIL_BYTES_MAX).to_owned(),
            message: truncated(&self.message, MESSAGE_BYTES_MAX),
            peak_memory_bytes: self.peak_memory_bytes,
            outputs: self.outputs.clone().into_iter().collect(),
        })
    }
}

/// The longest message a report carries (the server's `message_bytes_max`).
pub(crate) const MESSAGE_BYTES_MAX: usize = 4096;
/// Ends a message cut to fit.
const TRUNCATED_MARKER: &str = "… [truncated]";

/// `text`, or its first bytes up to a character boundary and a marker, in at most `bytes_max`
/// bytes.
pub(crate) fn truncated(text: &str, bytes_max: usize) -> String {
    if text.len() <= bytes_max {
        return text.to_owned();
    }
    let mut end = bytes_max.saturating_sub(TRUNCATED_MARKER.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{TRUNCATED_MARKER}", &text[..end])
}

/// The last `bytes_max` bytes of `text`, cut forward to a character boundary.
pub(crate) fn str_tail(text: &str, bytes_max: usize) -> &str {
    let mut start = text.len().saturating_sub(bytes_max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn killed_attempts_are_not_reported() {
        assert_eq!(AttemptResult::ended(Outcome::Killed, "x".into()).finished(), None);
        let finished = AttemptResult::failed("boom").finished();
        assert_eq!(
            finished.map(|f| (f.outcome, f.message)),
            Some((pb::AttemptOutcome::Failed as i32, "boom".to_owned()))
        );
    }

    #[test]
    fn reports_always_fit_the_servers_limits() {
        let program = "p".repeat(6000);
        let mut result = AttemptResult::failed(format!("program not found: {program}"));
        // Lossy decoding of binary output grows it: three bytes per replaced byte.
        result.stdout_tail = "\u{FFFD}".repeat(OUTPUT_TAIL_BYTES_MAX);
        result.stderr_tail = format!("a{}", "é".repeat(OUTPUT_TAIL_BYTES_MAX));
        let finished = result.finished().expect("a failure is reported");
        assert!(finished.message.len() <= MESSAGE_BYTES_MAX, "{}", finished.message.len());
        assert!(finished.message.starts_with("program not found: ppp"));
        assert!(finished.message.ends_with(TRUNCATED_MARKER));
        assert!(finished.stdout_tail.len() <= OUTPUT_TAIL_BYTES_MAX);
        assert!(finished.stdout_tail.len() > OUTPUT_TAIL_BYTES_MAX - 3);
        assert_eq!(finished.stderr_tail.len(), OUTPUT_TAIL_BYTES_MAX);
        assert_eq!(truncated("short", 10), "short");
        assert_eq!(truncated(&"é".repeat(10), 17), "é… [truncated]");
    }

    #[test]
    fn str_tail_keeps_whole_characters() {
        assert_eq!(str_tail("hello", 3), "llo");
        assert_eq!(str_tail("hi", 10), "hi");
        // "é" is two bytes; a cut through it moves forward past it.
        assert_eq!(str_tail("aéb", 2), "b");
    }
}
