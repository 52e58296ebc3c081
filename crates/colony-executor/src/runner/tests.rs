use super::*;
use colony_core::{ExecutorId, FencingToken, TaskId};
use tokio::sync::oneshot;

fn attempt(task: u64) -> Attempt {
    Attempt {
        task_id: TaskId(task),
        attempt: 1,
        fencing_token: FencingToken(task * 10),
        executor_id: ExecutorId(3),
    }
}

async fn sh(data_dir: &Path, task: u64, script: &str, timeout: Option<Duration>) -> AttemptResult {
    let (_kill, kill_rx) = oneshot::channel();
    run_sh(data_dir, task, script, timeout, kill_rx).await
}

async fn run_sh(
    data_dir: &Path,
    task: u64,
    script: &str,
    timeout: Option<Duration>,
    kill: KillSignal,
) -> AttemptResult {
    let attempt = attempt(task);
    let args = vec!["-c".to_owned(), script.to_owned()];
    let env = BTreeMap::from([("GREETING".to_owned(), "hello there".to_owned())]);
    let sandbox = Sandbox::plain(&data_dir.join("work"));
    let spec = ProcessRun {
        attempt: &attempt,
        program: "sh",
        args: &args,
        env: &env,
        timeout,
        memory_bytes: 0,
        cpu_millis: 0,
        gpus: 0,
        sandbox: &sandbox,
        io: &StepIo::default(),
        port: None,
        local: None,
    };
    run(spec, kill).await
}

/// Whether `pid` still runs a little after it was killed: signals take a moment to land, and
/// a killed orphan may linger as a zombie until its new parent reaps it, which counts as gone.
async fn process_alive(pid: i32) -> bool {
    for _ in 0..50 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state letter follows the parenthesised command name.
        let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
        if matches!(state, None | Some('Z' | 'X')) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test]
async fn exit_codes_map_to_outcomes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ok = sh(dir.path(), 1, "echo out; echo err >&2", None).await;
    assert_eq!((ok.outcome, ok.exit_code), (Outcome::Succeeded, Some(0)));
    assert_eq!((ok.stdout_tail.as_str(), ok.stderr_tail.as_str()), ("out\n", "err\n"));
    let failed = sh(dir.path(), 2, "exit 3", None).await;
    assert_eq!((failed.outcome, failed.exit_code), (Outcome::Failed, Some(3)));
    assert_eq!(failed.message, "exited with status 3");
    let signalled = sh(dir.path(), 3, "kill -9 $$", None).await;
    assert_eq!((signalled.outcome, signalled.exit_code), (Outcome::Failed, None));
    assert!(signalled.message.contains("SIGKILL"), "{}", signalled.message);
}

#[tokio::test]
async fn only_the_output_tail_is_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    // 1 MiB of 'a' then a recognisable end, on both streams.
    let script = "head -c 1048576 /dev/zero | tr '\\0' a; printf END; head -c 1048576 /dev/zero | tr '\\0' b >&2; printf END >&2";
    let result = sh(dir.path(), 1, script, None).await;
    assert_eq!(result.outcome, Outcome::Succeeded);
    assert_eq!(result.stdout_tail.len(), OUTPUT_TAIL_BYTES_MAX);
    assert_eq!(result.stderr_tail.len(), OUTPUT_TAIL_BYTES_MAX);
    assert!(result.stdout_tail.ends_with("aaaEND"));
    assert!(result.stderr_tail.ends_with("bbbEND"));
}

#[tokio::test]
async fn timeout_kills_the_whole_group() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pids = dir.path().join("pids");
    let script = format!("sleep 30 & echo $! > {0}; echo $$ >> {0}; sleep 30", pids.display());
    let started = std::time::Instant::now();
    let result = sh(dir.path(), 1, &script, Some(Duration::from_millis(500))).await;
    assert_eq!(result.outcome, Outcome::TimedOut);
    assert_eq!(result.message, "timed out after 500ms");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    let pids = std::fs::read_to_string(&pids).expect("pid file");
    for pid in pids.lines() {
        let pid: i32 = pid.parse().expect("pid");
        assert!(!process_alive(pid).await, "process {pid} survived the timeout");
    }
    // Timed-out attempts keep their working directory for debugging.
    assert!(dir.path().join("work/failed/1-1").is_dir());
    assert!(!dir.path().join("work/1-1").exists());
}

#[tokio::test]
async fn sigterm_ignored_means_sigkill_after_the_grace() {
    let dir = tempfile::tempdir().expect("temp dir");
    let started = std::time::Instant::now();
    let result =
        sh(dir.path(), 1, "trap '' TERM; sleep 30", Some(Duration::from_millis(200))).await;
    assert_eq!(result.outcome, Outcome::TimedOut);
    assert!(started.elapsed() >= TERM_GRACE, "SIGKILL came before the grace ended");
    assert!(started.elapsed() < TERM_GRACE + Duration::from_secs(5));
}

#[tokio::test]
async fn kill_on_request_stops_the_group() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pid_file = dir.path().join("pid");
    let (kill, kill_rx) = oneshot::channel();
    let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
    let running = tokio::spawn({
        let data_dir = dir.path().to_owned();
        async move { run_sh(&data_dir, 1, &script, None, kill_rx).await }
    });
    while !pid_file.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill.send(()).expect("attempt is running");
    let result = running.await.expect("attempt task");
    assert_eq!(result.outcome, Outcome::Killed);
    let pid: i32 = std::fs::read_to_string(&pid_file).expect("pid").trim().parse().expect("pid");
    assert!(!process_alive(pid).await);
    // A killed attempt was superseded: nothing worth keeping.
    assert!(!dir.path().join("work/1-1").exists());
    assert!(!dir.path().join("work/failed/1-1").exists());
}

#[tokio::test]
async fn peak_memory_of_the_group_is_measured() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A child of the shell holds about 64 MiB for a moment.
    let result = sh(
        dir.path(),
        31,
        "python3 -c 'b = bytearray(64 << 20); import time; time.sleep(0.6)'",
        None,
    )
    .await;
    assert_eq!(result.outcome, Outcome::Succeeded, "{result:?}");
    let peak = result.peak_memory_bytes.expect("a peak was sampled");
    assert!(peak >= 64 << 20, "peak {peak} bytes should include the 64 MiB the child held");
}

#[tokio::test]
async fn missing_program_fails_with_a_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let attempt = attempt(1);
    let (_kill, kill_rx) = oneshot::channel();
    let sandbox = Sandbox::plain(dir.path());
    let spec = ProcessRun {
        attempt: &attempt,
        program: "./report.sh",
        args: &[],
        env: &BTreeMap::new(),
        timeout: None,
        memory_bytes: 0,
        cpu_millis: 0,
        gpus: 0,
        sandbox: &sandbox,
        io: &StepIo::default(),
        port: None,
        local: None,
    };
    let result = run(spec, kill_rx).await;
    assert_eq!(result.outcome, Outcome::Failed);
    assert_eq!(result.message, "program not found: ./report.sh");
}

#[tokio::test]
async fn environment_and_working_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = "echo \"$GREETING|$COLONY_TASK_ID|$COLONY_ATTEMPT|$COLONY_FENCING_TOKEN|$COLONY_EXECUTOR_ID\"; pwd";
    let result = sh(dir.path(), 7, script, None).await;
    assert_eq!(result.outcome, Outcome::Succeeded);
    let mut lines = result.stdout_tail.lines();
    assert_eq!(lines.next(), Some("hello there|7|1|70|3"));
    let cwd = std::fs::canonicalize(dir.path().join("work")).expect("work dir").join("7-1");
    assert_eq!(lines.next().map(PathBuf::from), Some(cwd));
    // A successful attempt's directory is removed.
    assert!(!dir.path().join("work/7-1").exists());
    // Nothing of the executor's environment reaches the task.
    let names = sh(dir.path(), 8, "env | cut -d= -f1", None).await;
    let shell_own = ["PWD", "OLDPWD", "SHLVL", "_"];
    for name in names.stdout_tail.lines().filter(|n| !shell_own.contains(n)) {
        let expected = ["PATH", "HOME", "GREETING"].contains(&name) || name.starts_with("COLONY_");
        assert!(expected, "the task saw {name} from the executor's environment");
    }
}

/// A sandbox with this host's control groups; `None`, said loudly, where they are not usable
/// (not root, or no memory/cpu/pids controller): the integration tests need them anyway.
fn contained(dir: &Path) -> Option<Sandbox> {
    let instance = format!("unit-{}", rand::random::<u32>());
    let containment = crate::cgroup::Containment::probe(&instance);
    if !containment.missing().is_empty() {
        eprintln!("SKIPPED: cgroup controllers {:?} are not usable here", containment.missing());
        return None;
    }
    let work = dir.join("work");
    Some(Sandbox::new(work, None, Some(containment), 64, 0))
}

async fn run_contained(
    sandbox: &Sandbox,
    task: u64,
    script: &str,
    memory_bytes: u64,
    kill: KillSignal,
) -> AttemptResult {
    let attempt = attempt(task);
    let args = vec!["-c".to_owned(), script.to_owned()];
    let spec = ProcessRun {
        attempt: &attempt,
        program: "sh",
        args: &args,
        env: &BTreeMap::new(),
        timeout: None,
        memory_bytes,
        cpu_millis: 500,
        gpus: 0,
        sandbox,
        io: &StepIo::default(),
        port: None,
        local: None,
    };
    run(spec, kill).await
}

#[tokio::test]
async fn passing_the_memory_limit_is_oom_killed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(sandbox) = contained(dir.path()) else { return };
    let (_kill, kill_rx) = oneshot::channel();
    let hog = "python3 -c 'b = bytearray(1 << 30); print(len(b))'";
    let result = run_contained(&sandbox, 1, hog, 64 << 20, kill_rx).await;
    assert_eq!(result.outcome, Outcome::OomKilled, "{result:?}");
    assert!(result.message.contains("memory limit of 64.0 MiB"), "{}", result.message);
    let peak = result.peak_memory_bytes.expect("the group's peak");
    assert!(peak <= 64 << 20 && peak > 32 << 20, "peak {peak}");
    // Within its limit, the same group accounting gives the peak.
    let (_kill, kill_rx) = oneshot::channel();
    let fits = "python3 -c 'b = bytearray(48 << 20); print(len(b))'";
    let result = run_contained(&sandbox, 2, fits, 128 << 20, kill_rx).await;
    assert_eq!(result.outcome, Outcome::Succeeded, "{result:?}");
    assert!(result.peak_memory_bytes.is_some_and(|p| p >= 48 << 20), "{result:?}");
}

#[tokio::test]
async fn processes_that_leave_the_process_group_are_killed_with_the_attempt() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(sandbox) = contained(dir.path()) else { return };
    let shared = dir.path().join("pids");
    std::fs::create_dir(&shared).expect("pid dir");
    // Killed on request: the escaped sleeper goes with the attempt.
    let pid_file = shared.join("escaped");
    let script = format!("setsid sleep 300 & echo $! > {}; wait", pid_file.display());
    let (kill, kill_rx) = oneshot::channel();
    let running = tokio::spawn({
        let pid_file = pid_file.clone();
        async move {
            let sandbox = sandbox;
            let result = run_contained(&sandbox, 3, &script, 0, kill_rx).await;
            // Ended normally: a double-forked daemon it left goes too.
            let (_kill, kill_rx) = oneshot::channel();
            let daemon =
                format!("(setsid sh -c 'sleep 300' & echo $! > {}.2) ; exit 0", pid_file.display());
            let ended = run_contained(&sandbox, 4, &daemon, 0, kill_rx).await;
            (result, ended)
        }
    });
    while !pid_file.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill.send(()).expect("attempt is running");
    let (killed, ended) = running.await.expect("attempt task");
    assert_eq!(killed.outcome, Outcome::Killed);
    assert_eq!(ended.outcome, Outcome::Succeeded, "{ended:?}");
    for file in [pid_file.clone(), pid_file.with_extension("2")] {
        let name = format!("{}.2", pid_file.display());
        let file = if file == pid_file { file } else { PathBuf::from(name) };
        let pid: i32 = std::fs::read_to_string(&file).expect("pid").trim().parse().expect("pid");
        assert!(!process_alive(pid).await, "process {pid} ({}) escaped", file.display());
    }
}

#[tokio::test]
async fn failed_working_directories_are_capped() {
    let dir = tempfile::tempdir().expect("temp dir");
    for task in 1..=(FAILED_WORK_DIRS_KEPT_MAX as u64 + 3) {
        let result = sh(dir.path(), task, "touch evidence; exit 1", None).await;
        assert_eq!(result.outcome, Outcome::Failed);
    }
    let kept = std::fs::read_dir(dir.path().join("work/failed")).expect("failed dir").count();
    assert_eq!(kept, FAILED_WORK_DIRS_KEPT_MAX);
    let last = FAILED_WORK_DIRS_KEPT_MAX + 3;
    assert!(dir.path().join(format!("work/failed/{last}-1/evidence")).exists());
}

#[test]
fn tail_keeps_the_last_bytes() {
    let mut tail = Tail::default();
    tail.push(&[b'x'; 3000]);
    tail.push(&[b'y'; 3000]);
    assert_eq!(tail.0.len(), OUTPUT_TAIL_BYTES_MAX);
    assert_eq!(tail.0.iter().filter(|b| **b == b'x').count(), OUTPUT_TAIL_BYTES_MAX - 3000);
    tail.push(&[b'z'; 10_000]);
    assert_eq!(tail.into_string(), "z".repeat(OUTPUT_TAIL_BYTES_MAX));
}

#[tokio::test]
async fn a_step_reads_its_inputs_and_its_outputs_come_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let attempt = attempt(7);
    let (_kill, kill_rx) = oneshot::channel();
    let sandbox = Sandbox::plain(dir.path());
    let io = StepIo {
        inputs: colony_core::Outputs::from([("notes".to_owned(), b"raft notes".to_vec())]),
        declared: std::collections::BTreeSet::from(["report".to_owned()]),
    };
    let args = vec![
        "-c".to_owned(),
        r#"set -e; tr a-z A-Z < "$COLONY_INPUT_DIR/notes" > "$COLONY_OUTPUT_DIR/report""#
            .to_owned(),
    ];
    let spec = ProcessRun {
        attempt: &attempt,
        program: "sh",
        args: &args,
        env: &BTreeMap::new(),
        timeout: None,
        memory_bytes: 0,
        cpu_millis: 0,
        gpus: 0,
        sandbox: &sandbox,
        io: &io,
        port: None,
        local: None,
    };
    let result = run(spec, kill_rx).await;
    assert_eq!(result.outcome, Outcome::Succeeded, "{}: {}", result.message, result.stderr_tail);
    assert_eq!(result.outputs.get("report").map(Vec::as_slice), Some(&b"RAFT NOTES"[..]));
}

#[tokio::test]
async fn a_step_that_skips_a_declared_output_fails_saying_which() {
    let dir = tempfile::tempdir().expect("temp dir");
    let attempt = attempt(8);
    let (_kill, kill_rx) = oneshot::channel();
    let sandbox = Sandbox::plain(dir.path());
    let io = StepIo {
        inputs: colony_core::Outputs::new(),
        declared: std::collections::BTreeSet::from(["report".to_owned()]),
    };
    let args = vec!["-c".to_owned(), "true".to_owned()];
    let spec = ProcessRun {
        attempt: &attempt,
        program: "sh",
        args: &args,
        env: &BTreeMap::new(),
        timeout: None,
        memory_bytes: 0,
        cpu_millis: 0,
        gpus: 0,
        sandbox: &sandbox,
        io: &io,
        port: None,
        local: None,
    };
    let result = run(spec, kill_rx).await;
    assert_eq!(result.outcome, Outcome::Failed);
    assert!(result.message.contains("declared output report"), "{}", result.message);
}
