//! A sequential model of one Colony task, as seen through Submit, GetTask and Cancel, for
//! checking each idempotency key's history with [`super::wgl::check`].
//!
//! Executors move a task along by themselves (pending → assigned → running → a terminal status,
//! with retries back to pending) and clients never see those steps happen, so the model allows
//! any of them between two client operations. What it holds the system to: a task exists from
//! its first submit on; its fencing token is `None` until its first placement and then only
//! grows; only a client cancel makes it Cancelled; and once terminal, its status and token never
//! change again.

use super::wgl;
pub use colony_core::TaskState;

/// The terminal states an executor can produce; Cancelled is the client's alone.
const FINISHED_BY_EXECUTOR: [TaskState; 4] =
    [TaskState::Succeeded, TaskState::Failed, TaskState::TimedOut, TaskState::Lost];

/// What a client saw of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Obs {
    /// The task's status.
    pub status: TaskState,
    /// The task's fencing token; `None` until its first placement.
    pub token: Option<u64>,
}

/// A client operation on one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Input {
    /// Submit with the key this history is about.
    Submit,
    /// GetTask by the task's id (a linearizable read).
    Read,
    /// Cancel by the task's id.
    Cancel,
}

/// What the client was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Output {
    /// The outcome was never learned (timeout, lost connection, unavailable after sending); the
    /// operation may or may not have taken effect.
    Unknown,
    /// The task the key names; `existing` is false only for the submit that created it.
    Submitted {
        /// Whether the task already existed.
        existing: bool,
        /// The task as the submit returned it.
        obs: Obs,
    },
    /// The task as GetTask returned it; `None` for NotFound.
    Read(Option<Obs>),
    /// The cancel took effect; `obs.status` must be Cancelled.
    Cancelled(Obs),
    /// The cancel was refused (FailedPrecondition) because the task had already finished.
    CancelRefused,
    /// The cancel found no such task.
    CancelNotFound,
}

/// What the model knows of a terminal task's frozen fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Token {
    /// Seen after the task finished, so known.
    Exact(Option<u64>),
    /// Not seen since the task finished; at least the last one seen before (`None` < `Some`).
    AtLeast(Option<u64>),
}

/// One state of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum State {
    /// No submit has taken effect.
    Absent,
    /// Submitted and not finished; `token` is the highest fencing token seen so far.
    Live {
        /// The highest token seen; the task's token is at least this.
        token: Option<u64>,
    },
    /// Finished: `status` is terminal and never changes again.
    Done {
        /// The terminal status.
        status: TaskState,
        /// The frozen fencing token.
        token: Token,
    },
}

/// The model of one task; see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskModel;

impl wgl::Model for TaskModel {
    type State = State;
    type Input = Input;
    type Output = Output;

    fn init(&self) -> Vec<State> {
        vec![State::Absent]
    }

    fn step(&self, state: &State, input: &Input, output: &Output) -> Vec<State> {
        let state = *state;
        match (input, *output) {
            (Input::Submit, Output::Unknown) => match state {
                State::Absent => vec![State::Absent, State::Live { token: None }],
                _ => vec![state],
            },
            // The creating submit answers with the task as created: waiting, never placed.
            (Input::Submit, Output::Submitted { existing: false, obs })
                if state == State::Absent
                    && matches!(obs.status, TaskState::Pending | TaskState::Blocked)
                    && obs.token.is_none() =>
            {
                vec![State::Live { token: None }]
            }
            (Input::Submit, Output::Submitted { existing: true, obs }) => {
                observe(state, obs).into_iter().collect()
            }
            (Input::Read, Output::Unknown) => vec![state],
            (Input::Read, Output::Read(None)) | (Input::Cancel, Output::CancelNotFound)
                if state == State::Absent =>
            {
                vec![state]
            }
            (Input::Read, Output::Read(Some(obs))) => observe(state, obs).into_iter().collect(),
            (Input::Cancel, Output::Unknown) => match state {
                State::Live { token } => {
                    vec![
                        state,
                        State::Done { status: TaskState::Cancelled, token: Token::AtLeast(token) },
                    ]
                }
                _ => vec![state],
            },
            (Input::Cancel, Output::Cancelled(obs)) => match state {
                State::Live { token }
                    if obs.status == TaskState::Cancelled && obs.token >= token =>
                {
                    vec![State::Done {
                        status: TaskState::Cancelled,
                        token: Token::Exact(obs.token),
                    }]
                }
                _ => vec![],
            },
            (Input::Cancel, Output::CancelRefused) => match state {
                State::Absent => vec![],
                // Some executor finished the task unseen; which way is left open.
                State::Live { token } => FINISHED_BY_EXECUTOR
                    .iter()
                    .map(|&status| State::Done { status, token: Token::AtLeast(token) })
                    .collect(),
                State::Done { .. } => vec![state],
            },
            // Mismatched input and output, or an output impossible in this state.
            _ => vec![],
        }
    }
}

/// The state after a client saw `obs`, or `None` when the task could not have looked like that.
fn observe(state: State, obs: Obs) -> Option<State> {
    match state {
        State::Absent => None,
        State::Live { token } if obs.token < token => None,
        State::Live { .. } if !obs.status.is_finished() => Some(State::Live { token: obs.token }),
        // Only a client cancel makes a task Cancelled, and it goes through `Done`.
        State::Live { .. } if obs.status == TaskState::Cancelled => None,
        State::Live { .. } => {
            Some(State::Done { status: obs.status, token: Token::Exact(obs.token) })
        }
        State::Done { status, .. } if status != obs.status => None,
        State::Done { token: Token::Exact(token), .. } => (obs.token == token).then_some(state),
        State::Done { status, token: Token::AtLeast(token) } => {
            (obs.token >= token).then_some(State::Done { status, token: Token::Exact(obs.token) })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::wgl::{check, Operation, Verdict};
    use super::*;
    use Input::{Cancel, Read, Submit};
    use TaskState::{Assigned, Cancelled, Pending, Running, Succeeded};

    const MS: u64 = 1_000_000;

    /// One operation: client, call (ms), return (ms; `None` when the outcome was lost), input,
    /// output.
    type Row = (u64, u64, Option<u64>, Input, Output);

    /// Builds a history from rows, ids in order.
    fn history(ops: &[Row]) -> Vec<Operation<Input, Output>> {
        ops.iter()
            .enumerate()
            .map(|(id, &(client, call, ret, input, output))| Operation {
                id,
                client,
                call: call * MS,
                ret: ret.map(|ret| ret * MS),
                input,
                output,
            })
            .collect()
    }

    fn verdict(ops: &[Row]) -> Verdict {
        check(&TaskModel, &history(ops), Duration::from_secs(10))
    }

    fn linearizable(ops: &[Row]) -> bool {
        match verdict(ops) {
            Verdict::Linearizable => true,
            Verdict::NotLinearizable(_) => false,
            Verdict::Unknown { explored } => {
                panic!("tiny history ran out of budget after {explored}")
            }
        }
    }

    fn obs(status: TaskState, token: Option<u64>) -> Obs {
        Obs { status, token }
    }

    fn created() -> Output {
        Output::Submitted { existing: false, obs: obs(TaskState::Pending, None) }
    }

    fn seen(status: TaskState, token: Option<u64>) -> Output {
        Output::Read(Some(obs(status, token)))
    }

    #[test]
    fn task_running_to_completion_is_linearizable() {
        assert!(linearizable(&[
            (1, 0, Some(5), Submit, created()),
            (2, 6, Some(8), Read, seen(Pending, None)),
            (2, 10, Some(12), Read, seen(Running, Some(3))),
            (3, 14, Some(16), Read, seen(Succeeded, Some(3))),
        ]));
    }

    #[test]
    fn token_going_backwards_is_not_linearizable() {
        assert!(!linearizable(&[
            (1, 0, Some(5), Submit, created()),
            (2, 6, Some(8), Read, seen(Running, Some(3))),
            (3, 10, Some(12), Read, seen(Running, Some(2))),
        ]));
    }

    #[test]
    fn stale_read_after_cancel_is_not_linearizable() {
        let ops = [
            (1, 0, Some(5), Submit, created()),
            (1, 6, Some(9), Cancel, Output::Cancelled(obs(Cancelled, None))),
            (2, 10, Some(12), Read, seen(Pending, None)),
        ];
        let Verdict::NotLinearizable(witness) = verdict(&ops) else {
            panic!("a read after an acknowledged cancel saw the task pending");
        };
        assert_eq!(witness.linearized, vec![0, 1]);
        assert_eq!(witness.unplaceable, vec![2]);
    }

    #[test]
    fn not_found_after_submit_ack_is_not_linearizable() {
        assert!(!linearizable(&[
            (1, 0, Some(5), Submit, created()),
            (2, 6, Some(8), Read, Output::Read(None))
        ]));
    }

    #[test]
    fn two_creating_submits_are_not_linearizable() {
        assert!(!linearizable(&[
            (1, 0, Some(5), Submit, created()),
            (2, 1, Some(6), Submit, created())
        ]));
    }

    #[test]
    fn duplicate_submit_returns_the_existing_task() {
        assert!(linearizable(&[
            (1, 0, Some(5), Submit, created()),
            (
                2,
                1,
                Some(9),
                Submit,
                Output::Submitted { existing: true, obs: obs(Running, Some(1)) }
            ),
        ]));
    }

    #[test]
    fn unknown_submit_may_take_effect_between_not_found_and_pending() {
        assert!(linearizable(&[
            (1, 0, None, Submit, Output::Unknown),
            (2, 10, Some(12), Read, Output::Read(None)),
            (2, 20, Some(22), Read, seen(Pending, None)),
        ]));
    }

    #[test]
    fn not_found_after_pending_is_not_linearizable() {
        assert!(!linearizable(&[
            (1, 0, None, Submit, Output::Unknown),
            (2, 10, Some(12), Read, seen(Pending, None)),
            (2, 20, Some(22), Read, Output::Read(None)),
        ]));
    }

    /// A submitted task seen running, then a cancel whose outcome was lost, then `reads`.
    fn after_unknown_cancel(reads: &[Output]) -> Vec<Row> {
        let mut ops = vec![
            (1, 0, Some(5), Submit, created()),
            (2, 6, Some(8), Read, seen(Running, Some(1))),
            (1, 10, None, Cancel, Output::Unknown),
        ];
        ops.extend(
            reads.iter().zip(0..).map(|(&read, i)| (2, 20 + 10 * i, Some(25 + 10 * i), Read, read)),
        );
        ops
    }

    #[test]
    fn unknown_cancel_that_lost_the_race_is_linearizable() {
        let succeeded = seen(Succeeded, Some(1));
        assert!(linearizable(&after_unknown_cancel(&[succeeded, succeeded])));
    }

    #[test]
    fn unknown_cancel_that_took_effect_is_linearizable() {
        assert!(linearizable(&after_unknown_cancel(&[seen(Cancelled, Some(1))])));
    }

    #[test]
    fn succeeded_after_cancelled_is_not_linearizable() {
        assert!(!linearizable(&after_unknown_cancel(&[
            seen(Cancelled, Some(1)),
            seen(Succeeded, Some(1))
        ])));
    }

    #[test]
    fn refused_cancel_concurrent_with_completion_is_linearizable() {
        assert!(linearizable(&[
            (1, 0, Some(5), Submit, created()),
            (3, 10, Some(40), Cancel, Output::CancelRefused),
            (2, 12, Some(14), Read, seen(Running, Some(2))),
            (2, 20, Some(22), Read, seen(Succeeded, Some(2))),
        ]));
    }

    #[test]
    fn refused_cancel_means_the_task_finished_unseen() {
        assert!(linearizable(&[
            (1, 0, Some(5), Submit, created()),
            (2, 6, Some(8), Read, seen(Running, Some(2))),
            (3, 10, Some(12), Cancel, Output::CancelRefused),
            (2, 20, Some(22), Read, seen(TaskState::Lost, Some(2))),
        ]));
    }

    #[test]
    fn refused_cancel_before_a_running_read_is_not_linearizable() {
        assert!(!linearizable(&[
            (1, 0, Some(5), Submit, created()),
            (3, 10, Some(12), Cancel, Output::CancelRefused),
            (2, 20, Some(22), Read, seen(Running, Some(2))),
        ]));
    }

    #[test]
    fn terminal_token_is_frozen() {
        assert!(!linearizable(&[
            (1, 0, Some(5), Submit, created()),
            (2, 10, Some(12), Read, seen(Succeeded, Some(3))),
            (2, 20, Some(22), Read, seen(Succeeded, Some(4))),
        ]));
    }

    #[test]
    fn cancel_of_unknown_task_is_not_found() {
        assert!(linearizable(&[
            (1, 0, Some(2), Cancel, Output::CancelNotFound),
            (2, 3, Some(5), Submit, created()),
            (1, 6, Some(8), Cancel, Output::Cancelled(obs(Cancelled, None))),
            (1, 9, Some(11), Cancel, Output::CancelRefused),
        ]));
    }

    /// Runs a simulated task through executor steps and client operations, each operation
    /// taking effect at an instant inside its interval; some outcomes are lost, and those
    /// operations took effect or not at random. Every such history must pass.
    #[test]
    fn simulated_histories_are_linearizable() {
        // xorshift64*, so the histories are the same on every run.
        let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
        let mut random = |below: u64| {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_F491_4F6C_DD1D) % below
        };
        for _ in 0..500 {
            let mut task: Option<Obs> = None;
            let mut ops = Vec::new();
            for instant in (2..18).map(|k| 100 * k) {
                if let Some(current) = task.filter(|t| !t.status.is_finished() && random(2) == 0) {
                    let token = current.token.unwrap_or(0) + 1 + random(3);
                    let status = match (current.status, random(6)) {
                        (Pending, _) => Assigned,
                        (Assigned, _) => Running,
                        (_, 0) => Pending,
                        (_, 1) => TaskState::Failed,
                        (_, 2) => TaskState::Lost,
                        (_, 3) => TaskState::TimedOut,
                        _ => Succeeded,
                    };
                    let token = if status == Assigned { Some(token) } else { current.token };
                    task = Some(Obs { status, token });
                    continue;
                }
                let lost = random(6) == 0;
                let takes_effect = !lost || random(2) == 0;
                let before = task;
                let (input, output) = match random(3) {
                    0 => (
                        Submit,
                        match task {
                            None => {
                                task = Some(obs(Pending, None));
                                created()
                            }
                            Some(obs) => Output::Submitted { existing: true, obs },
                        },
                    ),
                    1 => (Read, Output::Read(task)),
                    _ => (
                        Cancel,
                        match task {
                            None => Output::CancelNotFound,
                            Some(t) if t.status.is_finished() => Output::CancelRefused,
                            Some(t) => {
                                task = Some(obs(Cancelled, t.token));
                                Output::Cancelled(obs(Cancelled, t.token))
                            }
                        },
                    ),
                };
                if !takes_effect {
                    task = before;
                }
                let call = instant - random(150);
                let ret = (!lost).then(|| instant + random(150));
                ops.push((
                    random(3),
                    call,
                    ret,
                    input,
                    if lost { Output::Unknown } else { output },
                ));
            }
            assert!(linearizable(&ops), "{ops:?}");
        }
    }
}
