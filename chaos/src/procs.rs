//! The processes under test: each server and executor is a real `colony` process started inside
//! its host's network namespace with `nsenter --net`, logging to its own file, and killed, paused,
//! restarted (on the same data), skewed in time or starved of disk by the nemeses.

use crate::net::Host;
use anyhow::{Context as _, Result};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::{Child, Command};

/// The gRPC (TCP) and executor (QUIC, UDP) port of every server.
pub const SERVER_PORT: u16 = 7000;
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// Each server's data directory is a tmpfs this big, so the disk nemesis can fill it.
const DATA_TMPFS_BYTES: u64 = 256 << 20;
const EXIT_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Server,
    Executor,
}

/// One process under test, and everything needed to start it again.
pub struct Proc {
    pub host: Host,
    pub role: Role,
    /// The server's Raft id (changes when the membership nemesis replaces it); 0 for executors.
    pub node_id: u64,
    pub data_dir: PathBuf,
    log: PathBuf,
    /// Arguments after `colony` for the next start.
    args: Vec<String>,
    /// Wall-clock offset for the next start, as libfaketime writes it (`+120s`, `-45s`).
    pub clock_skew: Option<String>,
    child: Option<Child>,
    pub paused: bool,
    pub starts: u32,
}

impl Proc {
    pub fn new(host: Host, role: Role, node_id: u64, run_dir: &Path, args: Vec<String>) -> Proc {
        Proc {
            data_dir: run_dir.join("data").join(&host.name),
            log: run_dir.join("logs").join(format!("{}.log", host.name)),
            host,
            role,
            node_id,
            args,
            clock_skew: None,
            child: None,
            paused: false,
            starts: 0,
        }
    }

    pub fn addr(&self) -> String {
        format!("{}:{SERVER_PORT}", self.host.ip)
    }

    /// Gives a server's data directory its own small tmpfs.
    pub async fn mount_data(&self) -> Result<()> {
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("cannot create {}", self.data_dir.display()))?;
        if self.role == Role::Server {
            let dir = self.data_dir.to_string_lossy();
            crate::net::run(
                "mount",
                &[
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={DATA_TMPFS_BYTES}"),
                    crate::net::MOUNT_SOURCE,
                    &dir,
                ],
                None,
            )
            .await?;
        }
        Ok(())
    }

    /// Copies a server's data out of its tmpfs (so the run keeps it) and unmounts the tmpfs.
    pub async fn unmount_data(&self) -> Result<()> {
        if self.role != Role::Server {
            return Ok(());
        }
        let dir = self.data_dir.to_string_lossy().into_owned();
        let kept = format!("{dir}.kept");
        crate::net::run("cp", &["-a", &dir, &kept], None).await?;
        crate::net::run("umount", &[&dir], None).await?;
        std::fs::remove_dir(&self.data_dir)
            .with_context(|| format!("cannot remove the mount point {dir}"))?;
        std::fs::rename(&kept, &self.data_dir)
            .with_context(|| format!("cannot move {kept} to {dir}"))?;
        Ok(())
    }

    /// The arguments for the next start (a restart needs only the data directory: the rest is
    /// remembered there).
    pub fn set_args(&mut self, args: Vec<String>) {
        self.args = args;
    }

    pub fn start(&mut self) -> Result<()> {
        std::fs::create_dir_all(self.log.parent().unwrap_or(Path::new(".")))
            .context("cannot create the logs directory")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let exe = std::env::current_exe().context("cannot find the colony binary")?;
        // `nsenter --net` enters only the host's network namespace: `ip netns exec` would also
        // remount /sys, hiding the cgroup hierarchies executors contain their tasks with.
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.host.namespace()))
            .arg("--")
            .arg(exe)
            .args(&self.args);
        command.arg("--parent-pid").arg(std::process::id().to_string());
        command.env("RUST_LOG", "info");
        if let Some(skew) = &self.clock_skew {
            command
                .env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME", skew)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        command
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().context("cannot share the log file")?)
            .stderr(log);
        self.child =
            Some(command.spawn().with_context(|| format!("cannot start {}", self.host.name))?);
        self.paused = false;
        self.starts += 1;
        Ok(())
    }

    fn pid(&self) -> Option<Pid> {
        self.child.as_ref().and_then(|c| c.id()).map(|id| Pid::from_raw(id as i32))
    }

    /// `kill -9`, then waits for it to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(EXIT_WAIT, child.wait()).await;
        }
        self.paused = false;
    }

    /// Stops a server gracefully (SIGTERM), waiting for it to exit; kills it if it does not.
    pub async fn stop(&mut self) {
        if let Some(pid) = self.pid() {
            if self.paused {
                let _ = nix::sys::signal::kill(pid, Signal::SIGCONT);
            }
            let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        }
        if let Some(mut child) = self.child.take() {
            if tokio::time::timeout(EXIT_WAIT, child.wait()).await.is_err() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
        self.paused = false;
    }

    pub fn pause(&mut self) -> Result<()> {
        let pid = self.pid().with_context(|| format!("{} is not running", self.host.name))?;
        nix::sys::signal::kill(pid, Signal::SIGSTOP)
            .with_context(|| format!("cannot pause {}", self.host.name))?;
        self.paused = true;
        Ok(())
    }

    pub fn resume(&mut self) -> Result<()> {
        if let (true, Some(pid)) = (self.paused, self.pid()) {
            nix::sys::signal::kill(pid, Signal::SIGCONT)
                .with_context(|| format!("cannot resume {}", self.host.name))?;
        }
        self.paused = false;
        Ok(())
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// If the process ended by itself since the last look, how (and forgets the child).
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status.to_string())
    }
}
