//! The audit trail: one JSON line per request a server serves, in `DATA_DIR/audit/`.
//!
//! A writer thread owns the file. A line for a request that changes state is written (handed to
//! the kernel) before the request is answered; lines are flushed in batches, fsynced at least
//! every [`SYNC_EVERY`] and at rotation. The current file is `audit.jsonl`; past
//! [`AuditConfig::file_bytes_max`] it is renamed `audit-<unix ms>-<n>.jsonl`, and only the newest
//! [`AuditConfig::files_kept`] of those are kept, so the trail is bounded on disk.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

pub const DIR: &str = "audit";
pub const CURRENT: &str = "audit.jsonl";
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// Lines waiting for the writer; a slow disk makes requests wait rather than memory grow.
const QUEUE_MAX: usize = 16 * 1024;
/// Lines written per flush, at most.
const BATCH_MAX: usize = 1024;

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

struct Entry {
    line: Vec<u8>,
    written: Option<oneshot::Sender<()>>,
}

/// The handle requests record through.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Entry>,
}

impl Audit {
    /// Opens (creating) `data_dir/audit/` and starts the writer thread.
    pub fn open(data_dir: &Path, config: AuditConfig) -> io::Result<Audit> {
        let dir = data_dir.join(DIR);
        crate::tls::private_dir(&dir)?;
        let writer = Writer::open(dir, config)?;
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        std::thread::Builder::new().name("audit".into()).spawn(move || writer.run(rx))?;
        Ok(Audit { tx })
    }

    /// Records `record`; with `wait`, returns only once its line is written. A failure to write
    /// is logged by the writer; the request is not failed for it.
    pub async fn record(&self, record: &Record, wait: bool) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!("cannot encode an audit record: {e}");
                return;
            }
        };
        line.push(b'\n');
        let (written, done) = match wait {
            true => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        if self.tx.send(Entry { line, written }).await.is_err() {
            tracing::error!("the audit writer stopped; request not recorded");
            return;
        }
        if let Some(done) = done {
            let _ = done.await;
        }
    }
}

struct Writer {
    dir: PathBuf,
    config: AuditConfig,
    file: File,
    size: u64,
    synced: Instant,
    rotations: u64,
}

impl Writer {
    fn open(dir: PathBuf, config: AuditConfig) -> io::Result<Writer> {
        let file = open_current(&dir)?;
        let size = file.metadata()?.len();
        Ok(Writer { dir, config, file, size, synced: Instant::now(), rotations: 0 })
    }

    fn run(mut self, mut rx: mpsc::Receiver<Entry>) {
        let mut batch = Vec::with_capacity(BATCH_MAX);
        loop {
            // Wait for one line, but wake to fsync what an idle period left unsynced.
            let first = match rx.blocking_recv() {
                Some(entry) => entry,
                None => {
                    let _ = self.file.sync_all();
                    return;
                }
            };
            batch.push(first);
            while batch.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(entry) => batch.push(entry),
                    Err(_) => break,
                }
            }
            let mut buffer = Vec::with_capacity(batch.iter().map(|e| e.line.len()).sum());
            for entry in &batch {
                buffer.extend_from_slice(&entry.line);
            }
            if let Err(e) = self.write(&buffer) {
                tracing::error!("cannot write the audit trail in {}: {e}", self.dir.display());
            }
            for entry in batch.drain(..) {
                if let Some(written) = entry.written {
                    let _ = written.send(());
                }
            }
        }
    }

    fn write(&mut self, buffer: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + buffer.len() as u64 > self.config.file_bytes_max {
            self.rotate()?;
        }
        self.file.write_all(buffer)?;
        self.size += buffer.len() as u64;
        if self.synced.elapsed() >= SYNC_EVERY {
            self.file.sync_data()?;
            self.synced = Instant::now();
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.sync_all()?;
        // Two rotations within one millisecond must not share a name (the second would replace
        // the first): the writer's rotation count follows the time.
        let stamp = colony_process::unix_ms();
        self.rotations += 1;
        let name = format!("audit-{stamp:013}-{:06}.jsonl", self.rotations % 1_000_000);
        std::fs::rename(self.dir.join(CURRENT), self.dir.join(name))?;
        self.file = open_current(&self.dir)?;
        self.size = 0;
        let mut rotated = rotated_files(&self.dir)?;
        while rotated.len() > self.config.files_kept {
            let oldest = rotated.remove(0);
            std::fs::remove_file(&oldest)?;
        }
        File::open(&self.dir)?.sync_all()
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
            audit.record(&record(n), true).await;
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
