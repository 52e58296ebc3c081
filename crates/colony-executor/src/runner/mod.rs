//! Runs one attempt as a child process: as the sandbox's user, with a clean environment, in its
//! own working directory, control group and process group, keeping only the tail of its output.
//! On timeout or kill every process of the attempt is stopped (SIGTERM, then SIGKILL after a
//! grace period): through the control group when there is one, so a process that left the
//! process group (`setsid`, a double fork) goes too.

use crate::attempt::{Attempt, AttemptResult, KillSignal, Outcome};
use crate::cgroup::AttemptGroup;
use crate::local::LocalApi;
use crate::sandbox::{attempt_command, Sandbox};
use crate::step_io::{self, StepIo};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;

/// Bytes kept from the end of each of stdout and stderr.
pub(crate) const OUTPUT_TAIL_BYTES_MAX: usize = 4096;
/// Time a process group has between SIGTERM and SIGKILL.
pub(crate) const TERM_GRACE: Duration = Duration::from_secs(2);
/// Time the output pipes get to reach end-of-file once the process has ended; a descendant that
/// escaped the process group may hold them open forever.
const OUTPUT_DRAIN_MAX: Duration = Duration::from_secs(1);
/// Failed attempts' working directories kept for debugging; older ones are removed.
const FAILED_WORK_DIRS_KEPT_MAX: usize = 20;
const READ_CHUNK_BYTES: usize = 8192;
/// How often an attempt's process group's memory is sampled for its peak.
const MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_millis(200);

/// What one process attempt runs, with what, and where.
pub(crate) struct ProcessRun<'a> {
    pub attempt: &'a Attempt,
    pub program: &'a str,
    pub args: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub timeout: Option<Duration>,
    /// What it reserved: its memory limit (0: none), CPU quota (0: none) and GPU count.
    pub memory_bytes: u64,
    pub cpu_millis: u64,
    pub gpus: u32,
    pub sandbox: &'a Sandbox,
    /// Its input files and the outputs it must write.
    pub io: &'a StepIo,
    /// The port leased to it (an agent instance that asked for one), in `COLONY_PORT`.
    pub port: Option<u16>,
    /// Serves its local endpoint (`COLONY_AGENT_SOCKET`), for its task's namespace.
    pub local: Option<(&'a LocalApi, &'a str)>,
}

/// `WORK/TASK-ATTEMPT`: where an attempt runs.
pub(crate) fn work_dir(work_root: &Path, attempt: &Attempt) -> PathBuf {
    work_root.join(attempt_name(attempt))
}

/// The attempt's name for its directory and control group.
fn attempt_name(attempt: &Attempt) -> String {
    format!("{}-{}", attempt.task_id, attempt.attempt)
}

/// `WORK/failed`: where the working directories of failed attempts are kept.
fn failed_dir(work_root: &Path) -> PathBuf {
    work_root.join("failed")
}

/// Runs the attempt to its end and cleans up its working directory (kept, under `failed/`, when
/// the attempt failed or timed out).
pub(crate) async fn run(run: ProcessRun<'_>, kill: KillSignal) -> AttemptResult {
    let started = std::time::Instant::now();
    let work_root = run.sandbox.work_root.clone();
    let dir = work_dir(&work_root, run.attempt);
    if let Err(e) = prepare_dir(&dir).await.and_then(|()| run.sandbox.own(&dir)) {
        return AttemptResult::failed(format!(
            "cannot create working directory {}: {e}",
            dir.display()
        ));
    }
    if let Err(e) = step_io::prepare(&dir, run.io, |path| run.sandbox.own(path)) {
        return AttemptResult::failed(e);
    }
    // Without its endpoint the attempt still runs; only messaging from inside it is unavailable.
    let endpoint = run.local.and_then(|(api, namespace)| {
        match api.serve(&dir, run.attempt, namespace, run.sandbox.run_as.as_ref()) {
            Ok(endpoint) => Some(endpoint),
            Err(e) => {
                tracing::warn!(task = %run.attempt.task_id, error = %e, "the attempt runs without its local endpoint");
                None
            }
        }
    });
    let socket = endpoint.as_ref().map(|e| e.path.clone());
    let mut result = run_in(&run, &dir, socket.as_deref(), started, kill).await;
    drop(endpoint);
    if result.outcome == Outcome::Succeeded {
        let owner = run.sandbox.run_as.as_ref().map(|user| user.uid);
        match step_io::collect(&dir, &run.io.declared, owner) {
            Ok(outputs) => result.outputs = outputs,
            Err(message) => {
                result.outcome = Outcome::Failed;
                result.message = message;
            }
        }
    }
    let keep = matches!(result.outcome, Outcome::Failed | Outcome::TimedOut | Outcome::OomKilled);
    // Removing a large tree blocks; keep it off the runtime's threads.
    let retired = tokio::task::spawn_blocking(move || retire(&work_root, &dir, keep)).await;
    match retired {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(task = %run.attempt.task_id, error = %e, "could not clean up a working directory")
        }
        Err(e) => {
            tracing::warn!(task = %run.attempt.task_id, error = %e, "working directory clean-up did not finish")
        }
    }
    result
}

/// Creates an empty working directory, replacing whatever an earlier run of this attempt left.
async fn prepare_dir(dir: &Path) -> io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::fs::create_dir_all(dir).await
}

/// Moves the working directories a previous run of the executor left in the work root
/// (attempts cut short by its stop) to `failed/`; returns how many there were.
pub(crate) fn retire_leftovers(work_root: &Path) -> io::Result<usize> {
    let entries = match std::fs::read_dir(work_root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut count = 0;
    for entry in entries {
        let entry = entry?;
        if entry.file_name() == "failed" {
            continue;
        }
        retire(work_root, &entry.path(), true)?;
        count += 1;
    }
    Ok(count)
}

/// Removes a finished attempt's directory, or moves it under `failed/` and prunes that to the
/// newest `FAILED_WORK_DIRS_KEPT_MAX`.
fn retire(work_root: &Path, dir: &Path, keep: bool) -> io::Result<()> {
    if !keep {
        return remove_tree(dir);
    }
    let failed = failed_dir(work_root);
    std::fs::create_dir_all(&failed)?;
    // Kept for the operator: no task may look into another's leftovers.
    std::fs::set_permissions(&failed, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let Some(name) = dir.file_name() else { return remove_tree(dir) };
    let target = failed.join(name);
    remove_tree(&target)?;
    std::fs::rename(dir, &target)?;
    prune_failed(&failed)
}

fn remove_tree(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn prune_failed(failed: &Path) -> io::Result<()> {
    let mut kept = Vec::new();
    for entry in std::fs::read_dir(failed)? {
        let entry = entry?;
        let modified = entry.metadata()?.modified()?;
        kept.push((modified, entry.path()));
    }
    if kept.len() <= FAILED_WORK_DIRS_KEPT_MAX {
        return Ok(());
    }
    kept.sort();
    let excess = kept.len() - FAILED_WORK_DIRS_KEPT_MAX;
    for (_, path) in kept.into_iter().take(excess) {
        remove_tree(&path)?;
    }
    Ok(())
}

/// How the supervised process ended.
enum Ending {
    Exited(ExitStatus),
    TimedOut(Duration),
    Killed,
    WaitFailed(io::Error),
}

async fn run_in(
    run: &ProcessRun<'_>,
    dir: &Path,
    socket: Option<&Path>,
    started: std::time::Instant,
    mut kill: KillSignal,
) -> AttemptResult {
    let attempt = run.attempt;
    let sandbox = run.sandbox;
    let cgroup = match sandbox.group(&attempt_name(attempt), run.memory_bytes, run.cpu_millis) {
        Ok(cgroup) => cgroup,
        Err(e) => return AttemptResult::failed(format!("cannot contain the attempt: {e}")),
    };
    let gpus = match sandbox.has_gpus() || run.gpus > 0 {
        false => None,
        true => match sandbox.lease_gpus(run.gpus) {
            Some(lease) => Some(lease),
            None => {
                return AttemptResult::failed(format!(
                    "{} GPU indices are not free on this executor",
                    run.gpus
                ))
            }
        },
    };
    let mut command = attempt_command(run.program, run.args, dir, sandbox.run_as.as_ref());
    // Nothing of the executor's environment: a fixed PATH and HOME, the spec's own variables,
    // then the attempt's, which the spec cannot override.
    command
        .envs(run.env)
        .env("COLONY_TASK_ID", attempt.task_id.to_string())
        .env("COLONY_ATTEMPT", attempt.attempt.to_string())
        .env("COLONY_FENCING_TOKEN", attempt.fencing_token.to_string())
        .env("COLONY_EXECUTOR_ID", attempt.executor_id.to_string())
        .env("COLONY_INPUT_DIR", step_io::input_dir(dir))
        .env("COLONY_OUTPUT_DIR", step_io::output_dir(dir))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(lease) = &gpus {
        command.env("CUDA_VISIBLE_DEVICES", lease.visible_devices());
    }
    if let Some(port) = run.port {
        command.env("COLONY_PORT", port.to_string());
    }
    if let Some(socket) = socket {
        command.env("COLONY_AGENT_SOCKET", socket);
    }
    if let Some(cgroup) = &cgroup {
        cgroup.join_on_exec(&mut command);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            if let Some(cgroup) = &cgroup {
                cgroup.remove();
            }
            return AttemptResult::failed(spawn_failure(run.program, &e));
        }
    };
    if let Some(histogram) = &sandbox.start_seconds {
        histogram.observe(started.elapsed().as_secs_f64());
    }
    // `process_group(0)` makes the child the leader of a group numbered by its pid.
    let group = GroupGuard::new(child.id(), cgroup);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut stdout_tail = Tail::default();
    let mut stderr_tail = Tail::default();
    // Without a memory controller, the peak is sampled from /proc.
    let sampled = !group.accounts_memory();
    let mut peak_memory_bytes = match sampled {
        true => child.id().map_or(0, group_memory_bytes),
        false => 0,
    };
    let ending = {
        let mut readers = pin!(async {
            tokio::join!(drain(stdout, &mut stdout_tail), drain(stderr, &mut stderr_tail))
        });
        let mut supervised = pin!(supervise(&mut child, &group, run.timeout, &mut kill));
        let mut readers_done = false;
        let mut sampler = tokio::time::interval(MEMORY_SAMPLE_INTERVAL);
        let ending = loop {
            tokio::select! {
                ending = &mut supervised => break ending,
                _ = &mut readers, if !readers_done => readers_done = true,
                _ = sampler.tick(), if sampled => {
                    if let Some(leader) = group.leader() {
                        peak_memory_bytes = peak_memory_bytes.max(group_memory_bytes(leader));
                    }
                }
            }
        };
        // The leader is gone; whatever it left behind goes with it, so the pipes close.
        group.kill_rest();
        if !readers_done {
            let drained = tokio::time::timeout(OUTPUT_DRAIN_MAX, &mut readers).await;
            if drained.is_err() {
                tracing::debug!(task = %attempt.task_id, "output pipes still open after the process ended; tails cut short");
            }
        }
        ending
    };
    let memory = group.memory();
    let mut result = match ending {
        Ending::Exited(status) => exit_result(status),
        Ending::TimedOut(after) => AttemptResult::ended(
            Outcome::TimedOut,
            format!("timed out after {}", humantime::format_duration(after)),
        ),
        Ending::Killed => AttemptResult::ended(Outcome::Killed, "killed on request".to_owned()),
        Ending::WaitFailed(e) => AttemptResult::failed(format!("lost track of the process: {e}")),
    };
    if result.outcome == Outcome::Failed && memory.oom_kills > 0 {
        result.outcome = Outcome::OomKilled;
        result.message = oom_message(&memory, &result.message);
    }
    group.remove();
    result.stdout_tail = stdout_tail.into_string();
    result.stderr_tail = stderr_tail.into_string();
    result.peak_memory_bytes = match sampled {
        true => (peak_memory_bytes > 0).then_some(peak_memory_bytes),
        false => memory.peak_bytes,
    };
    result
}

/// Why an attempt was OOM-killed, with its limit and peak.
fn oom_message(memory: &crate::cgroup::MemoryUse, how: &str) -> String {
    let mib = |bytes: Option<u64>| {
        bytes.map_or_else(
            || "?".to_owned(),
            |b| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        )
    };
    format!(
        "oom_killed: passed its memory limit of {} (peak {}, {} process(es) killed by the kernel; {how})",
        mib(memory.limit_bytes),
        mib(memory.peak_bytes),
        memory.oom_kills
    )
}

/// The sum of the high-water resident sizes (`VmHWM`) of the processes in group `leader`, from
/// /proc: a process's own peak is exact; samples add up the group's members alive at the time.
fn group_memory_bytes(leader: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    let mut total = 0u64;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The command name (field 2) may hold spaces: fields after its closing parenthesis.
        let pgrp = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2))
            .and_then(|f| f.parse::<u32>().ok());
        if pgrp != Some(leader) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        let hwm_kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        total = total.saturating_add(hwm_kib * 1024);
    }
    total
}

fn spawn_failure(program: &str, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => format!("program not found: {program}"),
        io::ErrorKind::PermissionDenied => format!("program is not executable: {program}"),
        _ => format!("cannot start {program}: {e}"),
    }
}

fn exit_result(status: ExitStatus) -> AttemptResult {
    match (status.code(), status.signal()) {
        (Some(0), _) => AttemptResult { exit_code: Some(0), ..AttemptResult::succeeded() },
        (Some(code), _) => AttemptResult {
            exit_code: Some(code),
            ..AttemptResult::failed(format!("exited with status {code}"))
        },
        (None, Some(signal)) => {
            let name = Signal::try_from(signal).map(Signal::as_str).unwrap_or("unknown");
            AttemptResult::failed(format!("killed by signal {signal} ({name})"))
        }
        (None, None) => AttemptResult::failed(format!("ended without an exit status: {status}")),
    }
}

/// Waits for the process, stopping its group at the timeout or on a kill request.
async fn supervise(
    child: &mut Child,
    group: &GroupGuard,
    timeout: Option<Duration>,
    kill: &mut KillSignal,
) -> Ending {
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
        status = child.wait() => match status {
            Ok(status) => Ending::Exited(status),
            Err(e) => Ending::WaitFailed(e),
        },
        after = deadline => {
            terminate(child, group).await;
            Ending::TimedOut(after)
        }
        _ = kill => {
            terminate(child, group).await;
            Ending::Killed
        }
    }
}

/// SIGTERM to the group, then SIGKILL if the leader has not exited within `TERM_GRACE`.
async fn terminate(child: &mut Child, group: &GroupGuard) {
    group.signal(Signal::SIGTERM);
    if tokio::time::timeout(TERM_GRACE, child.wait()).await.is_err() {
        group.signal(Signal::SIGKILL);
        if let Err(e) = child.wait().await {
            tracing::warn!(error = %e, "could not reap a killed process");
        }
    }
}

/// The attempt's processes: its process group and, where there is one, its control group. Both
/// are SIGKILLed on drop unless already cleaned up, so an attempt abandoned mid-run (its task
/// aborted) leaves no processes behind.
struct GroupGuard {
    /// The process group's id, 0 once there is no group left to signal (no process group is
    /// numbered 0).
    leader: AtomicI32,
    cgroup: Option<AttemptGroup>,
    removed: AtomicBool,
}

impl GroupGuard {
    fn new(leader: Option<u32>, cgroup: Option<AttemptGroup>) -> GroupGuard {
        let leader = leader.and_then(|id| i32::try_from(id).ok()).unwrap_or(0);
        GroupGuard { leader: AtomicI32::new(leader), cgroup, removed: AtomicBool::new(false) }
    }

    /// The process group's id (its leader's pid) while the group may still have members.
    fn leader(&self) -> Option<u32> {
        u32::try_from(self.leader.load(Ordering::Acquire)).ok().filter(|&g| g > 0)
    }

    /// Signals the process group and every process of the control group.
    fn signal(&self, signal: Signal) {
        let group = self.leader.load(Ordering::Acquire);
        if group > 0 {
            // ESRCH (the group is already empty) is the expected end, not an error.
            let _ = killpg(Pid::from_raw(group), signal);
        }
        if let Some(cgroup) = &self.cgroup {
            cgroup.signal(signal);
        }
    }

    /// Kills what remains after the leader was reaped. The process group id stays reserved
    /// while any member lives, so this cannot reach an unrelated process group; the control
    /// group holds only the attempt's processes.
    fn kill_rest(&self) {
        self.signal(Signal::SIGKILL);
        self.leader.store(0, Ordering::Release);
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill_all();
        }
    }

    fn accounts_memory(&self) -> bool {
        self.cgroup.as_ref().is_some_and(AttemptGroup::accounts_memory)
    }

    fn memory(&self) -> crate::cgroup::MemoryUse {
        self.cgroup.as_ref().map(AttemptGroup::memory).unwrap_or_default()
    }

    /// Removes the (emptied) control group.
    fn remove(&self) {
        if let Some(cgroup) = &self.cgroup {
            if !self.removed.swap(true, Ordering::AcqRel) {
                cgroup.remove();
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
        if let Some(cgroup) = &self.cgroup {
            if !self.removed.load(Ordering::Acquire) {
                cgroup.kill_all();
            }
        }
        self.remove();
    }
}

/// The last `OUTPUT_TAIL_BYTES_MAX` bytes of a stream.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        if chunk.len() >= OUTPUT_TAIL_BYTES_MAX {
            self.0.clear();
            self.0.extend_from_slice(&chunk[chunk.len() - OUTPUT_TAIL_BYTES_MAX..]);
            return;
        }
        self.0.extend_from_slice(chunk);
        if self.0.len() > OUTPUT_TAIL_BYTES_MAX {
            let excess = self.0.len() - OUTPUT_TAIL_BYTES_MAX;
            self.0.drain(..excess);
        }
    }

    /// The tail as text: invalid UTF-8 is replaced (which may grow it), then cut back to the
    /// limit at a character boundary.
    fn into_string(self) -> String {
        let text = String::from_utf8_lossy(&self.0);
        crate::attempt::str_tail(&text, OUTPUT_TAIL_BYTES_MAX).to_owned()
    }
}

/// Reads a pipe to its end, keeping only its tail.
async fn drain(reader: Option<impl AsyncRead + Unpin>, tail: &mut Tail) {
    let Some(mut reader) = reader else { return };
    let mut chunk = [0u8; READ_CHUNK_BYTES];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) => return,
            Ok(n) => tail.push(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(error = %e, "reading a process's output failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
