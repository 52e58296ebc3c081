//! The latest state-machine snapshot as one durable, checksummed file.
//!
//! A snapshot is written to `snapshot.tmp`, fsynced, renamed over `snapshot.bin` and the directory
//! fsynced, so after a crash the file is either the old snapshot or the new one, whole. The file is
//! one codec frame of `(SnapshotMeta, data)`; a frame that fails its checksum is reported as
//! corruption, never as "no snapshot". Only the latest snapshot is kept.

use crate::{codec, StoreError};
use openraft::{BasicNode, SnapshotMeta};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

const CURRENT_NAME: &str = "snapshot.bin";
const TEMPORARY_NAME: &str = "snapshot.tmp";

/// Snapshot metadata as openraft defines it for Colony's node types.
pub type Meta = SnapshotMeta<u64, BasicNode>;

/// A snapshot as stored: its metadata and the state-machine bytes (themselves a codec frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSnapshot {
    pub meta: Meta,
    pub data: Vec<u8>,
}

/// The directory holding the latest snapshot.
#[derive(Debug)]
pub struct SnapshotFile {
    dir: PathBuf,
    /// The metadata of the snapshot on disk. Writers hold this lock for the whole
    /// write-fsync-rename, so two snapshots never race on the temporary file and an older snapshot
    /// never replaces a newer one.
    persisted: Mutex<Option<Meta>>,
}

impl SnapshotFile {
    /// Opens (creating if absent) the snapshot directory and reads the latest snapshot, if any.
    pub fn open(dir: &Path) -> Result<(SnapshotFile, Option<StoredSnapshot>), StoreError> {
        fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
        let temporary = dir.join(TEMPORARY_NAME);
        match fs::remove_file(&temporary) {
            Ok(()) => {
                tracing::info!(path = %temporary.display(), "removed a snapshot left half-written by a crash")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(io_error(&temporary, source)),
        }
        let file = SnapshotFile { dir: dir.to_path_buf(), persisted: Mutex::new(None) };
        let current = file.read()?;
        *file.lock() = current.as_ref().map(|snapshot| snapshot.meta.clone());
        Ok((file, current))
    }

    /// Reads and verifies the snapshot on disk; `None` only when there is no snapshot file.
    pub fn read(&self) -> Result<Option<StoredSnapshot>, StoreError> {
        let path = self.dir.join(CURRENT_NAME);
        let frame = match fs::read(&path) {
            Ok(frame) => frame,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io_error(&path, source)),
        };
        let (meta, data): (Meta, Vec<u8>) =
            codec::decode(&frame).map_err(|e| StoreError::Corrupt {
                what: format!("snapshot file {}", path.display()),
                detail: e.to_string(),
            })?;
        Ok(Some(StoredSnapshot { meta, data }))
    }

    /// Durably replaces the snapshot on disk with this one. Returns false, writing nothing, when
    /// the snapshot on disk already covers a later log id.
    pub fn write(&self, meta: &Meta, data: &[u8]) -> Result<bool, StoreError> {
        let mut persisted = self.lock();
        if persisted.as_ref().is_some_and(|current| current.last_log_id > meta.last_log_id) {
            return Ok(false);
        }
        // The frame of `(meta, data)`, written in parts: `data` is the whole state, and joining it
        // with the metadata in memory would hold it twice more.
        let config = bincode::config::standard();
        let encoded = bincode::serde::encode_to_vec(meta, config)
            .and_then(|head| Ok((head, bincode::serde::encode_to_vec(data.len() as u64, config)?)));
        let (head, length) = encoded.map_err(|e| StoreError::Encode {
            what: format!("snapshot {}", meta.snapshot_id),
            source: codec::CodecError::Encode(e),
        })?;
        let temporary = self.dir.join(TEMPORARY_NAME);
        let current = self.dir.join(CURRENT_NAME);
        write_synced(&temporary, &[&head, &length, data])
            .map_err(|source| io_error(&temporary, source))?;
        fs::rename(&temporary, &current).map_err(|source| io_error(&current, source))?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| io_error(&self.dir, source))?;
        *persisted = Some(meta.clone());
        Ok(true)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Meta>> {
        // The guarded value is only a copy of what is on disk, replaced after a complete write,
        // so a panic elsewhere cannot leave it inconsistent.
        self.persisted.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn write_synced(path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let mut file = io::BufWriter::new(File::create(path)?);
    codec::write_frame(&mut file, parts)?;
    file.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all()
}

fn io_error(path: &Path, source: io::Error) -> StoreError {
    StoreError::Io { path: path.display().to_string(), source }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId, StoredMembership};

    fn meta(index: u64) -> Meta {
        Meta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("1-{index}-1"),
        }
    }

    #[test]
    fn written_snapshot_reads_back_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (file, none) = SnapshotFile::open(dir.path()).unwrap();
        assert!(none.is_none());
        assert!(file.write(&meta(5), b"state").unwrap());
        drop(file);
        let (_, got) = SnapshotFile::open(dir.path()).unwrap();
        assert_eq!(got, Some(StoredSnapshot { meta: meta(5), data: b"state".to_vec() }));
        assert!(!dir.path().join(TEMPORARY_NAME).exists());
    }

    #[test]
    fn older_snapshot_does_not_replace_newer() {
        let dir = tempfile::tempdir().unwrap();
        let (file, _) = SnapshotFile::open(dir.path()).unwrap();
        assert!(file.write(&meta(9), b"new").unwrap());
        assert!(!file.write(&meta(4), b"old").unwrap());
        assert_eq!(file.read().unwrap().unwrap().data, b"new");
    }

    #[test]
    fn leftover_temporary_file_is_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(TEMPORARY_NAME), b"half").unwrap();
        let (_, got) = SnapshotFile::open(dir.path()).unwrap();
        assert!(got.is_none());
        assert!(!dir.path().join(TEMPORARY_NAME).exists());
    }
}
