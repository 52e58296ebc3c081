//! One task attempt as the executor sees it: who it is, how it ended, and the conversion of that
//! ending into the `Finished` report the server commits.

use colony_core::{ExecutorId, FencingToken, TaskId};
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
    Killed,
}

impl Outcome {
    /// The label value of `colony_executor_attempts_total{outcome}`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
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
        }
    }

    /// The report body, or `None` for a killed attempt, which is not reported.
    pub(crate) fn finished(&self) -> Option<pb::Finished> {
        let outcome = match self.outcome {
            Outcome::Succeeded => pb::AttemptOutcome::Succeeded,
            Outcome::Failed => pb::AttemptOutcome::Failed,
            Outcome::TimedOut => pb::AttemptOutcome::TimedOut,
            Outcome::Killed => return None,
        };
        Some(pb::Finished {
            outcome: outcome as i32,
            exit_code: self.exit_code,
            stdout_tail: self.stdout_tail.clone(),
            stderr_tail: self.stderr_tail.clone(),
            message: self.message.clone(),
            peak_memory_bytes: self.peak_memory_bytes,
        })
    }
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
    fn str_tail_keeps_whole_characters() {
        assert_eq!(str_tail("hello", 3), "llo");
        assert_eq!(str_tail("hi", 10), "hi");
        // "é" is two bytes; a cut through it moves forward past it.
        assert_eq!(str_tail("aéb", 2), "b");
    }
}
