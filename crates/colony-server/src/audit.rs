//! The audit trail: one JSON line per request a server serves, in `DATA_DIR/audit/`.
//!
//! Each line is written by the request's own task, as one `write(2)` to a file opened with
//! `O_APPEND` (so concurrent lines never interleave), before the request is answered: no thread
//! hand-off, no wake-up per request. A background thread fsyncs the file at most every
//! [`SYNC_EVERY`] when something was written; rotation fsyncs too. The current file is
//! `audit.jsonl`; past [`AuditConfig::file_bytes_max`] it is renamed `audit-<unix ms>-<n>.jsonl`,
//! and only the newest [`AuditConfig::files_kept`] of those are kept, so the trail is bounded.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

pub const DIR: &str = "audit";
pub const CURRENT: &str = "audit.jsonl";
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// One served request. Never holds a secret: a token appears only as its accessor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub request_id: String,
    /// The server that served it.
    pub node: u64,
    pub rpc: String,
    /// `ok`, `denied` or `error`.
    pub outcome: String,
    /// The gRPC status code for `denied` and `error`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub accessor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub role: Option<String>,
    /// A certificate's holder (`learner-1`, `server-2`) when it authenticated the call.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub certificate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source: Option<String>,
    /// Served for another server that forwarded it.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub forwarded: bool,
    pub duration_ms: f64,
}

#[derive(Clone, Debug)]
pub struct AuditConfig {
    pub file_bytes_max: u64,
    pub files_kept: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { file_bytes_max: 64 << 20, files_kept: 8 }
    }
}

/// The handle requests record through.
#[derive(Clone)]
pub struct Audit {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    config: AuditConfig,
    /// Writers share the file (a write lock only to swap it at rotation).
    file: RwLock<File>,
    size: AtomicU64,
    rotations: AtomicU64,
    /// Written since the last fsync.
    dirty: AtomicBool,
}

impl Audit {
    /// Opens (creating) `data_dir/audit/` and starts the fsync thread, which ends with the last
    /// handle.
    pub fn open(data_dir: &Path, config: AuditConfig) -> io::Result<Audit> {
        let dir = data_dir.join(DIR);
        colony_process::private_dir(&dir)?;
        let file = open_current(&dir)?;
        let size = file.metadata()?.len();
        let inner = Arc::new(Inner {
            dir,
            config,
            file: RwLock::new(file),
            size: AtomicU64::new(size),
            rotations: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new().name("audit-sync".into()).spawn(move || sync_loop(weak))?;
        Ok(Audit { inner })
    }

    /// Writes `record`'s line; it is in the file (the kernel's) when this returns. A failure to
    /// write is logged; the request is not failed for it.
    pub fn record(&self, record: &Record) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!("cannot encode an audit record: {e}");
                return;
            }
        };
        line.push(b'\n');
        if let Err(e) = self.inner.write(&line) {
            tracing::error!("cannot write the audit trail in {}: {e}", self.inner.dir.display());
        }
    }
}

impl Inner {
    fn write(&self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64;
        let size = self.size.load(Ordering::Relaxed);
        if size > 0 && size + len > self.config.file_bytes_max {
            self.rotate(len)?;
        }
        let file = self.file.read().unwrap_or_else(|p| p.into_inner());
        // One write of the whole line: with O_APPEND the kernel appends it as a unit.
        (&*file).write_all(line)?;
        self.size.fetch_add(len, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Starts a new file, unless another writer just did.
    fn rotate(&self, len: u64) -> io::Result<()> {
        let mut file = self.file.write().unwrap_or_else(|p| p.into_inner());
        let size = self.size.load(Ordering::Relaxed);
        if size == 0 || size + len <= self.config.file_bytes_max {
            return Ok(());
        }
        file.sync_all()?;
        // Two rotations within one millisecond must not share a name (the second would replace
        // the first): the rotation count follows the time.
        let stamp = colony_process::unix_ms();
        let n = self.rotations.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("audit-{stamp:013}-{:06}.jsonl", n % 1_000_000);
        std::fs::rename(self.dir.join(CURRENT), self.dir.join(name))?;
        *file = open_current(&self.dir)?;
        self.size.store(0, Ordering::Relaxed);
        let mut rotated = rotated_files(&self.dir)?;
        while rotated.len() > self.config.files_kept {
            let oldest = rotated.remove(0);
            std::fs::remove_file(&oldest)?;
        }
        File::open(&self.dir)?.sync_all()
    }
}

/// Fsyncs what was written, every [`SYNC_EVERY`], until the trail is closed.
fn sync_loop(inner: Weak<Inner>) {
    loop {
        std::thread::sleep(SYNC_EVERY);
        let Some(inner) = inner.upgrade() else { return };
        if inner.dirty.swap(false, Ordering::Relaxed) {
            let file = inner.file.read().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = file.sync_data() {
                tracing::error!("cannot fsync the audit trail in {}: {e}", inner.dir.display());
            }
        }
    }
}

fn open_current(dir: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(dir.join(CURRENT))
}

/// The rotated files, oldest first (their names sort by time).
pub fn rotated_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Every file of the trail in `data_dir`, oldest first.
pub fn trail_files(data_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let dir = data_dir.join(DIR);
    let mut files = rotated_files(&dir)?;
    let current = dir.join(CURRENT);
    if current.exists() {
        files.push(current);
    }
    Ok(files)
}

/// The time now as the audit trail writes it.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> Record {
        Record {
            time: now_rfc3339(),
            request_id: format!("r{n}"),
            node: 1,
            rpc: "SubmitTask".into(),
            outcome: "ok".into(),
            code: None,
            accessor: Some("acc".into()),
            role: Some("admin".into()),
            certificate: None,
            namespace: Some("default".into()),
            target: None,
            source: Some("127.0.0.1:1".into()),
            forwarded: false,
            duration_ms: 1.5,
        }
    }

    #[tokio::test]
    async fn lines_are_written_before_the_wait_returns_and_rotation_is_bounded(
    ) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let audit = Audit::open(dir.path(), AuditConfig { file_bytes_max: 2_000, files_kept: 2 })?;
        for n in 0..200 {
            audit.record(&record(n));
        }
        let files = trail_files(dir.path())?;
        anyhow::ensure!(files.len() == 3, "two rotated files and the current one: {files:?}");
        let mut lines = Vec::new();
        for file in &files {
            for line in std::fs::read_to_string(file)?.lines() {
                lines.push(serde_json::from_str::<Record>(line)?);
            }
        }
        // The newest lines survive, in order, the last one included.
        anyhow::ensure!(lines.last().map(|r| r.request_id.as_str()) == Some("r199"));
        let ids: Vec<usize> = lines.iter().filter_map(|r| r.request_id[1..].parse().ok()).collect();
        anyhow::ensure!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(DIR))?.permissions().mode() & 0o777;
        anyhow::ensure!(mode == 0o700, "audit directory mode {mode:o}");
        Ok(())
    }
}
