//! What an attempt's processes may see and use: the user they run as, the environment they get
//! (nothing of the executor's), the directory they work in (outside the executor's data
//! directory), their control group's limits, and the GPU indices lent to them.

use crate::cgroup::{CgroupError, Containment, GroupLimits};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The `PATH` every attempt gets.
pub const TASK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The user tasks run as when the executor runs as root and names none.
pub const RUN_AS_DEFAULT: &str = "nobody";
/// Processes (and threads) one attempt may hold at once, by default.
pub const TASK_PIDS_MAX_DEFAULT: u64 = 4096;

/// A process of an attempt: `program` with `args`, in `dir` (also its HOME), as `run_as`, with
/// nothing of the executor's environment but a fixed PATH, in a process group of its own, no
/// stdin, killed if dropped. The caller adds the rest of its environment and its output.
pub(crate) fn attempt_command(
    program: &str,
    args: &[String],
    dir: &Path,
    run_as: Option<&RunAs>,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .env("PATH", TASK_PATH)
        .env("HOME", dir)
        .current_dir(dir)
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(user) = run_as {
        command.uid(user.uid).gid(user.gid);
    }
    command
}

/// The unprivileged user an attempt's processes run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// Looks `name` up in the user database.
    pub fn lookup(name: &str) -> Result<RunAs, String> {
        match nix::unistd::User::from_name(name) {
            Ok(Some(user)) => {
                Ok(RunAs { name: user.name, uid: user.uid.as_raw(), gid: user.gid.as_raw() })
            }
            Ok(None) => Err(format!("no user named {name:?} on this host")),
            Err(e) => Err(format!("cannot look up user {name:?}: {e}")),
        }
    }
}

/// Everything attempts of one executor share.
pub struct Sandbox {
    /// Where attempts' directories are made: `WORK/<task>-<attempt>`, failed ones under
    /// `WORK/failed`.
    pub work_root: PathBuf,
    /// `None`: attempts run as the executor's own user (only when it is not root).
    pub run_as: Option<RunAs>,
    /// `None`: no control groups (the host has none this process may use and limits were not
    /// required).
    pub containment: Option<Containment>,
    pub pids_max: u64,
    gpus: Mutex<BTreeSet<u32>>,
    gpu_count: u32,
    /// Observes each attempt's start latency, when the executor exports metrics.
    pub start_seconds: Option<prometheus::Histogram>,
}

impl Sandbox {
    pub fn new(
        work_root: PathBuf,
        run_as: Option<RunAs>,
        containment: Option<Containment>,
        pids_max: u64,
        gpu_count: u32,
    ) -> Sandbox {
        Sandbox {
            work_root,
            run_as,
            containment,
            pids_max,
            gpus: Mutex::new((0..gpu_count).collect()),
            gpu_count,
            start_seconds: None,
        }
    }

    /// A sandbox for unit tests: no user switch, no groups, no GPUs.
    #[cfg(test)]
    pub fn plain(work_root: &Path) -> Sandbox {
        Sandbox::new(work_root.to_owned(), None, None, TASK_PIDS_MAX_DEFAULT, 0)
    }

    /// Whether this executor has GPUs to hand out (then every attempt's `CUDA_VISIBLE_DEVICES`
    /// is set, to nothing for an attempt that reserved none).
    pub fn has_gpus(&self) -> bool {
        self.gpu_count > 0
    }

    /// Lends `count` GPU indices, lowest first, until the lease is dropped; `None` when fewer
    /// are free (the books never over-commit, so this is a bookkeeping bug, not a user error).
    pub fn lease_gpus(&self, count: u32) -> Option<GpuLease<'_>> {
        let mut free = self.gpus.lock().unwrap_or_else(|p| p.into_inner());
        if (free.len() as u64) < u64::from(count) {
            return None;
        }
        let taken: Vec<u32> = free.iter().copied().take(count as usize).collect();
        for index in &taken {
            free.remove(index);
        }
        Some(GpuLease { sandbox: self, indices: taken })
    }

    /// Creates the attempt's control group, when this executor uses them.
    pub fn group(
        &self,
        name: &str,
        memory_bytes: u64,
        cpu_millis: u64,
    ) -> Result<Option<crate::cgroup::AttemptGroup>, CgroupError> {
        let Some(containment) = &self.containment else { return Ok(None) };
        let limits = GroupLimits { memory_bytes, cpu_millis, pids_max: self.pids_max };
        containment.create(name, limits).map(Some)
    }

    /// Makes the work root: traversable by tasks, listable only by the executor. Refuses a
    /// root the tasks' user could not reach (a parent such as `/root` closed to others).
    pub fn prepare_root(&self) -> Result<(), String> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let shown = self.work_root.display();
        std::fs::create_dir_all(&self.work_root)
            .and_then(|()| {
                std::fs::set_permissions(&self.work_root, std::fs::Permissions::from_mode(0o711))
            })
            .map_err(|e| format!("cannot prepare the work directory {shown}: {e}"))?;
        let Some(user) = &self.run_as else { return Ok(()) };
        let root = std::fs::canonicalize(&self.work_root)
            .map_err(|e| format!("cannot resolve the work directory {shown}: {e}"))?;
        for dir in root.ancestors().skip(1) {
            let meta = std::fs::metadata(dir)
                .map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
            let passable = meta.mode() & 0o001 != 0
                || (meta.uid() == user.uid && meta.mode() & 0o100 != 0)
                || (meta.gid() == user.gid && meta.mode() & 0o010 != 0);
            if !passable && user.uid != 0 {
                return Err(format!(
                    "tasks run as {} but cannot pass through {} to reach the work directory {shown}; pass --work-dir somewhere they can, or --run-as another user",
                    user.name,
                    dir.display()
                ));
            }
        }
        Ok(())
    }

    /// Hands an attempt's fresh directory to the user it runs as, readable by nobody else.
    pub fn own(&self, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        if let Some(user) = &self.run_as {
            let (uid, gid) =
                (nix::unistd::Uid::from_raw(user.uid), nix::unistd::Gid::from_raw(user.gid));
            nix::unistd::chown(dir, Some(uid), Some(gid)).map_err(std::io::Error::from)?;
        }
        Ok(())
    }
}

/// GPU indices lent to one attempt; returned when dropped.
pub struct GpuLease<'a> {
    sandbox: &'a Sandbox,
    indices: Vec<u32>,
}

impl GpuLease<'_> {
    /// The value of `CUDA_VISIBLE_DEVICES`: `0,2`, or empty for none.
    pub fn visible_devices(&self) -> String {
        self.indices.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
    }
}

impl Drop for GpuLease<'_> {
    fn drop(&mut self) {
        let mut free = self.sandbox.gpus.lock().unwrap_or_else(|p| p.into_inner());
        free.extend(self.indices.drain(..));
    }
}

/// The work root used when none is given: beside the data directory, never inside it.
pub fn default_work_root(data_dir: &Path) -> PathBuf {
    let name = data_dir.file_name().map_or_else(|| "executor".into(), |n| n.to_os_string());
    let mut work = name;
    work.push("-work");
    data_dir.with_file_name(work)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_indices_are_never_lent_twice() {
        let sandbox = Sandbox::new(PathBuf::from("/nonexistent"), None, None, 16, 4);
        let a = sandbox.lease_gpus(2).expect("two of four are free");
        let b = sandbox.lease_gpus(1).expect("one of two is free");
        assert_eq!((a.visible_devices().as_str(), b.visible_devices().as_str()), ("0,1", "2"));
        assert!(sandbox.lease_gpus(2).is_none(), "only index 3 is free");
        drop(a);
        let c = sandbox.lease_gpus(3).expect("0, 1 and 3 are free again");
        assert_eq!(c.visible_devices(), "0,1,3");
        let none = sandbox.lease_gpus(0).expect("nothing asked");
        assert_eq!(none.visible_devices(), "");
    }

    #[test]
    fn the_work_root_is_beside_the_data_directory() {
        assert_eq!(
            default_work_root(Path::new("/var/lib/colony/executor")),
            PathBuf::from("/var/lib/colony/executor-work")
        );
        assert_eq!(default_work_root(Path::new("e1")), PathBuf::from("e1-work"));
    }

    #[test]
    fn users_are_looked_up() {
        assert_eq!(RunAs::lookup("root").map(|u| u.uid), Ok(0));
        assert!(RunAs::lookup("no-such-user-here").is_err());
    }
}
