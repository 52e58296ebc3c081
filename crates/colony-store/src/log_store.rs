//! The Raft log, vote and commit index in RocksDB, with group-committed appends.
//!
//! Column family `log` maps a big-endian u64 index to a codec frame of `openraft::Entry`; column
//! family `meta` holds the vote, the committed log id and the last purged log id, each a codec
//! frame. An append is written to RocksDB before `append` returns (so reads see it) but not
//! fsynced there: a dedicated flusher thread collects every append waiting for durability, fsyncs
//! the write-ahead log once for all of them and only then reports each one flushed to openraft.
//! The vote, truncations and purges are written with a synchronous (fsynced) write.
//!
//! A purge only writes a range tombstone; the disk it frees comes back when RocksDB compacts the
//! files under it, which on its own happens when enough files pile up (tens of MiB of a log that
//! is already gone). So after each purge a compactor thread compacts the purged range and flushes
//! the rarely written `meta` family, whose memtable otherwise pins every write-ahead log file since
//! its last flush: the log's footprint stays near what has not been purged yet.

use crate::{codec, StoreError, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, LogId, StorageError, StorageIOError, Vote};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction,
    IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";

/// RocksDB memory: two 16 MiB memtables per column family and a small block cache keep a server's
/// storage well under its memory budget.
const WRITE_BUFFER_BYTES: usize = 16 << 20;
const WRITE_BUFFERS_MAX: i32 = 2;
const BLOCK_CACHE_BYTES: usize = 8 << 20;
/// Past this much write-ahead log, RocksDB flushes the memtables that pin the oldest log file, so
/// the rarely-written `meta` column family cannot keep old log files alive forever (the compactor
/// also flushes it after each purge).
const WAL_TOTAL_BYTES_MAX: u64 = 32 << 20;
const INFO_LOG_FILES_MAX: usize = 4;
/// RocksDB's own info log rolls at this size (it never rolls by default: it grew 270 KiB a minute
/// under load, with a compaction after every purge), and only warnings are written to it.
const INFO_LOG_FILE_BYTES_MAX: usize = 1 << 20;
/// The manifest (a record of every flush and compaction) is rewritten past this size.
const MANIFEST_BYTES_MAX: usize = 4 << 20;
/// Appends waiting for the flusher; a full queue makes `append` wait, which is the backpressure.
const FLUSH_QUEUE_CALLBACKS_MAX: usize = 4096;

/// `committed_index` when nothing has been committed.
const NOTHING_COMMITTED: u64 = u64::MAX;

/// openraft's log storage for Colony. Clones share one database and one flusher thread.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    path: String,
    /// The index of the last committed log id saved, or `NOTHING_COMMITTED`.
    committed_index: AtomicU64,
    /// How many times the flusher has fsynced the write-ahead log.
    wal_syncs: Arc<AtomicU64>,
    /// `None` only while dropping: closing the channel is what stops the flusher.
    flush_requests: Option<SyncSender<LogFlushed<TypeConfig>>>,
    flusher: Option<JoinHandle<()>>,
    /// The highest index purged so far, for the compactor.
    purged_through: Arc<AtomicU64>,
    /// Wakes the compactor; holds at most one wake-up (it reads `purged_through` when it runs, so
    /// purges that come while it works are compacted together). `None` only while dropping.
    compact_requests: Option<SyncSender<()>>,
    compactor: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Stop and join the flusher so that the database is closed (and its lock released) by the
        // time the last `LogStore` is gone; the flusher completes every callback it holds first.
        self.flush_requests.take();
        if let Some(flusher) = self.flusher.take() {
            if flusher.join().is_err() {
                tracing::error!(path = %self.path, "raft log flusher thread panicked");
            }
        }
        self.compact_requests.take();
        if let Some(compactor) = self.compactor.take() {
            if compactor.join().is_err() {
                tracing::error!(path = %self.path, "raft log compactor thread panicked");
            }
        }
    }
}

impl LogStore {
    /// Opens (creating if absent) the log database at `path`.
    pub fn open(path: &Path) -> Result<LogStore, StoreError> {
        let display = path.display().to_string();
        std::fs::create_dir_all(path)
            .map_err(|source| StoreError::Io { path: display.clone(), source })?;
        let options = db_options();
        let families =
            [CF_LOG, CF_META].map(|name| ColumnFamilyDescriptor::new(name, options.clone()));
        let db = DB::open_cf_descriptors(&options, path, families)
            .map_err(|source| StoreError::Rocks { path: display.clone(), source })?;
        let db = Arc::new(db);
        let committed: Option<LogId<u64>> = read_meta(&db, &display, KEY_COMMITTED)?.flatten();
        let committed_index = AtomicU64::new(committed.map_or(NOTHING_COMMITTED, |id| id.index));
        let wal_syncs = Arc::new(AtomicU64::new(0));
        let (flush_requests, pending) = std::sync::mpsc::sync_channel(FLUSH_QUEUE_CALLBACKS_MAX);
        let flusher = {
            let (db, path, wal_syncs) = (Arc::clone(&db), display.clone(), Arc::clone(&wal_syncs));
            std::thread::Builder::new()
                .name("colony-log-flush".to_string())
                .spawn(move || run_flusher(&db, &path, &wal_syncs, &pending))
                .map_err(|source| StoreError::Io { path: display.clone(), source })?
        };
        let purged_through = Arc::new(AtomicU64::new(0));
        let (compact_requests, wakeups) = std::sync::mpsc::sync_channel(1);
        let compactor = {
            let (db, path, purged) =
                (Arc::clone(&db), display.clone(), Arc::clone(&purged_through));
            std::thread::Builder::new()
                .name("colony-log-compact".to_string())
                .spawn(move || run_compactor(&db, &path, &purged, &wakeups))
                .map_err(|source| StoreError::Io { path: display.clone(), source })?
        };
        Ok(LogStore {
            inner: Arc::new(Inner {
                db,
                path: display,
                committed_index,
                wal_syncs,
                flush_requests: Some(flush_requests),
                flusher: Some(flusher),
                purged_through,
                compact_requests: Some(compact_requests),
                compactor: Some(compactor),
            }),
        })
    }

    /// The index of the last committed log id openraft saved (`save_committed`), if any.
    pub fn committed_index(&self) -> Option<u64> {
        match self.inner.committed_index.load(Ordering::Acquire) {
            NOTHING_COMMITTED => None,
            index => Some(index),
        }
    }

    /// How many fsyncs of the write-ahead log appends have shared so far (in this process).
    pub fn wal_sync_count(&self) -> u64 {
        self.inner.wal_syncs.load(Ordering::Relaxed)
    }

    fn db(&self) -> &DB {
        &self.inner.db
    }

    fn column(&self, name: &str) -> Result<&ColumnFamily, StoreError> {
        column(self.db(), &self.inner.path, name)
    }

    fn rocks(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Rocks { path: self.inner.path.clone(), source }
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        read_meta(self.db(), &self.inner.path, key)
    }

    fn write_meta<T: Serialize>(&self, key: &str, value: &T, sync: bool) -> Result<(), StoreError> {
        let frame = codec::encode(value)
            .map_err(|source| StoreError::Encode { what: format!("meta key {key:?}"), source })?;
        self.db()
            .put_cf_opt(self.column(CF_META)?, key, frame, &write_options(sync))
            .map_err(|e| self.rocks(e))
    }

    /// Deletes the log entries with index in `[from, to]` (and, when given, records the last
    /// purged log id in the same batch), fsynced.
    fn delete_entries(
        &self,
        from: u64,
        to: u64,
        last_purged: Option<&LogId<u64>>,
    ) -> Result<(), StoreError> {
        let log = self.column(CF_LOG)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(log, from.to_be_bytes(), to.to_be_bytes());
        batch.delete_cf(log, to.to_be_bytes());
        if let Some(log_id) = last_purged {
            let frame = codec::encode(log_id).map_err(|source| StoreError::Encode {
                what: format!("meta key {KEY_LAST_PURGED:?}"),
                source,
            })?;
            batch.put_cf(self.column(CF_META)?, KEY_LAST_PURGED, frame);
        }
        self.db().write_opt(batch, &write_options(true)).map_err(|e| self.rocks(e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let start = match range.start_bound() {
            Bound::Included(&start) => start,
            Bound::Excluded(&start) => match start.checked_add(1) {
                Some(start) => start,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        // The exclusive end; `None` reads to the end of the log.
        let end = match range.end_bound() {
            Bound::Included(&end) => end.checked_add(1),
            Bound::Excluded(&end) => Some(end),
            Bound::Unbounded => None,
        };
        if end.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }
        let log = self.column(CF_LOG).map_err(|e| read_error(ErrorSubject::Logs, &e))?;
        let mut read_options = ReadOptions::default();
        if let Some(end) = end {
            read_options.set_iterate_upper_bound(end.to_be_bytes());
        }
        let start_key = start.to_be_bytes();
        let mode = IteratorMode::From(&start_key, Direction::Forward);
        let mut entries = Vec::new();
        for item in self.db().iterator_cf_opt(log, read_options, mode) {
            let (key, value) = item.map_err(|e| read_error(ErrorSubject::Logs, &self.rocks(e)))?;
            let index = decode_index(&key).map_err(|e| read_error(ErrorSubject::Logs, &e))?;
            let entry = decode_entry(index, &value)
                .map_err(|e| read_error(ErrorSubject::LogIndex(index), &e))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let last_purged_log_id: Option<LogId<u64>> =
            self.read_meta(KEY_LAST_PURGED).map_err(|e| read_error(ErrorSubject::Store, &e))?;
        let log = self.column(CF_LOG).map_err(|e| read_error(ErrorSubject::Logs, &e))?;
        let last_log_id = match self.db().iterator_cf(log, IteratorMode::End).next() {
            None => last_purged_log_id,
            Some(Err(e)) => return Err(read_error(ErrorSubject::Logs, &self.rocks(e))),
            Some(Ok((key, value))) => {
                let index = decode_index(&key).map_err(|e| read_error(ErrorSubject::Logs, &e))?;
                let entry = decode_entry(index, &value)
                    .map_err(|e| read_error(ErrorSubject::LogIndex(index), &e))?;
                Some(entry.log_id)
            }
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        self.write_meta(KEY_VOTE, vote, true).map_err(|e| write_error(ErrorSubject::Vote, &e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        self.read_meta(KEY_VOTE).map_err(|e| read_error(ErrorSubject::Vote, &e))
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        // Not fsynced: losing the latest committed id in a crash only means re-applying less of
        // the log on restart; the rest is re-learned from the leader.
        self.write_meta(KEY_COMMITTED, &committed, false)
            .map_err(|e| write_error(ErrorSubject::Store, &e))?;
        let index = committed.map_or(NOTHING_COMMITTED, |id| id.index);
        self.inner.committed_index.store(index, Ordering::Release);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        let committed: Option<Option<LogId<u64>>> =
            self.read_meta(KEY_COMMITTED).map_err(|e| read_error(ErrorSubject::Store, &e))?;
        Ok(committed.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let log = self.column(CF_LOG).map_err(|e| write_error(ErrorSubject::Logs, &e))?;
        let mut batch = WriteBatch::default();
        for entry in entries {
            let frame = codec::encode(&entry).map_err(|source| {
                let error =
                    StoreError::Encode { what: format!("raft log entry {}", entry.log_id), source };
                StorageError::from(StorageIOError::write_log_entry(entry.log_id, &error))
            })?;
            batch.put_cf(log, entry.log_id.index.to_be_bytes(), frame);
        }
        // Written, not fsynced: the entries are in the OS's copy of the write-ahead log, visible to
        // reads now, and durable once the flusher's next fsync returns.
        self.db()
            .write_opt(batch, &write_options(false))
            .map_err(|e| write_error(ErrorSubject::Logs, &self.rocks(e)))?;
        let closed = || {
            let error = StoreError::Io {
                path: self.inner.path.clone(),
                source: io::Error::other("the raft log flusher has stopped"),
            };
            write_error(ErrorSubject::Logs, &error)
        };
        let requests = self.inner.flush_requests.as_ref().ok_or_else(closed)?;
        requests.send(callback).map_err(|_| closed())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.delete_entries(log_id.index, u64::MAX, None).map_err(|e| {
            StorageError::from(StorageIOError::new(
                ErrorSubject::Log(log_id),
                ErrorVerb::Delete,
                &e,
            ))
        })
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.delete_entries(0, log_id.index, Some(&log_id)).map_err(|e| {
            StorageError::from(StorageIOError::new(
                ErrorSubject::Log(log_id),
                ErrorVerb::Delete,
                &e,
            ))
        })?;
        self.inner.purged_through.fetch_max(log_id.index, Ordering::AcqRel);
        if let Some(requests) = &self.inner.compact_requests {
            // Full: a wake-up is already pending, and it will see this purge too.
            let _ = requests.try_send(());
        }
        Ok(())
    }
}

/// The flusher thread: waits for appends, fsyncs the write-ahead log once for all that are
/// waiting, then reports each of them flushed (or failed). Returns when every `LogStore` is gone.
fn run_flusher(
    db: &DB,
    path: &str,
    wal_syncs: &AtomicU64,
    pending: &Receiver<LogFlushed<TypeConfig>>,
) {
    while let Ok(first) = pending.recv() {
        let mut callbacks = vec![first];
        callbacks.extend(pending.try_iter().take(FLUSH_QUEUE_CALLBACKS_MAX));
        let synced = db.flush_wal(true);
        wal_syncs.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &synced {
            tracing::error!(path, error = %e, "fsync of the raft log's write-ahead log failed");
        }
        for callback in callbacks {
            let result = match &synced {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::other(format!("fsync of the raft log at {path}: {e}"))),
            };
            callback.log_io_completed(result);
        }
    }
}

/// The compactor thread: after each purge, gives the purged range's disk back (see the module
/// documentation). Returns when every `LogStore` is gone. Failures are logged, never fatal: the
/// log stays correct, only larger until RocksDB compacts on its own.
fn run_compactor(db: &DB, path: &str, purged_through: &AtomicU64, wakeups: &Receiver<()>) {
    while wakeups.recv().is_ok() {
        let through = purged_through.load(Ordering::Acquire);
        let (log, meta) = match (column(db, path, CF_LOG), column(db, path, CF_META)) {
            (Ok(log), Ok(meta)) => (log, meta),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(path, error = %e, "raft log compactor cannot find its column families");
                return;
            }
        };
        if let Err(e) = db.flush_cf(meta) {
            tracing::warn!(path, error = %e, "flushing the raft log's meta column family failed");
        }
        // Compaction applies the purge's range tombstone: the files under it are rewritten without
        // the purged entries. (Dropping whole files instead, `DeleteFilesInRange`, can drop the
        // tombstone's own file and bring older copies of purged entries back.)
        db.compact_range_cf(log, None::<&[u8]>, Some(through.to_be_bytes()));
    }
}

fn db_options() -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&Cache::new_lru_cache(BLOCK_CACHE_BYTES));
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.set_write_buffer_size(WRITE_BUFFER_BYTES);
    options.set_max_write_buffer_number(WRITE_BUFFERS_MAX);
    options.set_max_total_wal_size(WAL_TOTAL_BYTES_MAX);
    options.set_compression_type(DBCompressionType::None);
    options.set_keep_log_file_num(INFO_LOG_FILES_MAX);
    options.set_max_log_file_size(INFO_LOG_FILE_BYTES_MAX);
    options.set_log_level(rocksdb::LogLevel::Warn);
    options.set_max_manifest_file_size(MANIFEST_BYTES_MAX);
    options.set_block_based_table_factory(&table);
    options
}

fn write_options(sync: bool) -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(sync);
    options
}

fn column<'a>(db: &'a DB, path: &str, name: &str) -> Result<&'a ColumnFamily, StoreError> {
    db.cf_handle(name).ok_or_else(|| StoreError::Corrupt {
        what: format!("rocksdb at {path}"),
        detail: format!("column family {name:?} is missing"),
    })
}

fn read_meta<T: DeserializeOwned>(db: &DB, path: &str, key: &str) -> Result<Option<T>, StoreError> {
    let meta = column(db, path, CF_META)?;
    let Some(frame) = db
        .get_pinned_cf(meta, key)
        .map_err(|source| StoreError::Rocks { path: path.to_string(), source })?
    else {
        return Ok(None);
    };
    codec::decode(&frame).map(Some).map_err(|e| StoreError::Corrupt {
        what: format!("meta key {key:?} in {path}"),
        detail: e.to_string(),
    })
}

fn decode_index(key: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| StoreError::Corrupt {
        what: "raft log key".to_string(),
        detail: format!("{} bytes where a big-endian u64 index belongs", key.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

fn decode_entry(index: u64, frame: &[u8]) -> Result<Entry<TypeConfig>, StoreError> {
    let what = || format!("raft log entry at index {index}");
    let entry: Entry<TypeConfig> = codec::decode(frame)
        .map_err(|e| StoreError::Corrupt { what: what(), detail: e.to_string() })?;
    if entry.log_id.index != index {
        return Err(StoreError::Corrupt {
            what: what(),
            detail: format!("it holds the entry for {}", entry.log_id),
        });
    }
    Ok(entry)
}

fn read_error(subject: ErrorSubject<u64>, error: &StoreError) -> StorageError<u64> {
    StorageIOError::new(subject, ErrorVerb::Read, error).into()
}

fn write_error(subject: ErrorSubject<u64>, error: &StoreError) -> StorageError<u64> {
    StorageIOError::new(subject, ErrorVerb::Write, error).into()
}
