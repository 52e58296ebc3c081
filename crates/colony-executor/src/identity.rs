//! An executor's identity on disk (`DATA_DIR/identity.json`): its id, private key, certificate
//! and the cluster CA. Written atomically (temp file, fsync, rename, fsync the directory) and
//! readable only by its owner; the key never reaches a log.

use colony_core::ExecutorId;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "identity.json";
const FORMAT_VERSION: u32 = 1;
/// Owner read and write only: the file holds a private key.
const FILE_MODE: u32 = 0o600;

/// What an admitted executor proves itself with.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub executor_id: ExecutorId,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

/// Written by hand so the private key never reaches a log.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("executor_id", &self.executor_id)
            .field("key_pem", &"<redacted>")
            .field("cert_pem", &self.cert_pem)
            .field("ca_pem", &self.ca_pem)
            .finish()
    }
}

/// The file's layout; `format_version` lets a later build read what this one wrote.
#[derive(Serialize, Deserialize)]
struct IdentityFile {
    format_version: u32,
    executor_id: ExecutorId,
    key_pem: String,
    cert_pem: String,
    ca_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Colony executor identity: {detail}")]
    Malformed { path: PathBuf, detail: String },
    #[error("{path} has format version {found}; this build reads version {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

/// Reads the identity in `data_dir`, or `None` when the directory holds none yet.
pub(crate) fn load(data_dir: &Path) -> Result<Option<Credentials>, IdentityError> {
    let path = data_dir.join(FILE_NAME);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(IdentityError::Io { path, source }),
    };
    // Only the error's kind and position: serde's own message may quote a value, and one value
    // here is the private key.
    let file: IdentityFile =
        serde_json::from_slice(&bytes).map_err(|e| IdentityError::Malformed {
            path: path.clone(),
            detail: format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column()),
        })?;
    if file.format_version != FORMAT_VERSION {
        return Err(IdentityError::Version { path, found: file.format_version });
    }
    Ok(Some(Credentials {
        executor_id: file.executor_id,
        key_pem: file.key_pem,
        cert_pem: file.cert_pem,
        ca_pem: file.ca_pem,
    }))
}

/// Writes the identity durably into `data_dir`.
pub(crate) fn store(data_dir: &Path, creds: &Credentials) -> Result<(), IdentityError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| IdentityError::Io { path, source }
    };
    fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let file = IdentityFile {
        format_version: FORMAT_VERSION,
        executor_id: creds.executor_id,
        key_pem: creds.key_pem.clone(),
        cert_pem: creds.cert_pem.clone(),
        ca_pem: creds.ca_pem.clone(),
    };
    let tmp = data_dir.join(format!("{FILE_NAME}.tmp"));
    let bytes = serde_json::to_vec_pretty(&file)
        .map_err(|e| IdentityError::Malformed { path: tmp.clone(), detail: e.to_string() })?;
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(&tmp)
        .map_err(io(&tmp))?;
    out.write_all(&bytes).map_err(io(&tmp))?;
    out.sync_all().map_err(io(&tmp))?;
    let path = data_dir.join(FILE_NAME);
    fs::rename(&tmp, &path).map_err(io(&path))?;
    File::open(data_dir).and_then(|dir| dir.sync_all()).map_err(io(data_dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn creds() -> Credentials {
        Credentials {
            executor_id: ExecutorId(12),
            key_pem: "-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n".into(),
            cert_pem: "cert".into(),
            ca_pem: "ca".into(),
        }
    }

    #[test]
    fn identity_round_trips() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(load(dir.path()).expect("load"), None);
        store(dir.path(), &creds()).expect("store");
        assert_eq!(load(dir.path()).expect("load"), Some(creds()));
        let mode = fs::metadata(dir.path().join(FILE_NAME)).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, FILE_MODE);
        assert!(!dir.path().join(format!("{FILE_NAME}.tmp")).exists());
        assert!(!format!("{:?}", creds()).contains("secret"));
    }

    #[test]
    fn version_1_files_stay_readable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let frozen = r#"{"format_version":1,"executor_id":12,"key_pem":"-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n","cert_pem":"cert","ca_pem":"ca"}"#;
        fs::write(dir.path().join(FILE_NAME), frozen).expect("write");
        assert_eq!(load(dir.path()).expect("load"), Some(creds()));
    }

    #[test]
    fn bad_files_are_errors_not_absence() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::write(dir.path().join(FILE_NAME), "{").expect("write");
        assert!(matches!(load(dir.path()), Err(IdentityError::Malformed { .. })));
        fs::write(
            dir.path().join(FILE_NAME),
            r#"{"format_version":9,"executor_id":1,"key_pem":"","cert_pem":"","ca_pem":""}"#,
        )
        .expect("write");
        assert!(matches!(load(dir.path()), Err(IdentityError::Version { found: 9, .. })));
    }
}
