//! What an executor does for an agent's instance besides running it: leases it a port
//! (`COLONY_PORT`) and checks its health, telling the link each time the instance becomes
//! healthy or stops being so.
//!
//! An instance is healthy from its first passing check until `failures` checks fail in a row.
//! Until it first passes, checks run at least every second (so a new instance of a rolling update
//! is found healthy soon after it serves); from then on every `interval`. A check that hangs is
//! stopped at its timeout and counts as failed. An instance without a check is healthy once it
//! runs.

use crate::sandbox::{attempt_command, RunAs};
use colony_core::{FencingToken, HealthCheck, Probe, TaskId};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::collections::BTreeSet;
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The ports an executor leases to instances by default.
pub const PORT_RANGE_DEFAULT: RangeInclusive<u16> = 20_000..=29_999;
/// How often a check runs while an instance has not yet passed one.
const START_INTERVAL_MAX: Duration = Duration::from_secs(1);
/// The most of an HTTP answer read to find its status line.
const STATUS_LINE_BYTES_MAX: usize = 1024;

/// The executor's ports for instances: a port is leased when no other instance holds it and
/// nothing on the host listens on it.
pub(crate) struct Ports {
    range: RangeInclusive<u16>,
    leased: Mutex<BTreeSet<u16>>,
}

/// A leased port, given back when dropped.
pub(crate) struct PortLease {
    ports: Arc<Ports>,
    pub port: u16,
}

impl Drop for PortLease {
    fn drop(&mut self) {
        if let Ok(mut leased) = self.ports.leased.lock() {
            leased.remove(&self.port);
        }
    }
}

impl Ports {
    pub(crate) fn new(range: RangeInclusive<u16>) -> Arc<Ports> {
        Arc::new(Ports { range, leased: Mutex::new(BTreeSet::new()) })
    }

    /// The lowest free port of the range, or `None` when every one is taken.
    pub(crate) fn lease(self: &Arc<Self>) -> Option<PortLease> {
        let mut leased = self.leased.lock().ok()?;
        let port = self
            .range
            .clone()
            .find(|&p| !leased.contains(&p) && TcpListener::bind(("0.0.0.0", p)).is_ok())?;
        leased.insert(port);
        Some(PortLease { ports: self.clone(), port })
    }
}

/// A change in an instance's health, for its executor to report.
pub(crate) struct HealthChange {
    pub task: TaskId,
    pub token: FencingToken,
    pub healthy: bool,
    pub address: String,
    pub message: String,
}

/// Where and as whom an instance's checks run.
pub(crate) struct Target {
    pub task: TaskId,
    pub token: FencingToken,
    /// Where the instance is registered: `host:port`, or the host alone.
    pub address: String,
    pub port: Option<u16>,
    pub dir: PathBuf,
    pub run_as: Option<RunAs>,
}

/// `host:port`, with an IPv6 host in brackets; the host alone without a port.
pub(crate) fn address(host: &str, port: Option<u16>) -> String {
    match port {
        None => host.to_owned(),
        Some(port) if host.contains(':') => format!("[{host}]:{port}"),
        Some(port) => format!("{host}:{port}"),
    }
}

/// Checks the instance for as long as it runs (the caller drops this future when it ends),
/// sending each change of health; returns only if nobody listens any more.
pub(crate) async fn watch(
    check: Option<HealthCheck>,
    target: Target,
    changes: mpsc::UnboundedSender<HealthChange>,
) {
    let change = |healthy: bool, message: String| HealthChange {
        task: target.task,
        token: target.token,
        healthy,
        address: target.address.clone(),
        message,
    };
    let Some(check) = check else {
        if changes.send(change(true, String::new())).is_ok() {
            std::future::pending::<()>().await;
        }
        return;
    };
    let interval = Duration::from_millis(check.interval_ms);
    let timeout = Duration::from_millis(check.timeout_ms);
    let mut healthy = false;
    let mut failed_in_a_row = 0u32;
    loop {
        let pause = if healthy { interval } else { interval.min(START_INTERVAL_MAX) };
        tokio::time::sleep(pause).await;
        match probe(&check.probe, &target, timeout).await {
            Ok(()) => {
                failed_in_a_row = 0;
                if !healthy {
                    healthy = true;
                    if changes.send(change(true, String::new())).is_err() {
                        return;
                    }
                }
            }
            Err(why) => {
                failed_in_a_row = failed_in_a_row.saturating_add(1);
                tracing::debug!(task = %target.task, %why, failed_in_a_row, "health check failed");
                if healthy && failed_in_a_row >= check.failures {
                    healthy = false;
                    tracing::info!(task = %target.task, %why, "instance unhealthy");
                    if changes.send(change(false, why)).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// One check, within `timeout`.
async fn probe(probe: &Probe, target: &Target, timeout: Duration) -> Result<(), String> {
    match probe {
        Probe::Command { program, args } => run_command(program, args, target, timeout).await,
        Probe::Http { path } => {
            let port = target.port.ok_or("an HTTP check needs the instance's port")?;
            match tokio::time::timeout(timeout, http_get(port, path)).await {
                Ok(result) => result,
                Err(_) => Err(format!("GET {path} gave no answer within {timeout:?}")),
            }
        }
    }
}

/// Runs the check command as the instance's user in its directory, with its port; a command
/// still running at the timeout is killed with its whole process group.
async fn run_command(
    program: &str,
    args: &[String],
    target: &Target,
    timeout: Duration,
) -> Result<(), String> {
    let mut command = attempt_command(program, args, &target.dir, target.run_as.as_ref());
    command.stdout(Stdio::null()).stderr(Stdio::null());
    if let Some(port) = target.port {
        command.env("COLONY_PORT", port.to_string());
    }
    let mut child = command.spawn().map_err(|e| format!("cannot run {program}: {e}"))?;
    let group = child.id();
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{program} ended with {status}")),
        Ok(Err(e)) => Err(format!("lost track of {program}: {e}")),
        Err(_) => {
            if let Some(pid) = group.and_then(|p| i32::try_from(p).ok()) {
                // The group may be gone already; then there is nothing to stop.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            Err(format!("{program} did not finish within {timeout:?}"))
        }
    }
}

/// A GET of `path` on the instance's port on this host; a 2xx status passes.
async fn http_get(port: u16, path: &str) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot connect to port {port}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: colony-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send GET {path}: {e}"))?;
    let mut answer = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    while !answer.contains(&b'\n') && answer.len() < STATUS_LINE_BYTES_MAX {
        let n = stream.read(&mut buf).await.map_err(|e| format!("GET {path}: {e}"))?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    status_passes(&answer).map_err(|why| format!("GET {path}: {why}"))
}

/// Whether an HTTP answer's status line says 2xx.
fn status_passes(answer: &[u8]) -> Result<(), String> {
    let line = answer.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (Some(version), Some(code)) = (words.next(), words.next()) else {
        return Err("no HTTP status line in the answer".to_owned());
    };
    if !version.starts_with("HTTP/") {
        return Err(format!("not an HTTP answer: {:?}", line.trim_end()));
    }
    match code.parse::<u16>() {
        Ok(code) if (200..300).contains(&code) => Ok(()),
        Ok(code) => Err(format!("status {code}")),
        Err(_) => Err(format!("bad status {code:?}")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that cannot set up or whose check fails should panic.
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_passes(b"HTTP/1.0 200 OK\r\n\r\n"), Ok(()));
        assert_eq!(status_passes(b"HTTP/1.1 204 No Content\r\n"), Ok(()));
        assert_eq!(status_passes(b"HTTP/1.1 503 Busy\r\n"), Err("status 503".to_owned()));
        assert!(status_passes(b"").is_err());
        assert!(status_passes(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(status_passes(b"HTTP/1.1 2x0\r\n").is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(address("10.0.0.7", Some(20001)), "10.0.0.7:20001");
        assert_eq!(address("::1", Some(20001)), "[::1]:20001");
        assert_eq!(address("10.0.0.7", None), "10.0.0.7");
    }

    #[test]
    fn ports_are_leased_once_and_given_back() {
        // A port something else listens on is skipped.
        let taken = TcpListener::bind("0.0.0.0:0").unwrap();
        let busy = taken.local_addr().unwrap().port();
        let ports = Ports::new(busy..=busy.saturating_add(1));
        let first = ports.lease().expect("a free port");
        assert_eq!(first.port, busy.saturating_add(1));
        assert!(ports.lease().is_none(), "the range is spent");
        drop(first);
        assert_eq!(ports.lease().map(|l| l.port), Some(busy.saturating_add(1)));
    }

    #[tokio::test]
    async fn a_hanging_check_fails_at_its_timeout_and_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target {
            task: TaskId(1),
            token: FencingToken(1),
            address: "127.0.0.1".into(),
            port: None,
            dir: dir.path().to_owned(),
            run_as: None,
        };
        let started = std::time::Instant::now();
        let hang = Probe::Command { program: "/bin/sleep".into(), args: vec!["30".into()] };
        let result = probe(&hang, &target, Duration::from_millis(200)).await;
        assert!(result.as_ref().is_err_and(|e| e.contains("did not finish")), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "the check was not cut short");
        let pass = Probe::Command { program: "/bin/true".into(), args: vec![] };
        assert_eq!(probe(&pass, &target, Duration::from_secs(5)).await, Ok(()));
        let fail = Probe::Command { program: "/bin/false".into(), args: vec![] };
        assert!(probe(&fail, &target, Duration::from_secs(5)).await.is_err());
    }
}
