//! Process plumbing shared by every Colony binary: the stop signals, the wall clock, resident
//! memory, owner-only files, and the HTTP endpoint that serves `/metrics`, `/healthz` and `/readyz`.
//!
//! Nothing here knows about tasks, Raft or models (no `colony-core` dependency): a process says
//! what it exposes through [`Probe`], and this crate only carries it to the outside.

mod files;
mod http;
pub mod trace;

pub use files::{private_dir, write_private};
pub use http::{encode, serve_http, serve_http_with, Probe};

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// The signal that asked the process to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    Term,
    Int,
}

impl fmt::Display for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopSignal::Term => "SIGTERM",
            StopSignal::Int => "SIGINT",
        })
    }
}

/// Waits for SIGTERM or SIGINT. Where the handlers cannot be installed it never resolves, so the
/// process runs on rather than stopping at once for a signal nobody sent.
pub async fn shutdown_signal() -> StopSignal {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => StopSignal::Term,
        _ = int.recv() => StopSignal::Int,
    }
}

/// The wall clock in Unix milliseconds (0 before 1970, which only a broken clock reports).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// This process's resident memory, from `/proc/self/status` (0 where that is unavailable).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_and_memory_read_something() {
        // 2020-01-01 in Unix milliseconds: any working clock is past it.
        assert!(unix_ms() > 1_577_836_800_000);
        assert!(rss_bytes() > 0);
    }

    #[test]
    fn signals_print_their_names() {
        assert_eq!(StopSignal::Term.to_string(), "SIGTERM");
        assert_eq!(StopSignal::Int.to_string(), "SIGINT");
    }

    #[tokio::test]
    async fn sigint_is_reported() {
        let mut stop = std::pin::pin!(shutdown_signal());
        // Polling once installs the handlers, so the signal raised next cannot end the process.
        tokio::select! {
            biased;
            signal = &mut stop => panic!("stopped before any signal: {signal}"),
            () = std::future::ready(()) => {}
        }
        let raised = nix::sys::signal::raise(nix::sys::signal::Signal::SIGINT);
        assert!(raised.is_ok(), "{raised:?}");
        let signal = tokio::time::timeout(std::time::Duration::from_secs(5), stop).await;
        assert_eq!(signal.ok(), Some(StopSignal::Int));
    }
}
