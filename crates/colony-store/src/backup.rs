//! Backup files: a consistent snapshot of the applied state that an operator keeps, inspects and
//! restores into a new cluster (`colony cluster snapshot save|inspect`, `colony server --restore`,
//! the leader's scheduled backups).
//!
//! A file is `COLONYBK`, the header's length (u32 LE), the header (a codec frame of
//! [`BackupHeader`]) and the state (a codec frame of [`Applied`]). The header names the cluster,
//! the server that wrote it, the log position, the time, and the state's length and SHA-256, so
//! a truncated or altered file is refused before the state is decoded; each frame also carries
//! its format version and a CRC.

use crate::codec::{self, CodecError};
use crate::Applied;
use openraft::LogId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

pub const MAGIC: &[u8; 8] = b"COLONYBK";
/// A header is a few hundred bytes; a length past this is not a header.
const HEADER_BYTES_MAX: usize = 64 << 10;
/// A backup is at most this big (the state's own decode limit); a bigger file is not read.
pub const BACKUP_BYTES_MAX: u64 = 16 << 30;

/// What a backup says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    pub cluster_id: String,
    /// The server (the leader) that wrote it.
    pub node_id: u64,
    pub created_unix_ms: u64,
    /// The last log entry the state includes.
    pub last_applied: Option<LogId<u64>>,
    pub state_bytes: u64,
    pub state_sha256: [u8; 32],
}

/// A backup file, decoded and verified.
#[derive(Debug)]
pub struct Backup {
    pub header: BackupHeader,
    /// The format version the state was written in.
    pub format_version: u8,
    pub applied: Applied,
    /// The whole file's size.
    pub file_bytes: u64,
}

/// Why a file is not a backup this build can restore. Each says what is wrong in a line.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a Colony snapshot file (it does not start with {:?})", std::str::from_utf8(MAGIC).unwrap_or_default())]
    NotABackup,
    #[error(
        "truncated: the file ends after {found} bytes; a whole backup has at least {expected}"
    )]
    Truncated { found: u64, expected: u64 },
    #[error("corrupted: {0}")]
    Corrupted(String),
    #[error("the snapshot's header cannot be read: {0}")]
    Header(CodecError),
    #[error("the snapshot's state cannot be read: {0}")]
    State(CodecError),
    #[error("the snapshot is of cluster {found}, not {expected}")]
    OtherCluster { found: String, expected: String },
    #[error("cannot encode the snapshot: {0}")]
    Encode(CodecError),
    #[error("cannot read it: {0}")]
    Io(#[from] std::io::Error),
    #[error("it is {0} bytes, more than any backup ({BACKUP_BYTES_MAX})")]
    TooLarge(u64),
}

/// A backup of `applied` as the server `node_id` of `cluster_id` holds it at `now_unix_ms`.
pub fn encode(
    applied: &Applied,
    cluster_id: &str,
    node_id: u64,
    now_unix_ms: u64,
) -> Result<Vec<u8>, BackupError> {
    let state = codec::encode(applied).map_err(BackupError::Encode)?;
    let header = BackupHeader {
        cluster_id: cluster_id.to_owned(),
        node_id,
        created_unix_ms: now_unix_ms,
        last_applied: applied.last_applied,
        state_bytes: state.len() as u64,
        state_sha256: Sha256::digest(&state).into(),
    };
    let header = codec::encode(&header).map_err(BackupError::Encode)?;
    let mut file = Vec::with_capacity(MAGIC.len() + 4 + header.len() + state.len());
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&(header.len() as u32).to_le_bytes());
    file.extend_from_slice(&header);
    file.extend_from_slice(&state);
    Ok(file)
}

/// Reads and verifies a backup: magic, header, length, checksum, then the state.
pub fn decode(file: &[u8]) -> Result<Backup, BackupError> {
    let rest = file.strip_prefix(MAGIC.as_slice()).ok_or(BackupError::NotABackup)?;
    let (length, rest) = rest.split_at_checked(4).ok_or(BackupError::Truncated {
        found: file.len() as u64,
        expected: (MAGIC.len() + 4) as u64,
    })?;
    let header_len = u32::from_le_bytes([length[0], length[1], length[2], length[3]]) as usize;
    if header_len > HEADER_BYTES_MAX {
        return Err(BackupError::Corrupted(format!("a header of {header_len} bytes")));
    }
    let (header, state) = rest.split_at_checked(header_len).ok_or(BackupError::Truncated {
        found: file.len() as u64,
        expected: (MAGIC.len() + 4 + header_len) as u64,
    })?;
    let header: BackupHeader = codec::decode(header).map_err(BackupError::Header)?;
    if state.len() as u64 != header.state_bytes {
        let head = (MAGIC.len() + 4 + header_len) as u64;
        return Err(BackupError::Truncated {
            found: file.len() as u64,
            expected: head + header.state_bytes,
        });
    }
    if <[u8; 32]>::from(Sha256::digest(state)) != header.state_sha256 {
        return Err(BackupError::Corrupted("the state's SHA-256 does not match the header".into()));
    }
    let (format_version, _) = codec::decode_versioned(state).map_err(BackupError::State)?;
    let applied = Applied::decode(state).map_err(BackupError::State)?;
    Ok(Backup { header, format_version, applied, file_bytes: file.len() as u64 })
}

/// Reads a backup file (never one past [`BACKUP_BYTES_MAX`]), verifies it, and refuses one of
/// another cluster than `expect_cluster_id` when one is expected.
pub fn read_file(path: &Path, expect_cluster_id: Option<&str>) -> Result<Backup, BackupError> {
    let bytes = fs::metadata(path)?.len();
    if bytes > BACKUP_BYTES_MAX {
        return Err(BackupError::TooLarge(bytes));
    }
    let backup = decode(&fs::read(path)?)?;
    backup.check_cluster(expect_cluster_id)?;
    Ok(backup)
}

impl Backup {
    /// Refuses a backup of another cluster than `expected`, when one is expected.
    pub fn check_cluster(&self, expected: Option<&str>) -> Result<(), BackupError> {
        match expected {
            Some(expected) if expected != self.header.cluster_id => {
                Err(BackupError::OtherCluster {
                    found: self.header.cluster_id.clone(),
                    expected: expected.to_owned(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// Writes `bytes` to `path` so that after a crash it is either absent or whole: a temporary file
/// beside it, fsynced, renamed over it, and the directory fsynced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = dir.join(format!(".{name}.tmp"));
    {
        let mut file = File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&temporary, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use colony_core::{Command, Proposal, TaskSpec};
    use openraft::CommittedLeaderId;

    fn applied() -> Applied {
        let mut applied = Applied::default();
        let spec = TaskSpec {
            name: "t".to_owned(),
            namespace: "default".to_owned(),
            labels: Default::default(),
            capabilities: Default::default(),
            resources: Default::default(),
            priority: 1,
            deadline_unix_ms: None,
            timeout_ms: None,
            max_retries: 0,
            dependencies: Default::default(),
            run: colony_core::RunSpec::Builtin { handler: "noop".into(), input: String::new() },
            idempotency_key: None,
            placement: Default::default(),
            memory_auto: false,
        };
        let proposal = Proposal { now_unix_ms: 5, commands: vec![Command::SubmitTask(spec)] };
        assert!(applied.machine.apply_proposal(&proposal)[0].is_ok());
        applied.last_applied = Some(LogId::new(CommittedLeaderId::new(2, 1), 7));
        applied
    }

    #[test]
    fn a_backup_reads_back_and_every_damage_is_named() {
        let file = encode(&applied(), "c-1", 1, 1_000).unwrap();
        let backup = decode(&file).unwrap();
        assert_eq!(backup.header.cluster_id, "c-1");
        assert_eq!(backup.header.last_applied.map(|l| l.index), Some(7));
        assert_eq!(backup.format_version, codec::FORMAT_VERSION);
        assert_eq!(backup.applied.machine, applied().machine);
        assert!(backup.check_cluster(Some("c-1")).is_ok());
        assert!(matches!(backup.check_cluster(Some("c-2")), Err(BackupError::OtherCluster { .. })));

        let error = |bytes: &[u8]| decode(bytes).unwrap_err().to_string();
        assert!(error(b"hello").starts_with("not a Colony snapshot file"));
        assert!(error(&file[..file.len() - 10]).starts_with("truncated"));
        assert!(error(&file[..10]).starts_with("truncated"));
        let mut flipped = file.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(error(&flipped).starts_with("corrupted"), "{}", error(&flipped));
        // A header from a format this build does not read: the version is named.
        let mut future = file.clone();
        future[MAGIC.len() + 4] = codec::FORMAT_VERSION + 1;
        assert!(error(&future).contains("unknown format version"), "{}", error(&future));
        let mut absurd = file.clone();
        absurd[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(error(&absurd).starts_with("corrupted: a header of"));
    }

    #[test]
    fn files_are_read_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.snap");
        write_atomically(&good, &encode(&applied(), "c-1", 1, 1_000).unwrap()).unwrap();
        assert!(read_file(&good, Some("c-1")).is_ok());
        assert!(matches!(read_file(&good, Some("c-2")), Err(BackupError::OtherCluster { .. })));
        assert!(matches!(read_file(&dir.path().join("absent"), None), Err(BackupError::Io(_))));
        // Sparse: past the bound without writing it; refused before a byte is read.
        let huge = dir.path().join("huge.snap");
        File::create(&huge).unwrap().set_len(BACKUP_BYTES_MAX + 1).unwrap();
        assert!(matches!(read_file(&huge, None), Err(BackupError::TooLarge(_))));
    }

    #[test]
    fn written_atomically_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.snap");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
