//! Each attempt's control group, through cgroups-rs (the unified v2 hierarchy when it has
//! controllers, v1 otherwise): the memory limit is the attempt's reserved memory, the CPU quota
//! its `cpu_millis`, and a pids limit caps forks. Killing an attempt kills every process in its
//! group, whatever session or process group it moved to; the memory peak and the OOM kill come
//! from the group's own accounting.
//!
//! Groups live under `colony/<instance>/<task>-<attempt>`, where the instance names one executor
//! on this host across restarts, so a restarted executor finds and kills what it left behind.

use cgroups_rs::cgroup_builder::CgroupBuilder;
use cgroups_rs::memory::MemController;
use cgroups_rs::{Cgroup, Hierarchy, MaxValue};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::time::Duration;

/// The controllers an attempt's limits need, by their kernel names.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// The CFS period the CPU quota is a share of.
const CPU_PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel accepts.
const CPU_QUOTA_US_MIN: u64 = 1_000;
/// Rounds of "signal every member" before giving up on emptying a group (a fork bomb is held
/// back by the pids limit, so a few rounds always suffice).
const KILL_ROUNDS_MAX: usize = 50;
const KILL_ROUND_PAUSE: Duration = Duration::from_millis(10);

/// The limits of one attempt's group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLimits {
    /// 0: no memory limit (the task reserved none).
    pub memory_bytes: u64,
    /// 0: no CPU quota.
    pub cpu_millis: u64,
    pub pids_max: u64,
}

/// What this host's cgroups offer the executor.
pub struct Containment {
    /// `colony/<instance>`: the parent of every attempt's group.
    base: String,
    v2: bool,
    /// Controllers in [`CONTROLLERS`] this host does not offer.
    missing: Vec<&'static str>,
    /// Also used where the hierarchy offers it: freezing a group before killing it.
    freezer: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot create control group {path}: {source}")]
    Create { path: String, source: cgroups_rs::error::Error },
    #[error("cannot open {path} to join the control group: {source}")]
    Join { path: PathBuf, source: std::io::Error },
}

impl Containment {
    /// Looks at the host's hierarchy. `instance` names this executor on the host (stable across
    /// its restarts, distinct from other executors').
    pub fn probe(instance: &str) -> Containment {
        let hierarchy = cgroups_rs::hierarchies::auto();
        let offered: Vec<String> =
            hierarchy.subsystems().iter().map(|s| s.controller_name()).collect();
        let missing = CONTROLLERS
            .iter()
            .copied()
            .filter(|c| !offered.iter().any(|o| o == c) || !writable(hierarchy.as_ref(), c))
            .collect();
        Containment {
            base: format!("colony/{instance}"),
            v2: hierarchy.v2(),
            missing,
            freezer: offered.iter().any(|o| o == "freezer"),
        }
    }

    pub fn version(&self) -> &'static str {
        if self.v2 {
            "v2"
        } else {
            "v1"
        }
    }

    /// The controllers limits need that this host lacks (or that this process may not use).
    pub fn missing(&self) -> &[&'static str] {
        &self.missing
    }

    fn controllers(&self) -> Vec<String> {
        let mut controllers: Vec<String> = CONTROLLERS
            .iter()
            .filter(|c| !self.missing.contains(c))
            .map(|c| c.to_string())
            .collect();
        if self.freezer && !self.v2 {
            controllers.push("freezer".to_owned());
        }
        controllers
    }

    /// Creates the group of attempt `name` with `limits`, in the controllers this host has.
    pub fn create(&self, name: &str, limits: GroupLimits) -> Result<AttemptGroup, CgroupError> {
        let path = format!("{}/{name}", self.base);
        let mut builder = CgroupBuilder::new(&path).set_specified_controllers(self.controllers());
        if limits.memory_bytes > 0 && !self.missing.contains(&"memory") {
            let bytes = i64::try_from(limits.memory_bytes).unwrap_or(i64::MAX);
            builder = builder.memory().memory_hard_limit(bytes).done();
        }
        if limits.cpu_millis > 0 && !self.missing.contains(&"cpu") {
            let quota = (limits.cpu_millis * CPU_PERIOD_US / 1000).max(CPU_QUOTA_US_MIN);
            let quota = i64::try_from(quota).unwrap_or(i64::MAX);
            builder = builder.cpu().period(CPU_PERIOD_US).quota(quota).done();
        }
        if !self.missing.contains(&"pids") {
            let max = i64::try_from(limits.pids_max).unwrap_or(i64::MAX);
            builder = builder.pid().maximum_number_of_processes(MaxValue::Value(max)).done();
        }
        let group = builder
            .build(cgroups_rs::hierarchies::auto())
            .map_err(|source| CgroupError::Create { path: path.clone(), source })?;
        let mut procs = Vec::new();
        for file in procs_files(&group) {
            let opened = std::fs::OpenOptions::new().write(true).open(&file);
            procs.push(opened.map_err(|source| CgroupError::Join { path: file, source })?);
        }
        Ok(AttemptGroup { group, procs, v2: self.v2, freezer: self.freezer })
    }

    /// Kills every process in the groups a previous run of this executor left, and removes the
    /// groups; returns how many groups there were.
    pub fn kill_leftovers(&self) -> usize {
        let base = Cgroup::load_with_specified_controllers(
            cgroups_rs::hierarchies::auto(),
            &self.base,
            self.controllers(),
        );
        let files = procs_files(&base);
        let Some(dir) = files.first().and_then(|f| f.parent()) else { return 0 };
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        let mut count = 0;
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let group = AttemptGroup {
                group: Cgroup::load_with_specified_controllers(
                    cgroups_rs::hierarchies::auto(),
                    format!("{}/{name}", self.base),
                    self.controllers(),
                ),
                procs: Vec::new(),
                v2: self.v2,
                freezer: self.freezer,
            };
            group.kill_all();
            group.remove();
            count += 1;
        }
        count
    }
}

/// Whether this process may create groups under `controller` (root may; others usually not).
fn writable(hierarchy: &dyn Hierarchy, controller: &str) -> bool {
    let root = hierarchy.root();
    let dir = if hierarchy.v2() { root } else { root.join(controller) };
    nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// The `cgroup.procs` file of each controller directory of `group` (one file on v2).
fn procs_files(group: &Cgroup) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        group.subsystems().iter().map(|s| s.to_controller().path().join("cgroup.procs")).collect();
    files.sort();
    files.dedup();
    files
}

/// One attempt's group. Killed and removed by whoever ends the attempt ([`AttemptGroup::kill_all`],
/// then [`AttemptGroup::remove`]).
pub struct AttemptGroup {
    group: Cgroup,
    /// Open `cgroup.procs` files, written by the child between fork and exec to join.
    procs: Vec<File>,
    v2: bool,
    freezer: bool,
}

/// How the attempt used its memory, from the group's accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUse {
    pub peak_bytes: Option<u64>,
    pub limit_bytes: Option<u64>,
    /// Processes the kernel killed for passing the limit.
    pub oom_kills: u64,
}

impl AttemptGroup {
    /// Makes `command`'s child join the group before it runs anything, so nothing it starts is
    /// ever outside: between fork and exec the child writes "0" (itself) to each open
    /// `cgroup.procs` file. Only `write(2)` runs in the forked child.
    #[allow(unsafe_code)]
    pub fn join_on_exec(&self, command: &mut tokio::process::Command) {
        let fds: Vec<i32> = self.procs.iter().map(AsRawFd::as_raw_fd).collect();
        let join = move || {
            for &fd in &fds {
                // SAFETY: the files stay open in the parent until the group is dropped, after
                // the spawn; the forked child holds a copy of each descriptor until exec closes
                // it (CLOEXEC).
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                nix::unistd::write(fd, b"0").map_err(std::io::Error::from)?;
            }
            Ok(())
        };
        // SAFETY: `join` allocates nothing and calls only write(2), async-signal-safe.
        unsafe {
            command.pre_exec(join);
        }
    }

    /// Signals every process in the group.
    pub fn signal(&self, signal: Signal) {
        for pid in self.group.procs() {
            if let Ok(pid) = i32::try_from(pid.pid) {
                // ESRCH: it ended meanwhile.
                let _ = kill(Pid::from_raw(pid), signal);
            }
        }
    }

    /// Kills every process in the group and waits (briefly) until none is left: frozen first
    /// where the hierarchy can freeze, so nothing forks between the listing and the kill.
    pub fn kill_all(&self) {
        if self.v2 && self.group.kill().is_ok() {
            self.wait_empty();
            return;
        }
        let freezer = self
            .freezer
            .then(|| self.group.controller_of::<cgroups_rs::freezer::FreezerController>())
            .flatten();
        for _ in 0..KILL_ROUNDS_MAX {
            if self.group.procs().is_empty() {
                return;
            }
            if let Some(freezer) = freezer {
                let _ = freezer.freeze();
            }
            self.signal(Signal::SIGKILL);
            if let Some(freezer) = freezer {
                let _ = freezer.thaw();
            }
            std::thread::sleep(KILL_ROUND_PAUSE);
        }
        tracing::warn!(group = self.group.path(), "processes survived the kill of their group");
    }

    fn wait_empty(&self) {
        for _ in 0..KILL_ROUNDS_MAX {
            if self.group.procs().is_empty() {
                return;
            }
            std::thread::sleep(KILL_ROUND_PAUSE);
        }
    }

    /// Whether the group has a memory controller (so its accounting gives the peak).
    pub fn accounts_memory(&self) -> bool {
        self.group.controller_of::<MemController>().is_some()
    }

    pub fn memory(&self) -> MemoryUse {
        let Some(memory) = self.group.controller_of::<MemController>() else {
            return MemoryUse::default();
        };
        if self.v2 {
            let dir = cgroups_rs::Controller::path(memory).to_owned();
            let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            let peak = read("memory.peak").trim().parse().ok();
            let limit = read("memory.max").trim().parse().ok();
            let oom_kills = read("memory.events")
                .lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
            return MemoryUse { peak_bytes: peak, limit_bytes: limit, oom_kills };
        }
        let stat = memory.memory_stat();
        MemoryUse {
            peak_bytes: Some(stat.max_usage_in_bytes).filter(|&b| b > 0),
            // v1 reports "no limit" as a huge number.
            limit_bytes: u64::try_from(stat.limit_in_bytes).ok().filter(|&b| b < 1 << 60),
            oom_kills: stat.oom_control.oom_kill,
        }
    }

    /// Removes the (empty) group.
    pub fn remove(&self) {
        if let Err(e) = self.group.delete() {
            tracing::debug!(group = self.group.path(), error = %e, "could not remove a control group");
        }
    }
}

/// The instance name of the executor whose data directory is `data_dir`: its name and a hash of
/// the directory, so two executors on one host never share groups and a restart finds its own.
pub fn instance_name(executor_name: &str, data_dir: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let canonical = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
    // FNV-1a over the path's bytes: the same on every build, unlike `DefaultHasher`.
    let hash =
        canonical.as_os_str().as_bytes().iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
    let safe: String = executor_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .take(64)
        .collect();
    format!("{safe}-{hash:016x}")
}
