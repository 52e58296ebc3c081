//! What survives a restart, what corruption looks like, and group commit under concurrent appends.

#![allow(clippy::unwrap_used)] // A test that cannot set up or whose check fails should panic.

use colony_core::{Command, CommandError, Proposal, TaskId};
use colony_store::{LogStore, StateMachineStore, StoreError, StoreOptions, TypeConfig};
use openraft::storage::{
    RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftSnapshotBuilder, RaftStateMachine,
    StorageHelper,
};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, Vote};
use std::collections::BTreeSet;
use std::io::Cursor;
use std::path::Path;

/// Every store here checks the state machine's invariants after each entry it applies.
const CHECKED: StoreOptions = StoreOptions { check_invariants: true };

fn log_id(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(2, 1), index)
}

/// A proposal stamped with time `index` seconds that cancels a task that does not exist: it leaves
/// a trace in the state (the replicated clock) without depending on how task specs encode.
fn proposal(index: u64) -> Proposal {
    Proposal {
        now_unix_ms: index * 1_000,
        commands: vec![Command::CancelTask { id: TaskId(index), reason: "test".to_owned() }],
    }
}

/// Entry 0 makes node 1 the only voter (as `Raft::initialize` does); every later entry is a proposal.
fn entry(index: u64) -> Entry<TypeConfig> {
    let payload = if index == 0 {
        EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1])], None))
    } else {
        EntryPayload::Normal(proposal(index))
    };
    Entry { log_id: log_id(index), payload }
}

fn entries(indexes: std::ops::RangeInclusive<u64>) -> Vec<Entry<TypeConfig>> {
    indexes.map(entry).collect()
}

/// Flips one bit of the value stored under `key` in column family `cf`, as a disk error would.
fn flip_stored_bit(raft_dir: &Path, cf: &str, key: &[u8]) {
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), raft_dir, ["log", "meta"]).unwrap();
    let handle = db.cf_handle(cf).unwrap();
    let mut value = db.get_cf(handle, key).unwrap().unwrap();
    let last = value.len() - 1;
    value[last] ^= 0x10;
    db.put_cf(handle, key, value).unwrap();
}

fn flip_file_bit(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

/// The state machine's replicated clock: the time of the last proposal applied.
fn clock_ms(sm: &StateMachineStore) -> u64 {
    sm.shared().read().unwrap().machine.now_unix_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vote_log_committed_and_snapshot_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let vote = Vote::new_committed(2, 1);
    {
        let (mut log, mut sm) = colony_store::open(dir.path(), &CHECKED).unwrap();
        log.save_vote(&vote).await.unwrap();
        log.blocking_append(entries(0..=10)).await.unwrap();
        log.save_committed(Some(log_id(10))).await.unwrap();
        assert_eq!(log.committed_index(), Some(10));

        let responses = sm.apply(entries(0..=6)).await.unwrap();
        assert_eq!(responses.len(), 7);
        assert_eq!(responses[0].results, vec![]);
        assert_eq!(responses[6].results, vec![Err(CommandError::UnknownTask(TaskId(6)))]);
        let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(6)));
        log.purge(log_id(3)).await.unwrap();
        sm.apply(entries(7..=10)).await.unwrap();
        assert_eq!(clock_ms(&sm), 10_000);
    }

    let (mut log, mut sm) = colony_store::open(dir.path(), &CHECKED).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(10)));
    assert_eq!(log.committed_index(), Some(10));
    let state = log.get_log_state().await.unwrap();
    assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(log_id(3)), Some(log_id(10))));
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries(4..=10));

    // The state machine comes back at its snapshot...
    let (last_applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(last_applied, Some(log_id(6)));
    assert_eq!(membership.log_id(), &Some(log_id(0)));
    assert_eq!(clock_ms(&sm), 6_000);
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, Some(log_id(6)));

    // ...and openraft's start-up re-applies the committed entries after it.
    StorageHelper::new(&mut log, &mut sm).get_initial_state().await.unwrap();
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(10)));
    assert_eq!(clock_ms(&sm), 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bit_in_a_log_entry_is_a_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = colony_store::open(dir.path(), &CHECKED).unwrap();
        log.blocking_append(entries(1..=5)).await.unwrap();
    }
    flip_stored_bit(&dir.path().join("raft"), "log", &3u64.to_be_bytes());

    let (mut log, _sm) = colony_store::open(dir.path(), &CHECKED).unwrap();
    assert_eq!(log.try_get_log_entries(1..3).await.unwrap(), entries(1..=2));
    let error = log.try_get_log_entries(1..=5).await.unwrap_err().to_string();
    assert!(error.contains("checksum mismatch"), "{error}");
    assert!(error.contains("index 3"), "{error}");
    let error = log.try_get_log_entries(3..4).await.unwrap_err().to_string();
    assert!(error.contains("checksum mismatch"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bit_in_the_last_entry_fails_log_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = colony_store::open(dir.path(), &CHECKED).unwrap();
        log.blocking_append(entries(1..=5)).await.unwrap();
    }
    flip_stored_bit(&dir.path().join("raft"), "log", &5u64.to_be_bytes());

    let (mut log, _sm) = colony_store::open(dir.path(), &CHECKED).unwrap();
    let error = log.get_log_state().await.unwrap_err().to_string();
    assert!(error.contains("checksum mismatch") && error.contains("index 5"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bit_in_the_vote_is_a_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = colony_store::open(dir.path(), &CHECKED).unwrap();
        log.save_vote(&Vote::new(7, 1)).await.unwrap();
    }
    flip_stored_bit(&dir.path().join("raft"), "meta", b"vote");

    let (mut log, _sm) = colony_store::open(dir.path(), &CHECKED).unwrap();
    let error = log.read_vote().await.unwrap_err().to_string();
    assert!(error.contains("checksum mismatch") && error.contains("vote"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bit_in_the_committed_id_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = colony_store::open(dir.path(), &CHECKED).unwrap();
        log.save_committed(Some(log_id(4))).await.unwrap();
    }
    flip_stored_bit(&dir.path().join("raft"), "meta", b"committed");

    match LogStore::open(&dir.path().join("raft")) {
        Err(StoreError::Corrupt { what, detail }) => {
            assert!(
                what.contains("committed") && detail.contains("checksum mismatch"),
                "{what}: {detail}"
            )
        }
        Err(other) => panic!("expected corruption, got {other}"),
        Ok(_) => panic!("a corrupt committed id opened"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bit_in_the_snapshot_file_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = colony_store::open(dir.path(), &CHECKED).unwrap();
        sm.apply(entries(1..=3)).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    }
    flip_file_bit(&dir.path().join("snapshots").join("snapshot.bin"));

    match colony_store::open(dir.path(), &CHECKED) {
        Err(StoreError::Corrupt { what, detail }) => {
            assert!(
                what.contains("snapshot.bin") && detail.contains("checksum mismatch"),
                "{what}: {detail}"
            )
        }
        Err(other) => panic!("expected corruption, got {other}"),
        Ok(_) => panic!("a corrupt snapshot opened"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_snapshot_is_not_installed() {
    let leader_dir = tempfile::tempdir().unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let (_leader_log, mut leader) = colony_store::open(leader_dir.path(), &CHECKED).unwrap();
    let (_follower_log, mut follower) = colony_store::open(follower_dir.path(), &CHECKED).unwrap();
    leader.apply(entries(1..=4)).await.unwrap();
    leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let snapshot = leader.get_current_snapshot().await.unwrap().unwrap();

    let mut data = snapshot.snapshot.into_inner();
    let middle = data.len() / 2;
    data[middle] ^= 0x10;
    let error =
        follower.install_snapshot(&snapshot.meta, Box::new(Cursor::new(data))).await.unwrap_err();
    assert!(error.to_string().contains("checksum mismatch"), "{error}");
    assert_eq!(follower.applied_state().await.unwrap().0, None);
    assert!(follower.get_current_snapshot().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_snapshot_replaces_state_and_survives_restart() {
    let leader_dir = tempfile::tempdir().unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let (_leader_log, mut leader) = colony_store::open(leader_dir.path(), &CHECKED).unwrap();
    leader.apply(entries(1..=4)).await.unwrap();
    leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let snapshot = leader.get_current_snapshot().await.unwrap().unwrap();
    {
        let (_follower_log, mut follower) =
            colony_store::open(follower_dir.path(), &CHECKED).unwrap();
        follower.install_snapshot(&snapshot.meta, snapshot.snapshot).await.unwrap();
        assert_eq!(clock_ms(&follower), 4_000);
    }
    let (_follower_log, mut follower) = colony_store::open(follower_dir.path(), &CHECKED).unwrap();
    assert_eq!(follower.applied_state().await.unwrap().0, Some(log_id(4)));
    assert_eq!(clock_ms(&follower), 4_000);
    let current = follower.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snapshot.meta);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_all_complete_and_share_fsyncs() {
    const APPENDS: u64 = 100;
    const ENTRIES_PER_APPEND: u64 = 10;
    let dir = tempfile::tempdir().unwrap();
    let (log, _sm) = colony_store::open(dir.path(), &CHECKED).unwrap();

    let appends: Vec<_> = (0..APPENDS)
        .map(|append| {
            let mut log = log.clone();
            let first = append * ENTRIES_PER_APPEND + 1;
            tokio::spawn(async move {
                log.blocking_append(entries(first..=first + ENTRIES_PER_APPEND - 1)).await
            })
        })
        .collect();
    for append in appends {
        append.await.unwrap().unwrap();
    }

    let syncs = log.wal_sync_count();
    eprintln!("{APPENDS} concurrent appends shared {syncs} fsyncs");
    assert!((1..=APPENDS).contains(&syncs), "{syncs} fsyncs for {APPENDS} appends");
    let stored = log.clone().try_get_log_entries(..).await.unwrap();
    assert_eq!(stored, entries(1..=APPENDS * ENTRIES_PER_APPEND));
}

/// Bytes of the files directly in `dir` (RocksDB keeps no subdirectories).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .filter(|meta| meta.is_file())
        .map(|meta| meta.len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_gives_the_disk_back() {
    const ENTRIES: u64 = 12_000;
    const REASON_BYTES: usize = 4096;
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = colony_store::open(dir.path(), &CHECKED).unwrap();
    let big = |index: u64| Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Proposal {
            now_unix_ms: index,
            commands: vec![Command::CancelTask {
                id: TaskId(index),
                reason: "x".repeat(REASON_BYTES),
            }],
        }),
    };
    for first in (1..=ENTRIES).step_by(500) {
        log.blocking_append((first..first + 500).map(big)).await.unwrap();
    }
    let raft_dir = dir.path().join("raft");
    let written = dir_bytes(&raft_dir);
    assert!(written > 40 << 20, "the log should hold about 48 MiB, holds {written} bytes");

    log.purge(log_id(ENTRIES - 10)).await.unwrap();
    // Bounded wait for the compactor: without it the purged entries stay on disk until RocksDB
    // compacts on its own, which this idle log never does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let now = dir_bytes(&raft_dir);
        if now < written / 4 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "30 s after purging all but 10 entries the log still holds {now} of {written} bytes"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let state = log.get_log_state().await.unwrap();
    assert_eq!(
        (state.last_purged_log_id, state.last_log_id),
        (Some(log_id(ENTRIES - 10)), Some(log_id(ENTRIES)))
    );
    let kept = log.try_get_log_entries(..).await.unwrap();
    assert_eq!(
        kept.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        (ENTRIES - 9..=ENTRIES).collect::<Vec<_>>()
    );
}
