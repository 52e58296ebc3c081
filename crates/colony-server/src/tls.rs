//! The server's certificate files (`DATA_DIR/tls/`); the acceptor on the gRPC port is
//! `colony_client::serve`'s.

pub use colony_client::serve::{accept, Conn, ConnInfo};
use colony_process::{private_dir, write_private};
use colony_quic::CertifiedKey;
use std::io;
use std::path::Path;

const DIR: &str = "tls";
const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";
const CERT: &str = "server.pem";
const KEY: &str = "server-key.pem";

/// What this server holds: the CA certificate, its own certificate and key, and (on the server
/// that bootstrapped the cluster) the CA key, until the cluster has it.
#[derive(Clone)]
pub struct ServerTls {
    pub ca_pem: String,
    pub own: CertifiedKey,
    pub ca_key_pem: Option<String>,
}

impl ServerTls {
    pub fn load(data_dir: &Path) -> anyhow::Result<Option<ServerTls>> {
        let dir = data_dir.join(DIR);
        let read = |name: &str| -> anyhow::Result<Option<String>> {
            match std::fs::read_to_string(dir.join(name)) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(anyhow::anyhow!("{}: {e}", dir.join(name).display())),
            }
        };
        let (Some(ca_pem), Some(cert_pem), Some(key_pem)) =
            (read(CA_CERT)?, read(CERT)?, read(KEY)?)
        else {
            return Ok(None);
        };
        Ok(Some(ServerTls {
            ca_pem,
            own: CertifiedKey { cert_pem, key_pem },
            ca_key_pem: read(CA_KEY)?,
        }))
    }

    /// Writes the files durably: the directory 0700, keys 0600, each file written to a temporary
    /// name, fsynced and renamed.
    pub fn store(&self, data_dir: &Path) -> anyhow::Result<()> {
        let dir = data_dir.join(DIR);
        private_dir(data_dir)?;
        private_dir(&dir)?;
        write_private(&dir.join(CA_CERT), self.ca_pem.as_bytes())?;
        write_private(&dir.join(CERT), self.own.cert_pem.as_bytes())?;
        write_private(&dir.join(KEY), self.own.key_pem.as_bytes())?;
        if let Some(ca_key) = &self.ca_key_pem {
            write_private(&dir.join(CA_KEY), ca_key.as_bytes())?;
        }
        Ok(())
    }

    /// The CA (with its key) on the server that created it, for the first leader to replicate.
    pub fn local_ca(&self) -> Option<(String, String)> {
        self.ca_key_pem.as_ref().map(|key| (self.ca_pem.clone(), key.clone()))
    }
}
