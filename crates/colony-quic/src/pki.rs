//! The cluster CA: generating and loading it, issuing server leaves, signing executor CSRs.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::OsRng;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// The server name every server certificate carries and every executor and client asks for.
pub const SERVER_NAME: &str = "colony-server";
/// The name servers ask for when they dial each other for Raft: a connection that names it must
/// present a server certificate, or the handshake fails.
pub const RAFT_SERVER_NAME: &str = "colony-raft";

/// SHA-256 of a certificate's DER encoding.
pub type Fingerprint = [u8; 32];

/// The CA outlives every leaf it signs; rotating it means re-joining every executor.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Certificates start a little in the past so a peer whose clock lags ours still accepts them.
const CLOCK_SKEW_ALLOWED: Duration = Duration::from_secs(60 * 60);
/// Random serials of this many bytes make collisions between certificates negligible.
const SERIAL_BYTES: usize = 16;

/// Errors from creating, loading or using certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot generate {what}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot parse {what}")]
    Parse {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what} holds no certificate")]
    NoCertificate { what: &'static str },
    #[error("the CSR's key is not ECDSA P-256")]
    CsrKeyAlgorithm,
    #[error("cannot sign the certificate for {what}")]
    Sign {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("the system clock is before 1970")]
    Clock,
    #[error("TLS rejected the configuration")]
    Tls(#[from] rustls::Error),
    #[error("cannot build the certificate verifier")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
    #[error("QUIC cannot use this TLS configuration")]
    QuicCrypto(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster's certificate authority. Its key signs the servers' QUIC certificates and the
/// executors' client certificates; its certificate is the only root either side trusts.
#[derive(Clone)]
pub struct ClusterCa {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    key: Arc<KeyPair>,
}

impl ClusterCa {
    /// A fresh self-signed CA for `cluster_id`, allowed to sign leaves but no intermediates.
    pub fn generate(cluster_id: &str) -> Result<ClusterCa, PkiError> {
        let key = new_key("the CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(&format!("colony cluster CA {cluster_id}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY)?;
        params.serial_number = Some(random_serial());
        let cert =
            params.self_signed(&key).map_err(|source| PkiError::Sign { what: "the CA", source })?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key: Arc::new(key),
        })
    }

    /// Loads a CA saved with [`ClusterCa::cert_pem`] and [`ClusterCa::key_pem`], refusing a key
    /// that does not belong to the certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, PkiError> {
        let cert_der = first_cert(cert_pem, "the CA certificate PEM")?;
        let key = KeyPair::from_pem(key_pem).map_err(|source| PkiError::Parse {
            what: "the CA key PEM",
            source: Box::new(source),
        })?;
        // Parsing the issuer now surfaces a malformed CA here rather than at the first signing.
        Issuer::from_ca_cert_der(&cert_der, &key).map_err(|source| PkiError::Parse {
            what: "the CA certificate",
            source: Box::new(source),
        })?;
        let key_der = private_key(key_pem, "the CA key PEM")?;
        rustls::sign::CertifiedKey::from_der(
            vec![cert_der.clone()],
            key_der,
            &rustls::crypto::ring::default_provider(),
        )?;
        Ok(ClusterCa {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            cert_der,
            key: Arc::new(key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub(crate) fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint_der(&self.cert_der)
    }

    /// A leaf for a server's QUIC endpoint: SAN DNS [`SERVER_NAME`], 1-year validity; a fresh key.
    pub fn issue_server_cert(&self) -> Result<CertifiedKey, PkiError> {
        let key = new_key("a server key")?;
        let mut params = leaf_params(SERVER_NAME, ExtendedKeyUsagePurpose::ServerAuth)?;
        params.subject_alt_names = vec![dns_name(SERVER_NAME)?];
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(|source| PkiError::Sign { what: "a server", source })?;
        Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Signs an executor's CSR (PEM): subject CN `executor-<id>`, SAN DNS `executor-<id>.colony`,
    /// client-auth EKU, 1-year validity. See [`ClusterCa::sign_csr`].
    pub fn sign_executor_csr(&self, csr_pem: &str, executor_id: u64) -> Result<String, PkiError> {
        self.sign_csr(csr_pem, CertRole::Executor(executor_id), &[])
    }

    /// Signs a CSR (PEM) for `role`. The CSR's own subject, SANs and extensions are ignored: the
    /// holder chooses nothing but its key; the CA names it (`server-<id>`, `executor-<id>`,
    /// `learner-<id>`), which is what [`cert_role`] reads back. A server certificate also names
    /// [`SERVER_NAME`], [`RAFT_SERVER_NAME`] and `hosts` (the host of its address, an IP or a DNS
    /// name), and serves as a client certificate towards other servers.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        role: CertRole,
        hosts: &[String],
    ) -> Result<String, PkiError> {
        // from_pem also checks the CSR's self-signature, so the requester holds the key.
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|source| PkiError::Parse { what: "the CSR", source: Box::new(source) })?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(PkiError::CsrKeyAlgorithm);
        }
        let params = role_params(role, hosts)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer()?)
            .map_err(|source| PkiError::Sign { what: role.kind(), source })?;
        Ok(cert.pem())
    }

    /// A certificate for `role` with a fresh key made here: the bootstrap server's own.
    pub fn issue(&self, role: CertRole, hosts: &[String]) -> Result<CertifiedKey, PkiError> {
        let key = new_key("a key")?;
        let cert = role_params(role, hosts)?
            .signed_by(&key, &self.issuer()?)
            .map_err(|source| PkiError::Sign { what: role.kind(), source })?;
        Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, PkiError> {
        Issuer::from_ca_cert_der(&self.cert_der, self.key.as_ref()).map_err(|source| {
            PkiError::Parse { what: "the CA certificate", source: Box::new(source) }
        })
    }
}

/// A fresh key and a CSR for it, both PEM: `(key_pem, csr_pem)`.
pub fn new_key_and_csr() -> Result<(String, String), PkiError> {
    let key = new_key("a key")?;
    let mut params = CertificateParams::default();
    // The CA ignores the subject; this one only makes the CSR readable in `openssl req -text`.
    params.distinguished_name = common_name("colony member");
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|source| PkiError::Generate { what: "a CSR", source })?;
    Ok((key.serialize_pem(), csr))
}

/// What a certificate the cluster CA signed says its holder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CertRole {
    Server(u64),
    Executor(u64),
    Learner(u64),
}

impl CertRole {
    pub fn kind(self) -> &'static str {
        match self {
            CertRole::Server(_) => "server",
            CertRole::Executor(_) => "executor",
            CertRole::Learner(_) => "learner",
        }
    }

    pub fn id(self) -> u64 {
        match self {
            CertRole::Server(id) | CertRole::Executor(id) | CertRole::Learner(id) => id,
        }
    }

    fn common_name(self) -> String {
        format!("{}-{}", self.kind(), self.id())
    }
}

impl std::fmt::Display for CertRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.common_name())
    }
}

/// A holder's name as the CA writes it (`server-3`), which [`CertRole`]'s `Display` writes.
impl std::str::FromStr for CertRole {
    type Err = ();

    fn from_str(name: &str) -> Result<CertRole, ()> {
        let (kind, id) = name.rsplit_once('-').ok_or(())?;
        let id: u64 = id.parse().map_err(|_| ())?;
        match kind {
            "server" => Ok(CertRole::Server(id)),
            "executor" => Ok(CertRole::Executor(id)),
            "learner" => Ok(CertRole::Learner(id)),
            _ => Err(()),
        }
    }
}

/// The role a certificate's subject CN names (`server-3`), or `None` for any other subject. Only
/// meaningful for a certificate already verified against the cluster CA, which names every
/// holder itself.
pub fn cert_role(der: &[u8]) -> Option<CertRole> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let role = cert.subject().iter_common_name().next()?.as_str().ok()?.parse().ok();
    role
}

/// The fingerprint of the first certificate in `cert_pem`.
pub fn cert_fingerprint(cert_pem: &str) -> Result<Fingerprint, PkiError> {
    Ok(fingerprint_der(&first_cert(cert_pem, "a certificate PEM")?))
}

pub fn fingerprint_der(der: &[u8]) -> Fingerprint {
    Sha256::digest(der).into()
}

/// Every certificate in `pem`, in order; at least one.
pub(crate) fn certs(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PkiError::Parse { what, source: Box::new(source) })?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate { what });
    }
    Ok(certs)
}

fn first_cert(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, PkiError> {
    certs(pem, what)?.into_iter().next().ok_or(PkiError::NoCertificate { what })
}

pub(crate) fn private_key(
    pem: &str,
    what: &'static str,
) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|source| PkiError::Parse { what, source: Box::new(source) })
}

fn new_key(what: &'static str) -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|source| PkiError::Generate { what, source })
}

fn leaf_params(
    common: &str,
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(common);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    set_validity(&mut params, LEAF_VALIDITY)?;
    Ok(params)
}

fn role_params(role: CertRole, hosts: &[String]) -> Result<CertificateParams, PkiError> {
    let name = role.common_name();
    let mut params = match role {
        CertRole::Server(_) => {
            let mut params = leaf_params(&name, ExtendedKeyUsagePurpose::ServerAuth)?;
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
            params
        }
        CertRole::Executor(_) | CertRole::Learner(_) => {
            leaf_params(&name, ExtendedKeyUsagePurpose::ClientAuth)?
        }
    };
    params.subject_alt_names = match role {
        CertRole::Server(_) => {
            let mut names = vec![dns_name(SERVER_NAME)?, dns_name(RAFT_SERVER_NAME)?];
            for host in hosts {
                names.push(match host.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => dns_name(host)?,
                });
            }
            names
        }
        CertRole::Executor(_) | CertRole::Learner(_) => {
            vec![dns_name(&format!("{name}.colony"))?]
        }
    };
    Ok(params)
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

fn dns_name(name: &str) -> Result<SanType, PkiError> {
    let name = name
        .to_owned()
        .try_into()
        .map_err(|source| PkiError::Generate { what: "a DNS name", source })?;
    Ok(SanType::DnsName(name))
}

/// Sets validity from now (less the allowed skew) for `validity`. rcgen takes `time` types but
/// does not re-export the crate, so "now" is the Unix epoch plus the system clock's offset.
fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), PkiError> {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|_| PkiError::Clock)?;
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - CLOCK_SKEW_ALLOWED;
    params.not_after = now + validity;
    Ok(())
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; SERIAL_BYTES];
    OsRng.fill_bytes(&mut bytes);
    // A DER INTEGER serial must be positive, and a non-zero top byte keeps its length fixed.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_executor_csr_rejects_garbage() -> anyhow::Result<()> {
        let ca = ClusterCa::generate("test")?;
        for garbage in [
            "",
            "not a pem",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            let result = ca.sign_executor_csr(garbage, 1);
            anyhow::ensure!(
                matches!(result, Err(PkiError::Parse { .. })),
                "{garbage:?} gave {result:?}"
            );
            let result = ca.sign_csr(garbage, CertRole::Server(1), &[]);
            anyhow::ensure!(
                matches!(result, Err(PkiError::Parse { .. })),
                "{garbage:?} gave {result:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn ca_round_trips_through_pem_and_refuses_a_foreign_key() -> anyhow::Result<()> {
        let ca = ClusterCa::generate("test")?;
        let loaded = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem())?;
        anyhow::ensure!(loaded.fingerprint() == ca.fingerprint());
        anyhow::ensure!(cert_fingerprint(ca.cert_pem())? == ca.fingerprint());
        let other = ClusterCa::generate("other")?;
        anyhow::ensure!(ClusterCa::from_pem(ca.cert_pem(), other.key_pem()).is_err());
        Ok(())
    }

    #[test]
    fn the_ca_names_each_role_and_cert_role_reads_it_back() -> anyhow::Result<()> {
        let ca = ClusterCa::generate("test")?;
        let (_, csr) = new_key_and_csr()?;
        let hosts = ["127.0.0.1".to_owned(), "colony-1.example".to_owned()];
        for role in [CertRole::Server(3), CertRole::Executor(7), CertRole::Learner(1)] {
            let signed = ca.sign_csr(&csr, role, &hosts)?;
            let der = first_cert(&signed, "signed")?;
            anyhow::ensure!(cert_role(&der) == Some(role), "{role}");
            let issued = ca.issue(role, &hosts)?;
            anyhow::ensure!(cert_role(&first_cert(&issued.cert_pem, "issued")?) == Some(role));
        }
        // The CA's own certificate and the QUIC server leaf name no role.
        anyhow::ensure!(cert_role(ca.cert_der()).is_none());
        let quic = ca.issue_server_cert()?;
        anyhow::ensure!(cert_role(&first_cert(&quic.cert_pem, "quic")?).is_none());
        anyhow::ensure!(cert_role(b"not a certificate").is_none());
        Ok(())
    }
}
