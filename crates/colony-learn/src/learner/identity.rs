//! The learner's certificate: enrolled once with a learner join token, then kept in
//! `DATA_DIR/tls/` (directory 0700, files 0600) and presented on every call (mutual TLS).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use colony_client::{Auth, Client};
use colony_proto::pb;
use colony_quic::{CertifiedKey, Token};

const DIR: &str = "tls";
const CA: &str = "ca.pem";
const CERT: &str = "learner.pem";
const KEY: &str = "learner-key.pem";
/// Between tries to enroll while no server answers.
const ENROLL_RETRY: Duration = Duration::from_secs(2);
const ENROLL_TIMEOUT: Duration = Duration::from_secs(10);

/// The CA and the learner's own certificate and key.
#[derive(Clone)]
pub struct LearnerIdentity {
    pub ca_pem: String,
    pub own: CertifiedKey,
}

impl LearnerIdentity {
    /// Credentials for calls to the servers.
    pub fn auth(&self) -> anyhow::Result<Auth> {
        Ok(Auth::certificate(&self.ca_pem, &self.own, colony_quic::SERVER_NAME)?)
    }
}

/// Whether `data_dir` holds a learner certificate already.
pub fn enrolled(data_dir: &Path) -> bool {
    data_dir.join(DIR).join(CERT).exists()
}

fn load(data_dir: &Path) -> anyhow::Result<Option<LearnerIdentity>> {
    if !enrolled(data_dir) {
        return Ok(None);
    }
    let dir = data_dir.join(DIR);
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .with_context(|| format!("cannot read {}", dir.join(name).display()))
    };
    Ok(Some(LearnerIdentity {
        ca_pem: read(CA)?,
        own: CertifiedKey { cert_pem: read(CERT)?, key_pem: read(KEY)? },
    }))
}

fn store(data_dir: &Path, identity: &LearnerIdentity) -> anyhow::Result<()> {
    let dir = data_dir.join(DIR);
    colony_process::private_dir(&dir)?;
    // The certificate last: its presence is what says the learner is enrolled.
    for (name, text) in
        [(CA, &identity.ca_pem), (KEY, &identity.own.key_pem), (CERT, &identity.own.cert_pem)]
    {
        colony_process::write_private(&dir.join(name), text.as_bytes())?;
    }
    Ok(())
}

/// The learner's identity: from its data directory, or enrolled with `token` (retrying while no
/// server answers; a refusal is an error).
pub async fn obtain(
    servers: &[String],
    token: Option<&str>,
    data_dir: &Path,
) -> anyhow::Result<LearnerIdentity> {
    if let Some(identity) = load(data_dir)? {
        return Ok(identity);
    }
    let Some(token) = token else {
        bail!(
            "{} holds no learner certificate: pass a learner join token (colony cluster token create --kind learner) the first time",
            data_dir.display()
        );
    };
    let parsed: Token = token.parse().context("invalid learner join token")?;
    let (key_pem, csr_pem) = colony_quic::new_key_and_csr()?;
    let client = Client::new(servers, ENROLL_TIMEOUT, &Auth::pinned(parsed.ca_fingerprint))?;
    let request =
        pb::EnrollRequest { token: token.to_owned(), csr_pem, node_id: 0, addr: String::new() };
    loop {
        let answer = client
            .call("enroll the learner", |mut c| {
                let request = request.clone();
                async move { c.enroll(request).await }
            })
            .await;
        match answer {
            Ok(enrolled) => {
                if colony_quic::cert_fingerprint(&enrolled.ca_pem)? != parsed.ca_fingerprint {
                    bail!("the cluster answered with a CA other than the one the token names");
                }
                let identity = LearnerIdentity {
                    ca_pem: enrolled.ca_pem,
                    own: CertifiedKey { cert_pem: enrolled.cert_pem, key_pem },
                };
                store(data_dir, &identity)?;
                tracing::info!("enrolled: the learner holds a certificate from the cluster CA");
                return Ok(identity);
            }
            Err(colony_client::ClientError::Unanswered { last_error, .. }) => {
                tracing::warn!("cannot enroll yet: {last_error}");
                tokio::time::sleep(ENROLL_RETRY).await;
            }
            Err(e) => return Err(e).context("the cluster refused to enroll the learner"),
        }
    }
}
