//! The learner's data directory: the watch cursor and the log of accepted finished tasks, so a
//! restarted learner resumes the feed where it stopped and still has its training data.
//!
//! `cursor.json` is `{"version":1,"after_seq":N}`, replaced atomically (temporary file, fsync,
//! rename, fsync of the directory). `examples.log` holds each accepted `FinishedTask` as a
//! length-delimited protobuf record, appended and fsynced before the cursor moves past it. The
//! records are the raw tasks rather than feature vectors so that a new feature schema can be
//! computed from old data; the parts no feature reads (output tails, environment values) are
//! dropped to keep them small. A crash can leave a torn last record, which is cut off on open; a
//! complete record that does not decode is corruption and an error.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use colony_proto::pb;
use prost::Message;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::example::EXAMPLES_MAX;

const CURSOR_FILE: &str = "cursor.json";
const LOG_FILE: &str = "examples.log";
const CURSOR_VERSION: u32 = 1;
/// The largest record accepted from the log: a task's spec is bounded far below this.
pub const RECORD_BYTES_MAX: usize = 1 << 20;
/// The log is rewritten with only the newest [`EXAMPLES_MAX`] records once it holds this many.
const LOG_RECORDS_MAX: usize = 2 * EXAMPLES_MAX;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

#[derive(Debug, Serialize, Deserialize)]
struct CursorFile {
    version: u32,
    after_seq: u64,
}

/// The data directory, opened.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    log: File,
    log_records: usize,
}

/// What a previous run left behind.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The feed position to resume after.
    pub after_seq: u64,
    /// The logged tasks, oldest first, at most [`EXAMPLES_MAX`].
    pub records: Vec<pb::FinishedTask>,
    /// Bytes of a torn last record that were cut off.
    pub torn_bytes: usize,
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { action, path: path.to_owned(), source }
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let temporary = path.with_extension("tmp");
    let mut file = File::create(&temporary).map_err(io_error("creating", &temporary))?;
    file.write_all(bytes).map_err(io_error("writing", &temporary))?;
    file.sync_all().map_err(io_error("syncing", &temporary))?;
    fs::rename(&temporary, path).map_err(io_error("renaming into place", path))?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io_error("syncing the directory of", path))
}

/// The task as logged: what features can read, without output tails or environment values.
fn stripped(record: &pb::FinishedTask) -> pb::FinishedTask {
    let mut record = record.clone();
    if let Some(task) = record.task.as_mut() {
        task.stdout_tail.clear();
        task.stderr_tail.clear();
        task.reason = None;
        if let Some(pb::task_spec::Run::Process(process)) =
            task.spec.as_mut().and_then(|spec| spec.run.as_mut())
        {
            process.env.clear();
        }
    }
    record
}

/// Splits the log into records; a record cut short at the end is reported as torn bytes.
fn parse_log(path: &Path, bytes: &[u8]) -> Result<(Vec<pb::FinishedTask>, usize), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { path: path.to_owned(), reason };
    let mut records = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let mut cursor = rest;
        let Ok(length) = prost::encoding::decode_varint(&mut cursor) else {
            // A length prefix is at most 10 bytes; a shorter unfinished one is a torn append.
            if rest.len() < 10 {
                return Ok((records, rest.len()));
            }
            return Err(corrupt(format!("bad length prefix at byte {}", bytes.len() - rest.len())));
        };
        let length = usize::try_from(length)
            .ok()
            .filter(|&length| length <= RECORD_BYTES_MAX)
            .ok_or_else(|| {
                corrupt(format!(
                    "a record of {length} bytes at byte {} exceeds the limit of {RECORD_BYTES_MAX}",
                    bytes.len() - rest.len()
                ))
            })?;
        if cursor.len() < length {
            return Ok((records, rest.len()));
        }
        let record = pb::FinishedTask::decode(&cursor[..length]).map_err(|error| {
            corrupt(format!(
                "the record at byte {} does not decode: {error}",
                bytes.len() - rest.len()
            ))
        })?;
        records.push(record);
        rest = &cursor[length..];
    }
    Ok((records, 0))
}

impl Store {
    /// Opens (creating if needed) the data directory and reads what it holds. A torn last log
    /// record is cut off.
    pub fn open(dir: &Path) -> Result<(Store, Recovered), StoreError> {
        fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
        let cursor_path = dir.join(CURSOR_FILE);
        let after_seq = match fs::read(&cursor_path) {
            Ok(bytes) => {
                let cursor: CursorFile = serde_json::from_slice(&bytes).map_err(|error| {
                    StoreError::Corrupt { path: cursor_path.clone(), reason: error.to_string() }
                })?;
                if cursor.version != CURSOR_VERSION {
                    return Err(StoreError::Corrupt {
                        path: cursor_path,
                        reason: format!(
                            "version {} is not the supported {CURSOR_VERSION}",
                            cursor.version
                        ),
                    });
                }
                cursor.after_seq
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => 0,
            Err(source) => {
                return Err(StoreError::Io { action: "reading", path: cursor_path, source })
            }
        };
        let log_path = dir.join(LOG_FILE);
        let bytes = match fs::read(&log_path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(StoreError::Io { action: "reading", path: log_path, source })
            }
        };
        let (mut records, torn_bytes) = parse_log(&log_path, &bytes)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_error("opening", &log_path))?;
        if torn_bytes > 0 {
            // In append mode every write goes to the end, so truncating is all it takes.
            log.set_len((bytes.len() - torn_bytes) as u64)
                .map_err(io_error("cutting the torn record off", &log_path))?;
            log.sync_all().map_err(io_error("syncing", &log_path))?;
        }
        let log_records = records.len();
        records.drain(..records.len().saturating_sub(EXAMPLES_MAX));
        let mut store = Store { dir: dir.to_owned(), log, log_records };
        store.compact_if_due()?;
        Ok((store, Recovered { after_seq, records, torn_bytes }))
    }

    /// Appends accepted tasks to the log and syncs it; call before [`Store::save_cursor`] moves
    /// past them.
    pub fn append(&mut self, records: &[pb::FinishedTask]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::new();
        for record in records {
            stripped(record).encode_length_delimited(&mut bytes).map_err(|error| {
                StoreError::Corrupt {
                    path: self.log_path(),
                    reason: format!("encoding a record: {error}"),
                }
            })?;
        }
        let path = self.log_path();
        self.log.write_all(&bytes).map_err(io_error("appending to", &path))?;
        self.log.sync_data().map_err(io_error("syncing", &path))?;
        self.log_records += records.len();
        self.compact_if_due()
    }

    /// Records that the feed has been consumed up to and including `after_seq`.
    pub fn save_cursor(&self, after_seq: u64) -> Result<(), StoreError> {
        let cursor = CursorFile { version: CURSOR_VERSION, after_seq };
        // A struct of two integers always serializes.
        let bytes = serde_json::to_vec(&cursor).map_err(|error| StoreError::Corrupt {
            path: self.dir.join(CURSOR_FILE),
            reason: error.to_string(),
        })?;
        write_atomically(&self.dir.join(CURSOR_FILE), &bytes)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// Rewrites the log with its newest [`EXAMPLES_MAX`] records once it holds
    /// [`LOG_RECORDS_MAX`], so it stays bounded while the buffer never loses what it holds.
    fn compact_if_due(&mut self) -> Result<(), StoreError> {
        if self.log_records < LOG_RECORDS_MAX {
            return Ok(());
        }
        let path = self.log_path();
        let bytes = fs::read(&path).map_err(io_error("reading", &path))?;
        let (records, _) = parse_log(&path, &bytes)?;
        let mut kept = Vec::new();
        let newest = &records[records.len().saturating_sub(EXAMPLES_MAX)..];
        for record in newest {
            record.encode_length_delimited(&mut kept).map_err(|error| StoreError::Corrupt {
                path: path.clone(),
                reason: format!("encoding a record: {error}"),
            })?;
        }
        write_atomically(&path, &kept)?;
        self.log =
            OpenOptions::new().append(true).open(&path).map_err(io_error("reopening", &path))?;
        self.log_records = newest.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::example::tests::finished;
    use colony_model::fixtures::process_task;

    fn record(seq: u64) -> pb::FinishedTask {
        let mut record = finished(seq, &process_task("etl-1", &["x"]), 100, Some(1 << 20));
        if let Some(task) = record.task.as_mut() {
            task.stdout_tail = "lots of output".to_owned();
        }
        record
    }

    #[test]
    fn cursor_and_log_survive_a_restart() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (mut store, recovered) = Store::open(dir.path())?;
        assert_eq!((recovered.after_seq, recovered.records.len()), (0, 0));
        store.append(&[record(1), record(2)])?;
        store.save_cursor(3)?;
        store.append(&[record(4)])?;
        drop(store);

        let (_, recovered) = Store::open(dir.path())?;
        assert_eq!(recovered.after_seq, 3);
        let seqs: Vec<u64> = recovered.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 4]);
        assert_eq!(recovered.records[0], stripped(&record(1)));
        assert!(recovered.records[0].task.as_ref().is_some_and(|t| t.stdout_tail.is_empty()));
        Ok(())
    }

    #[test]
    fn a_torn_record_is_cut_off_and_corruption_is_an_error(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (mut store, _) = Store::open(dir.path())?;
        store.append(&[record(1), record(2)])?;
        drop(store);
        let path = dir.path().join(LOG_FILE);
        let whole = fs::read(&path)?;
        fs::write(&path, &whole[..whole.len() - 5])?;
        let (mut store, recovered) = Store::open(dir.path())?;
        assert_eq!(recovered.records.len(), 1);
        assert!(recovered.torn_bytes > 0);
        // Appending after the cut leaves a clean log.
        store.append(&[record(3)])?;
        drop(store);
        let (_, recovered) = Store::open(dir.path())?;
        let seqs: Vec<u64> = recovered.records.iter().map(|r| r.seq).collect();
        assert_eq!((seqs, recovered.torn_bytes), (vec![1, 3], 0));

        // A complete record of garbage is corruption, not an empty log.
        fs::write(&path, [3, 0xff, 0xff, 0xff])?;
        assert!(matches!(Store::open(dir.path()), Err(StoreError::Corrupt { .. })));
        Ok(())
    }

    /// The cursor file's format is frozen: a learner must read what an older one wrote.
    #[test]
    fn frozen_cursor_still_reads() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        fs::write(dir.path().join(CURSOR_FILE), br#"{"version":1,"after_seq":42}"#)?;
        let (store, recovered) = Store::open(dir.path())?;
        assert_eq!(recovered.after_seq, 42);
        store.save_cursor(42)?;
        assert_eq!(fs::read(dir.path().join(CURSOR_FILE))?, br#"{"version":1,"after_seq":42}"#);
        fs::write(dir.path().join(CURSOR_FILE), b"{\"version\":2,\"after_seq\":1}")?;
        assert!(matches!(Store::open(dir.path()), Err(StoreError::Corrupt { .. })));
        Ok(())
    }
}
