//! openraft's own storage test suite, run against the RocksDB log store and the state machine.

#![allow(clippy::unwrap_used)] // A test that cannot set up or whose check fails should panic.

use colony_store::{LogStore, StateMachineStore, StoreOptions, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{StorageError, StorageIOError};
use tempfile::TempDir;

/// The suite's stores check the state machine's invariants after each entry they apply.
const CHECKED: StoreOptions = StoreOptions { check_invariants: true };

/// Builds a fresh store in its own temporary directory; the directory is the guard.
struct TempStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for TempStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let (log, sm) =
            colony_store::open(dir.path(), &CHECKED).map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(TempStoreBuilder).unwrap();
}
