//! A server's identity on disk (`DATA_DIR/node.json`): who it is, where it listens, which cluster
//! it belongs to. Written atomically (temp file, fsync, rename, fsync the directory).

use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "node.json";
const FORMAT_VERSION: u32 = 1;

/// What a restarted server remembers about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format_version: u32,
    pub node_id: u64,
    pub addr: String,
    pub cluster_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a Colony node file: {detail}")]
    Malformed { path: PathBuf, detail: String },
    #[error("{path} has format version {found}; this build reads version {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

impl Identity {
    pub fn new(node_id: u64, addr: String, cluster_id: String) -> Self {
        Identity { format_version: FORMAT_VERSION, node_id, addr, cluster_id }
    }

    /// Reads the identity in `data_dir`, or `None` when the directory holds none yet.
    pub fn load(data_dir: &Path) -> Result<Option<Identity>, IdentityError> {
        let path = data_dir.join(FILE_NAME);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IdentityError::Io { path, source }),
        };
        let identity: Identity = serde_json::from_slice(&bytes)
            .map_err(|e| IdentityError::Malformed { path: path.clone(), detail: e.to_string() })?;
        if identity.format_version != FORMAT_VERSION {
            return Err(IdentityError::Version { path, found: identity.format_version });
        }
        Ok(Some(identity))
    }

    /// Writes the identity durably into `data_dir`.
    pub fn store(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| IdentityError::Io { path, source }
        };
        fs::create_dir_all(data_dir).map_err(io(data_dir))?;
        let tmp = data_dir.join(format!("{FILE_NAME}.tmp"));
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| IdentityError::Malformed { path: tmp.clone(), detail: e.to_string() })?;
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        let path = data_dir.join(FILE_NAME);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(data_dir).and_then(|dir| dir.sync_all()).map_err(io(data_dir))?;
        Ok(())
    }
}
