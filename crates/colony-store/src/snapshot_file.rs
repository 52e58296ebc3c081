//! The latest state-machine snapshot as a durable, checksummed file, in one of two slots.
//!
//! Snapshots alternate between two files, `snapshot.bin` and `snapshot-b.bin`: a new one is
//! written over the older slot, in place, and fsynced, while the other slot keeps the latest
//! durable snapshot. So a crash mid-write leaves the previous snapshot whole, and the data
//! directory holds two snapshots' worth of space all the time rather than growing by a whole
//! snapshot for the length of each write (the old file could only go once the new one was
//! durable, since the log before it is already purged). Each file is one codec frame of
//! `(SnapshotMeta, data)`. On open, the newest slot that verifies is the snapshot; a slot that
//! fails its checksum beside one that verifies is a write a crash cut short (it is logged and
//! written over next), but a lone slot that fails is corruption, never "no snapshot".
//!
//! Releases before the second slot wrote `snapshot.tmp` and renamed it over `snapshot.bin`, the
//! first slot; a `snapshot.tmp` left by one of their crashes is removed on open.

use crate::{codec, StoreError};
use openraft::{BasicNode, SnapshotMeta};
use serde::Serialize;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

const SLOT_NAMES: [&str; 2] = ["snapshot.bin", "snapshot-b.bin"];
const TEMPORARY_NAME: &str = "snapshot.tmp";
/// How many times a read starts again because both slots were rewritten while it read one.
const READ_ATTEMPTS_MAX: usize = 8;

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
    /// Held for a whole write, so two writers never share a slot and an older snapshot never
    /// replaces a newer one.
    writer: Mutex<()>,
    /// Held only for moments, so a read never waits for a write.
    slots: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    /// The slot holding the latest durable snapshot, and that snapshot's metadata.
    current: Option<(usize, Meta)>,
    /// Writes begun on each slot: a read that sees the same count before and after reading a
    /// slot read bytes no writer touched.
    writes_begun: [u64; 2],
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
        let file = SnapshotFile {
            dir: dir.to_path_buf(),
            writer: Mutex::new(()),
            slots: Mutex::new(Slots::default()),
        };
        let latest = match [0, 1].map(|slot| read_slot(&file.path(slot))) {
            [Ok(Some(a)), Ok(Some(b))] if b.meta.last_log_id > a.meta.last_log_id => Some((1, b)),
            [Ok(Some(a)), Ok(_)] => Some((0, a)),
            [Ok(None), Ok(b)] => b.map(|b| (1, b)),
            [Err(damaged), Ok(Some(b))] => Some((1, survivor(damaged, b))),
            [Ok(Some(a)), Err(damaged)] => Some((0, survivor(damaged, a))),
            [Err(damaged), _] | [_, Err(damaged)] => return Err(damaged),
        };
        file.lock_slots().current = latest.as_ref().map(|(slot, s)| (*slot, s.meta.clone()));
        Ok((file, latest.map(|(_, snapshot)| snapshot)))
    }

    /// Reads and verifies the latest snapshot; `None` only when none was ever written.
    pub fn read(&self) -> Result<Option<StoredSnapshot>, StoreError> {
        for _ in 0..READ_ATTEMPTS_MAX {
            let (slot, begun) = match &*self.lock_slots() {
                Slots { current: Some((slot, _)), writes_begun } => (*slot, writes_begun[*slot]),
                Slots { current: None, .. } => return Ok(None),
            };
            let path = self.path(slot);
            let read = read_slot(&path);
            if self.lock_slots().writes_begun[slot] == begun {
                return match read? {
                    Some(snapshot) => Ok(Some(snapshot)),
                    None => Err(io_error(&path, io::ErrorKind::NotFound.into())),
                };
            }
        }
        Err(StoreError::Corrupt {
            what: format!("snapshots in {}", self.dir.display()),
            detail: format!("rewritten {READ_ATTEMPTS_MAX} times while being read"),
        })
    }

    /// Durably makes this snapshot, whose state-machine bytes are `data`, the latest. Returns
    /// the file's size, or `None`, writing nothing, when the latest already covers a later log id.
    pub fn write(&self, meta: &Meta, data: &[u8]) -> Result<Option<u64>, StoreError> {
        self.write_slot(meta, |out, head| {
            let length = encode_part(meta, &(data.len() as u64))?;
            codec::write_frame(out, &[head, &length, data])?;
            Ok(codec::HEADER_LEN + head.len() + length.len() + data.len())
        })
    }

    /// As [`SnapshotFile::write`], with the state-machine bytes the frame of `value`, encoded
    /// into the file as it goes: a snapshot is tens of MiB, and the server would otherwise hold
    /// it encoded in memory beside the state for the length of the write.
    pub fn write_encoded<T: Serialize>(
        &self,
        meta: &Meta,
        value: &T,
    ) -> Result<Option<u64>, StoreError> {
        let encode_error =
            |source| StoreError::Encode { what: format!("snapshot {}", meta.snapshot_id), source };
        self.write_slot(meta, |out, head| {
            let body_len = codec::body_len(value).map_err(encode_error)?;
            let length = encode_part(meta, &((codec::HEADER_LEN + body_len) as u64))?;
            // Both checksums come at the end, so their headers are written as zeros, then over.
            let placeholder = [0; codec::HEADER_LEN];
            for part in [&placeholder[..], head, &length, &placeholder] {
                out.write_all(part)?;
            }
            let (written, body_crc) = codec::write_body(out, value).map_err(encode_error)?;
            if written != body_len {
                return Err(WriteError::Store(encode_error(codec::CodecError::Encode(
                    bincode::error::EncodeError::Other("the state changed while it was encoded"),
                ))));
            }
            let inner = codec::header(body_crc.clone().finalize());
            let mut outer_crc = crc32fast::Hasher::new();
            for part in [head, &length, &inner] {
                outer_crc.update(part);
            }
            outer_crc.combine(&body_crc);
            out.flush()?;
            let file = out.get_ref();
            file.write_all_at(&codec::header(outer_crc.finalize()), 0)?;
            let inner_at = codec::HEADER_LEN + head.len() + length.len();
            file.write_all_at(&inner, inner_at as u64)?;
            Ok(inner_at + codec::HEADER_LEN + body_len)
        })
    }

    /// Writes a snapshot over the older slot with `write_frame`, which is given the file and
    /// the encoded metadata and returns the frame's length; then fsyncs it and makes it the
    /// latest.
    fn write_slot(
        &self,
        meta: &Meta,
        write_frame: impl FnOnce(&mut io::BufWriter<File>, &[u8]) -> Result<usize, WriteError>,
    ) -> Result<Option<u64>, StoreError> {
        let _writing = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = {
            let mut slots = self.lock_slots();
            let slot = match &slots.current {
                Some((_, current)) if current.last_log_id > meta.last_log_id => return Ok(None),
                Some((current, _)) => 1 - current,
                None => 0,
            };
            slots.writes_begun[slot] += 1;
            slot
        };
        let path = self.path(slot);
        let head = encode_part(meta, meta)?;
        // Written in place, not truncated first: the slot keeps its blocks, so the directory does
        // not shrink and grow by a snapshot with every write.
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| io_error(&path, source))?;
        let mut out = io::BufWriter::with_capacity(1 << 20, file);
        let len = write_frame(&mut out, &head).map_err(|error| match error {
            WriteError::Io(source) => io_error(&path, source),
            WriteError::Store(error) => error,
        })?;
        let file = out.into_inner().map_err(|e| io_error(&path, e.into_error()))?;
        file.set_len(len as u64)
            .and_then(|()| file.sync_all())
            .and_then(|()| File::open(&self.dir)?.sync_all())
            .map_err(|source| io_error(&path, source))?;
        self.lock_slots().current = Some((slot, meta.clone()));
        Ok(Some(len as u64))
    }

    fn path(&self, slot: usize) -> PathBuf {
        self.dir.join(SLOT_NAMES[slot])
    }

    fn lock_slots(&self) -> MutexGuard<'_, Slots> {
        // The guarded values are replaced whole, after the write they describe, so a panic
        // elsewhere cannot leave them inconsistent.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why writing a slot's frame failed.
enum WriteError {
    Io(io::Error),
    Store(StoreError),
}

impl From<io::Error> for WriteError {
    fn from(error: io::Error) -> Self {
        WriteError::Io(error)
    }
}

impl From<StoreError> for WriteError {
    fn from(error: StoreError) -> Self {
        WriteError::Store(error)
    }
}

/// The snapshot in one slot, verified; `None` when the slot's file does not exist.
fn read_slot(path: &Path) -> Result<Option<StoredSnapshot>, StoreError> {
    let frame = match fs::read(path) {
        Ok(frame) => frame,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_error(path, source)),
    };
    let (meta, data): (Meta, Vec<u8>) = codec::decode(&frame).map_err(|e| StoreError::Corrupt {
        what: format!("snapshot file {}", path.display()),
        detail: e.to_string(),
    })?;
    Ok(Some(StoredSnapshot { meta, data }))
}

/// The verified snapshot beside a slot that is not, which a crash mid-write leaves.
fn survivor(damaged: StoreError, snapshot: StoredSnapshot) -> StoredSnapshot {
    tracing::warn!(
        damaged = %damaged,
        snapshot_id = snapshot.meta.snapshot_id,
        "one snapshot slot does not verify (a write cut short by a crash); using the other"
    );
    snapshot
}

fn encode_part<T: Serialize>(meta: &Meta, value: &T) -> Result<Vec<u8>, StoreError> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| {
        StoreError::Encode {
            what: format!("snapshot {}", meta.snapshot_id),
            source: codec::CodecError::Encode(e),
        }
    })
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

    fn slot(dir: &Path, slot: usize) -> Vec<u8> {
        fs::read(dir.join(SLOT_NAMES[slot])).unwrap()
    }

    #[test]
    fn written_snapshot_reads_back_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (file, none) = SnapshotFile::open(dir.path()).unwrap();
        assert!(none.is_none());
        assert!(file.read().unwrap().is_none());
        let size = file.write(&meta(5), b"state").unwrap();
        assert_eq!(size, Some(slot(dir.path(), 0).len() as u64));
        drop(file);
        let (_, got) = SnapshotFile::open(dir.path()).unwrap();
        assert_eq!(got, Some(StoredSnapshot { meta: meta(5), data: b"state".to_vec() }));
    }

    #[test]
    fn older_snapshot_does_not_replace_newer() {
        let dir = tempfile::tempdir().unwrap();
        let (file, _) = SnapshotFile::open(dir.path()).unwrap();
        assert!(file.write(&meta(9), b"new").unwrap().is_some());
        assert_eq!(file.write(&meta(4), b"old").unwrap(), None);
        assert_eq!(file.read().unwrap().unwrap().data, b"new");
        assert!(!dir.path().join(SLOT_NAMES[1]).exists(), "the refused write touched a slot");
    }

    /// Each write goes over the older slot, in place, so the newer one survives a crash mid-write
    /// and a slot shrinks to a smaller snapshot's size.
    #[test]
    fn snapshots_alternate_slots_and_a_torn_slot_leaves_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let (file, _) = SnapshotFile::open(dir.path()).unwrap();
        file.write(&meta(5), &[5; 300]).unwrap();
        file.write(&meta(9), &[9; 200]).unwrap();
        file.write(&meta(12), &[12; 100]).unwrap();
        assert_eq!(file.read().unwrap().unwrap().data, [12; 100]);
        let first = slot(dir.path(), 0);
        assert!(first.len() < 200, "slot a kept the old snapshot's tail: {} bytes", first.len());
        drop(file);
        let (_, got) = SnapshotFile::open(dir.path()).unwrap();
        assert_eq!(got.map(|s| s.meta), Some(meta(12)));

        // A crash while snapshot 12 was written over slot a: slot b's snapshot 9 is the latest.
        let mut torn = first;
        torn[60] ^= 0x01;
        fs::write(dir.path().join(SLOT_NAMES[0]), &torn).unwrap();
        let (file, got) = SnapshotFile::open(dir.path()).unwrap();
        assert_eq!(got, Some(StoredSnapshot { meta: meta(9), data: vec![9; 200] }));
        // The next write goes over the torn slot, not over the survivor.
        file.write(&meta(15), &[15; 50]).unwrap();
        assert_eq!(codec::decode::<(Meta, Vec<u8>)>(&slot(dir.path(), 1)).unwrap().0, meta(9));
        drop(file);
        let (_, got) = SnapshotFile::open(dir.path()).unwrap();
        assert_eq!(got.map(|s| s.data), Some(vec![15; 50]));
    }

    #[test]
    fn a_lone_damaged_slot_or_two_are_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (file, _) = SnapshotFile::open(dir.path()).unwrap();
        file.write(&meta(5), b"five").unwrap();
        let mut damaged = slot(dir.path(), 0);
        let last = damaged.len() - 1;
        damaged[last] ^= 0x01;
        fs::write(dir.path().join(SLOT_NAMES[0]), &damaged).unwrap();
        let refused = |dir: &Path| match SnapshotFile::open(dir) {
            Err(StoreError::Corrupt { detail, .. }) => detail,
            Err(other) => panic!("expected corruption, got {other}"),
            Ok((_, got)) => panic!("a damaged snapshot opened as {got:?}"),
        };
        assert!(refused(dir.path()).contains("checksum mismatch"));
        fs::write(dir.path().join(SLOT_NAMES[1]), &damaged[..damaged.len() / 2]).unwrap();
        refused(dir.path());
    }

    /// A value encoded into the file as it is written gives the same bytes as its frame encoded
    /// in memory and written whole, and reads back as that frame.
    #[test]
    fn streamed_encoding_writes_the_frame_encode_gives() {
        let value = (7u64, "colony".repeat(10_000), vec![1u32, 2, 3]);
        let streamed = tempfile::tempdir().unwrap();
        let (file, _) = SnapshotFile::open(streamed.path()).unwrap();
        let size = file.write_encoded(&meta(3), &value).unwrap();
        let whole = tempfile::tempdir().unwrap();
        let (file, _) = SnapshotFile::open(whole.path()).unwrap();
        file.write(&meta(3), &codec::encode(&value).unwrap()).unwrap();
        assert_eq!(slot(streamed.path(), 0), slot(whole.path(), 0));
        assert_eq!(size, Some(slot(streamed.path(), 0).len() as u64));
        let (_, got) = SnapshotFile::open(streamed.path()).unwrap();
        let got = got.unwrap();
        assert_eq!(codec::decode::<(u64, String, Vec<u32>)>(&got.data).unwrap(), value);
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
