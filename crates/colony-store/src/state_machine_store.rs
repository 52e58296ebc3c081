//! openraft's state machine for Colony: applies committed entries to colony-core's `StateMachine`
//! and builds, installs and persists snapshots of it.
//!
//! The applied state lives in memory (`SharedState`, also read by the server) and is made durable
//! only by snapshots; after a restart, openraft re-applies the committed log entries that follow
//! the latest snapshot.

use crate::snapshot_file::{Meta, SnapshotFile, StoredSnapshot};
use crate::{Applied, ProposalResponse, SharedState, StoreError, StoreOptions, TypeConfig};
use colony_core::StateMachine;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, StorageError, StorageIOError,
    StoredMembership,
};
use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// openraft's state machine for Colony; also its snapshot builder. Clones share one state.
#[derive(Clone)]
pub struct StateMachineStore {
    state: SharedState,
    snapshots: Arc<SnapshotFile>,
    stats: Arc<SnapshotStats>,
    /// Check the state machine's invariants after every applied proposal (and crash on a
    /// violation): always in debug builds, in release builds when the options ask for it.
    check_invariants: bool,
}

/// How often and how long snapshots took, for the server's metrics (this crate has no metrics
/// library of its own).
#[derive(Debug, Default)]
pub struct SnapshotStats {
    /// Snapshots this process built; also distinguishes snapshots built at the same log id.
    pub built: AtomicU64,
    /// Snapshots received from a leader and installed.
    pub installed: AtomicU64,
    /// Build durations in microseconds not yet taken by `take_build_micros` (at most
    /// `BUILD_DURATIONS_KEPT_MAX`; older ones are dropped).
    build_micros: std::sync::Mutex<Vec<u64>>,
    /// Size of the latest snapshot built or installed.
    pub last_bytes: AtomicU64,
}

const BUILD_DURATIONS_KEPT_MAX: usize = 1024;

impl SnapshotStats {
    /// The build durations recorded since the last call.
    pub fn take_build_micros(&self) -> Vec<u64> {
        std::mem::take(&mut *self.build_micros.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn record_build(&self, micros: u64, bytes: u64) {
        let mut durations = self.build_micros.lock().unwrap_or_else(|p| p.into_inner());
        if durations.len() < BUILD_DURATIONS_KEPT_MAX {
            durations.push(micros);
        }
        self.last_bytes.store(bytes, Ordering::Relaxed);
    }
}

impl StateMachineStore {
    /// Opens the snapshot directory `dir` and restores the applied state from the latest
    /// snapshot in it, if any. A corrupt snapshot is an error, not an empty state.
    pub fn open(dir: &Path, options: &StoreOptions) -> Result<StateMachineStore, StoreError> {
        let (snapshots, latest) = SnapshotFile::open(dir)?;
        let applied = match latest {
            Some(snapshot) => decode_applied(&snapshot.meta, &snapshot.data)?,
            None => Applied::default(),
        };
        Ok(StateMachineStore {
            state: Arc::new(RwLock::new(applied)),
            snapshots: Arc::new(snapshots),
            stats: Arc::default(),
            check_invariants: options.check_invariants || cfg!(debug_assertions),
        })
    }

    /// The applied state, for the server's read path.
    pub fn shared(&self) -> SharedState {
        Arc::clone(&self.state)
    }

    pub fn stats(&self) -> Arc<SnapshotStats> {
        Arc::clone(&self.stats)
    }

    /// The invariant check after the entry at `log_id`, when this store runs it.
    fn checked(&self, machine: &StateMachine, log_id: LogId<u64>) -> Result<(), StoreError> {
        if !self.check_invariants {
            return Ok(());
        }
        machine.check_invariants().map_err(|violation| StoreError::InvariantViolated {
            log_id,
            violation: Box::new(violation),
        })
    }

    fn read_state(&self) -> Result<RwLockReadGuard<'_, Applied>, StoreError> {
        self.state.read().map_err(|_| StoreError::Poisoned)
    }

    fn write_state(&self) -> Result<RwLockWriteGuard<'_, Applied>, StoreError> {
        self.state.write().map_err(|_| StoreError::Poisoned)
    }

    /// Durably writes a snapshot with `write`, off the async runtime's threads (it fsyncs), and
    /// returns its size on disk, or `None` when a later one is already there.
    async fn persist(
        &self,
        meta: &Meta,
        write: impl FnOnce(&SnapshotFile) -> Result<Option<u64>, StoreError> + Send + 'static,
    ) -> Result<Option<u64>, StorageError<u64>> {
        let snapshots = Arc::clone(&self.snapshots);
        let written = tokio::task::spawn_blocking(move || write(&snapshots))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        if written.is_none() {
            let snapshot_id = &meta.snapshot_id;
            tracing::info!(snapshot_id, "snapshot not persisted: a later one is already on disk");
        }
        Ok(written)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        let applied = self.read_state().map_err(|e| state_error(ErrorVerb::Read, &e))?;
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ProposalResponse>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        // One write lock for the whole batch: readers see the state between batches, never
        // half of one.
        let mut applied = self.write_state().map_err(|e| state_error(ErrorVerb::Write, &e))?;
        let mut responses = Vec::new();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => ProposalResponse::default(),
                EntryPayload::Normal(proposal) => {
                    let results = applied.machine.apply_proposal(&proposal);
                    if let Err(error) = self.checked(&applied.machine, entry.log_id) {
                        crash(&error);
                    }
                    ProposalResponse { results }
                }
                EntryPayload::Membership(membership) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    ProposalResponse::default()
                }
            };
            responses.push(response);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let data = snapshot.into_inner();
        let restored = decode_applied(meta, &data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        // Durable first: if the write fails, the state machine is left as it was.
        let bytes = data.len() as u64;
        let written = meta.clone();
        self.persist(meta, move |snapshots| snapshots.write(&written, &data)).await?;
        self.stats.installed.fetch_add(1, Ordering::Relaxed);
        self.stats.last_bytes.store(bytes, Ordering::Relaxed);
        *self.write_state().map_err(|e| state_error(ErrorVerb::Write, &e))? = restored;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let snapshots = Arc::clone(&self.snapshots);
        let read = tokio::task::spawn_blocking(move || snapshots.read())
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let stored = read.map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(stored.map(|StoredSnapshot { meta, data }| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    /// Writes the state as it is now to disk and returns the snapshot's metadata, with no data:
    /// openraft 0.9 keeps only the metadata of a snapshot it asked for (`sm::worker`), and
    /// reads the file through `get_current_snapshot` when a follower needs it. The state is
    /// encoded straight into the file, so the server never holds it encoded in memory.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let started = std::time::Instant::now();
        // The state's maps are persistent: the copy takes a moment under the read lock, and apply
        // goes on while it is encoded, off the async runtime's threads.
        let applied = self.read_state().map_err(|e| state_error(ErrorVerb::Read, &e))?.clone();
        let built = self.stats.built.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshot_id = match applied.last_applied {
            Some(id) => format!("{}-{}-{built}", id.leader_id.term, id.index),
            None => format!("none-{built}"),
        };
        let meta = Meta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id,
        };
        let written = meta.clone();
        let bytes = self
            .persist(&meta, move |snapshots| snapshots.write_encoded(&written, &applied))
            .await?;
        if let Some(bytes) = bytes {
            self.stats.record_build(started.elapsed().as_micros() as u64, bytes);
        }
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(Vec::new())) })
    }
}

/// Decodes a snapshot's state-machine bytes and checks they are the state its metadata names.
fn decode_applied(meta: &Meta, data: &[u8]) -> Result<Applied, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        what: format!("snapshot {}", meta.snapshot_id),
        detail,
    };
    let applied = Applied::decode(data).map_err(|e| corrupt(e.to_string()))?;
    if applied.last_applied != meta.last_log_id || applied.membership != meta.last_membership {
        return Err(corrupt(format!(
            "its metadata says last log {:?} and membership {}, its data holds {:?} and {}",
            meta.last_log_id, meta.last_membership, applied.last_applied, applied.membership
        )));
    }
    Ok(applied)
}

/// A state machine that broke an invariant is corrupt: every later entry would be applied to
/// wrong state and answered wrongly, so the process stops here, loudly, instead of limping on.
/// An abort, not a panic: openraft runs `apply` on a task whose panic would not end the process.
fn crash(error: &StoreError) -> ! {
    tracing::error!(%error, "stopping: the applied state is corrupt");
    eprintln!("fatal: {error}");
    std::process::abort()
}

fn state_error(verb: ErrorVerb, error: &StoreError) -> StorageError<u64> {
    StorageIOError::new(ErrorSubject::StateMachine, verb, error).into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use colony_core::{Command, InvariantViolation, ModelVersion, Proposal, TaskId};
    use openraft::CommittedLeaderId;

    /// Set in the child process of `enabled_check_crashes_apply_on_a_corrupted_state`.
    const CHILD: &str = "COLONY_STORE_CRASH_CHILD";

    /// A state machine whose current model is not in the registry, built from bytes because
    /// nothing in colony-core's API can corrupt state. A new state machine encodes as
    /// `..., models: 0 entries, current_model: None, next_model_version: 1, acl_bootstrapped:
    /// false, acl_tokens: 0 entries, acl_by_secret: 0 entries, finished_removed_through: 0,
    /// by_state: 0 entries, state_counts: 9 zeros, then the workflows', messaging's and agents'
    /// fields`; this makes
    /// `current_model` `Some(5)`.
    fn corrupted() -> StateMachine {
        let config = bincode::config::standard();
        let mut bytes = bincode::serde::encode_to_vec(StateMachine::new(), config).unwrap();
        // After the ACL state: the workflow limits, no workflows, next workflow id 1, no step
        // links, no outputs; no topics; no agents.
        let workflows = [
            bincode::serde::encode_to_vec(colony_core::WorkflowLimits::default(), config).unwrap(),
            vec![0x00, 0x01, 0x00, 0x00],
            bincode::serde::encode_to_vec(colony_core::Messaging::default(), config).unwrap(),
            bincode::serde::encode_to_vec(colony_core::agent::Agents::default(), config).unwrap(),
        ]
        .concat();
        let after_acl = [[0x00; 11].as_slice(), &workflows].concat();
        let tail = [&[0x00, 0x00, 0x01, 0x00, 0x00, 0x00][..], &after_acl].concat();
        assert_eq!(
            bytes[bytes.len() - tail.len()..],
            tail[..],
            "the state machine's encoding moved; update this test"
        );
        bytes.truncate(bytes.len() - tail.len() + 1);
        bytes.extend_from_slice(&[0x01, 0x05, 0x01, 0x00, 0x00, 0x00]);
        bytes.extend_from_slice(&after_acl);
        bincode::serde::decode_from_slice(&bytes, config).unwrap().0
    }

    fn store(dir: &Path, check_invariants: bool) -> StateMachineStore {
        let store = StateMachineStore::open(dir, &StoreOptions { check_invariants }).unwrap();
        store.shared().write().unwrap().machine = corrupted();
        store
    }

    /// A proposal that changes nothing but the clock, so only the corruption can fail the check.
    fn entry() -> Entry<TypeConfig> {
        let proposal = Proposal {
            now_unix_ms: 1_000,
            commands: vec![Command::CancelTask { id: TaskId(9), reason: String::new() }],
        };
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(proposal),
        }
    }

    #[test]
    fn enabled_check_catches_a_corrupted_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), true);
        let machine = store.shared().read().unwrap().machine.clone();
        let log_id = entry().log_id;
        match store.checked(&machine, log_id) {
            Err(StoreError::InvariantViolated { log_id: at, violation }) => {
                assert_eq!(at, log_id);
                assert_eq!(
                    *violation,
                    InvariantViolation::CurrentModelMissing { version: ModelVersion(5) }
                );
            }
            other => panic!("expected an invariant violation, got {other:?}"),
        }
    }

    /// The whole path: applying an entry to a corrupted state with the check on ends the process
    /// (run in a child process, which must die by abort with the violation on stderr).
    #[tokio::test]
    async fn enabled_check_crashes_apply_on_a_corrupted_state() {
        if std::env::var_os(CHILD).is_some() {
            let dir = tempfile::tempdir().unwrap();
            let mut store = store(dir.path(), true);
            let _ = store.apply([entry()]).await;
            return;
        }
        let name = "state_machine_store::tests::enabled_check_crashes_apply_on_a_corrupted_state";
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads", "1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "apply went on after a violation; stderr: {stderr}");
        assert!(
            stderr.contains("fatal: state machine invariant broken after applying log entry"),
            "{stderr}"
        );
        assert!(stderr.contains("current model 5 is not in the registry"), "{stderr}");
    }

    /// Release builds check only when asked: the ordinary apply path never walks the whole state.
    #[cfg(not(debug_assertions))]
    #[tokio::test]
    async fn default_release_apply_does_not_check() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store(dir.path(), false);
        let responses = store.apply([entry()]).await.unwrap();
        assert_eq!(responses.len(), 1);
        assert_eq!(store.shared().read().unwrap().machine.now_unix_ms(), 1_000);
    }
}
