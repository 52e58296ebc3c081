//! Colony's storage on RocksDB: openraft's log store and state machine (storage-v2 traits).
//!
//! This is the only crate that knows about RocksDB. Everything persisted here is framed as
//! `[format version: u8][crc32 of the body: u32 LE][bincode body]` so corruption is detected and
//! reported, never silently applied; a write is acknowledged to openraft only after it is fsynced.

pub mod backup;
pub mod codec;
pub mod log_store;
pub mod snapshot_file;
pub mod state_machine_store;

use colony_core::{CommandError, InvariantViolation, Outcome, Proposal, StateMachine};
use openraft::{BasicNode, LogId, StoredMembership};
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use std::sync::{Arc, RwLock};

pub use log_store::LogStore;
pub use state_machine_store::{SnapshotStats, StateMachineStore};

openraft::declare_raft_types!(
    /// Colony's openraft type configuration.
    pub TypeConfig:
        D = Proposal,
        R = ProposalResponse,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// What applying one Raft entry returned: a result per command of the proposal, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalResponse {
    pub results: Vec<Result<Outcome, CommandError>>,
}

/// The applied state: what a snapshot holds and what reads are served from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId<u64>>,
    pub membership: StoredMembership<u64, BasicNode>,
    pub machine: StateMachine,
}

/// `Applied` as format 2 stored it (its state machine in the old layout).
#[derive(Deserialize)]
struct AppliedV2 {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    machine: colony_core::StateMachineV2,
}

/// `Applied` as format 3 stored it (before workflows).
#[derive(Deserialize)]
struct AppliedV3 {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    machine: colony_core::StateMachineV3,
}

/// `Applied` as format 4 stored it (before messages).
#[derive(Deserialize)]
struct AppliedV4 {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    machine: colony_core::StateMachineV4,
}

/// `Applied` as format 5 stored it (before discovery).
#[derive(Deserialize)]
struct AppliedV5 {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    machine: colony_core::StateMachineV5,
}

impl Applied {
    /// Decodes a snapshot's state-machine frame of any readable format version.
    pub fn decode(frame: &[u8]) -> Result<Applied, codec::CodecError> {
        match codec::decode_versioned(frame)? {
            (2, body) => {
                let old: AppliedV2 = codec::decode_body(body)?;
                Ok(Applied {
                    last_applied: old.last_applied,
                    membership: old.membership,
                    machine: old.machine.into(),
                })
            }
            (3, body) => {
                let old: AppliedV3 = codec::decode_body(body)?;
                Ok(Applied {
                    last_applied: old.last_applied,
                    membership: old.membership,
                    machine: old.machine.into(),
                })
            }
            (4, body) => {
                let old: AppliedV4 = codec::decode_body(body)?;
                Ok(Applied {
                    last_applied: old.last_applied,
                    membership: old.membership,
                    machine: old.machine.into(),
                })
            }
            (5, body) => {
                let old: AppliedV5 = codec::decode_body(body)?;
                Ok(Applied {
                    last_applied: old.last_applied,
                    membership: old.membership,
                    machine: old.machine.into(),
                })
            }
            (_, body) => codec::decode_body(body),
        }
    }
}

/// The applied state shared between the Raft state machine and the server's read path.
pub type SharedState = Arc<RwLock<Applied>>;

/// A failure to open or read the store that the caller must surface (and, for corruption, stop on).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb at {path}: {source}")]
    Rocks { path: String, source: rocksdb::Error },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("cannot encode {what}: {source}")]
    Encode { what: String, source: codec::CodecError },
    #[error("the applied state's lock was poisoned by a panic while applying")]
    Poisoned,
    #[error("state machine invariant broken after applying log entry {log_id}: {violation}")]
    // Boxed: a violation can carry whole resource sets, and every `Result` of this type pays
    // for its largest variant.
    InvariantViolated { log_id: LogId<u64>, violation: Box<InvariantViolation> },
}

/// How a store runs, beyond where it lives.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// Check every state-machine invariant after each applied proposal, and crash on a
    /// violation. The check walks the whole state, so it is for the chaos suite and tests, not
    /// for production; debug builds check whatever this says.
    pub check_invariants: bool,
}

/// Opens (creating if absent) the store under `dir`: RocksDB in `dir/raft`, snapshots in
/// `dir/snapshots`. The state machine is restored from the latest snapshot; openraft re-applies
/// committed log entries after it on start.
/// Seeds an empty data directory with `applied` as its only snapshot (a restored backup): the
/// server that opens it starts from that state, its log beginning after it.
pub fn seed_snapshot(dir: &std::path::Path, applied: &Applied) -> Result<(), StoreError> {
    let (file, existing) = snapshot_file::SnapshotFile::open(&dir.join("snapshots"))?;
    if existing.is_some() {
        return Err(StoreError::Corrupt {
            what: format!("{}", dir.display()),
            detail: "already holds a snapshot; a restore needs an empty data directory".to_owned(),
        });
    }
    let meta = snapshot_file::Meta {
        last_log_id: applied.last_applied,
        last_membership: applied.membership.clone(),
        snapshot_id: format!("restored-{}", applied.last_applied.map_or(0, |l| l.index)),
    };
    file.write_encoded(&meta, applied)?;
    Ok(())
}

pub fn open(
    dir: &std::path::Path,
    options: &StoreOptions,
) -> Result<(LogStore, StateMachineStore), StoreError> {
    let log = LogStore::open(&dir.join("raft"))?;
    let sm = StateMachineStore::open(&dir.join("snapshots"), options)?;
    Ok((log, sm))
}
