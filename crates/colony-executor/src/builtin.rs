//! Handlers built into the executor (`RunSpec::Builtin`): `sleep`, `echo` and `fail`. They run
//! inside the executor as futures with the same timeout and kill semantics as processes.

use crate::attempt::{str_tail, AttemptResult, KillSignal, Outcome};
use crate::runner::OUTPUT_TAIL_BYTES_MAX;
use std::time::Duration;

/// The handler names this executor knows, as an error message lists them.
const HANDLERS: &str = "sleep, echo, fail";

/// Runs `handler` on `input` until it ends, the timeout passes or a kill is requested.
pub(crate) async fn run(
    handler: &str,
    input: &str,
    timeout: Option<Duration>,
    kill: KillSignal,
) -> AttemptResult {
    let deadline = async {
        match timeout {
            Some(after) => {
                tokio::time::sleep(after).await;
                after
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = handle(handler, input) => result,
        after = deadline => AttemptResult::ended(Outcome::TimedOut, format!("timed out after {}", humantime::format_duration(after))),
        _ = kill => AttemptResult::ended(Outcome::Killed, "killed on request".to_owned()),
    }
}

async fn handle(handler: &str, input: &str) -> AttemptResult {
    match handler {
        "sleep" => match humantime::parse_duration(input.trim()) {
            Ok(duration) => {
                tokio::time::sleep(duration).await;
                AttemptResult::succeeded()
            }
            Err(e) => AttemptResult::failed(format!(
                "sleep: {input:?} is not a duration (examples: 500ms, 2s, 1m): {e}"
            )),
        },
        "echo" => AttemptResult {
            stdout_tail: str_tail(input, OUTPUT_TAIL_BYTES_MAX).to_owned(),
            ..AttemptResult::succeeded()
        },
        "fail" => AttemptResult::failed(input),
        other => {
            AttemptResult::failed(format!("unknown builtin handler {other:?} (known: {HANDLERS})"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::sync::oneshot;

    async fn run_alone(handler: &str, input: &str, timeout: Option<Duration>) -> AttemptResult {
        let (_kill, kill_rx) = oneshot::channel();
        run(handler, input, timeout, kill_rx).await
    }

    #[tokio::test]
    async fn sleep_sleeps() {
        let started = Instant::now();
        let result = run_alone("sleep", "100ms", None).await;
        assert_eq!(result.outcome, Outcome::Succeeded);
        assert!(started.elapsed() >= Duration::from_millis(100));
        let bad = run_alone("sleep", "soon", None).await;
        assert_eq!(bad.outcome, Outcome::Failed);
        assert!(bad.message.starts_with("sleep: \"soon\" is not a duration"), "{}", bad.message);
    }

    #[tokio::test]
    async fn sleep_honours_kill_and_timeout() {
        let (kill, kill_rx) = oneshot::channel();
        let started = Instant::now();
        let sleeping = tokio::spawn(async move { run("sleep", "30s", None, kill_rx).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        kill.send(()).expect("sleep is running");
        let result = sleeping.await.expect("sleep task");
        assert_eq!(result.outcome, Outcome::Killed);
        assert!(started.elapsed() < Duration::from_secs(5));

        let timed_out = run_alone("sleep", "30s", Some(Duration::from_millis(100))).await;
        assert_eq!(
            (timed_out.outcome, timed_out.message.as_str()),
            (Outcome::TimedOut, "timed out after 100ms")
        );
    }

    #[tokio::test]
    async fn echo_fail_and_unknown() {
        let echo = run_alone("echo", "hello", None).await;
        assert_eq!((echo.outcome, echo.stdout_tail.as_str()), (Outcome::Succeeded, "hello"));
        let long = run_alone("echo", &"x".repeat(10_000), None).await;
        assert_eq!(long.stdout_tail.len(), OUTPUT_TAIL_BYTES_MAX);
        let fail = run_alone("fail", "disk on fire", None).await;
        assert_eq!((fail.outcome, fail.message.as_str()), (Outcome::Failed, "disk on fire"));
        let unknown = run_alone("teleport", "", None).await;
        assert_eq!(unknown.outcome, Outcome::Failed);
        assert_eq!(
            unknown.message,
            "unknown builtin handler \"teleport\" (known: sleep, echo, fail)"
        );
    }
}
