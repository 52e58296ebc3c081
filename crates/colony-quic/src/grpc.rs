//! TLS for the gRPC port (TCP): the server's two configurations, chosen by the name a client
//! asks for, and the clients'.
//!
//! One port serves operators, programs, the learner and the other servers. A connection that asks
//! for [`RAFT_SERVER_NAME`] must present a server certificate from the cluster CA, or the
//! handshake fails; any other connection may present a client certificate from the CA (the
//! learner, a server forwarding a request) or none (a caller with a bearer token). Both offer
//! HTTP/2 only (ALPN `h2`), as gRPC clients in other languages insist.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName};
use rustls::{SignatureScheme, SupportedProtocolVersion};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::pki::{cert_role, certs, private_key, CertRole, CertifiedKey, Fingerprint, PkiError};
use crate::tls::{provider, roots_from_pem as roots, PinnedCaVerifier};

/// The only application protocol on the gRPC port.
pub const H2: &[u8] = b"h2";
const VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// A server's two TLS configurations for its gRPC port.
#[derive(Clone)]
pub struct GrpcServerTls {
    /// For callers: a client certificate from the CA is optional.
    pub api: Arc<rustls::ServerConfig>,
    /// For connections that ask for [`RAFT_SERVER_NAME`](crate::RAFT_SERVER_NAME): a server
    /// certificate from the CA is required.
    pub raft: Arc<rustls::ServerConfig>,
}

/// The configurations for a server holding `own` (its certificate and key) under the CA in
/// `ca_pem`. The chain sent is `own` then the CA, so a client that pinned only the CA's
/// fingerprint finds it.
pub fn grpc_server_tls(ca_pem: &str, own: &CertifiedKey) -> Result<GrpcServerTls, PkiError> {
    let provider = provider();
    let roots = Arc::new(roots(ca_pem)?);
    let mut chain = certs(&own.cert_pem, "the server certificate PEM")?;
    chain.extend(certs(ca_pem, "the CA certificate PEM")?);
    let key = private_key(&own.key_pem, "the server key PEM")?;
    let optional = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let servers_only = Arc::new(ServersOnly {
        inner: WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?,
    });
    let build = |verifier: Arc<dyn ClientCertVerifier>| -> Result<_, PkiError> {
        let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(VERSIONS)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        tls.alpn_protocols = vec![H2.to_vec()];
        Ok(Arc::new(tls))
    };
    Ok(GrpcServerTls { api: build(optional)?, raft: build(servers_only)? })
}

/// How a client recognises the cluster.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Only the CA's fingerprint is known (from a token): the server must send the CA.
    Pinned(Fingerprint),
    /// The CA certificate itself (PEM).
    Ca(String),
}

/// A client configuration for the gRPC port: verifies the server against `trust` and presents
/// `identity` when given (a server or the learner; callers with tokens present none).
pub fn grpc_client_tls(
    trust: &Trust,
    identity: Option<&CertifiedKey>,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)?;
    let builder = match trust {
        Trust::Pinned(ca_fingerprint) => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
                ca_fingerprint: *ca_fingerprint,
                provider,
            }))
        }
        Trust::Ca(ca_pem) => builder.with_root_certificates(roots(ca_pem)?),
    };
    let mut tls = match identity {
        Some(identity) => builder.with_client_auth_cert(
            certs(&identity.cert_pem, "the client certificate PEM")?,
            private_key(&identity.key_pem, "the client key PEM")?,
        )?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![H2.to_vec()];
    Ok(Arc::new(tls))
}

/// The role the leaf of a verified peer chain names.
pub fn peer_role(chain: &[CertificateDer<'_>]) -> Option<CertRole> {
    chain.first().and_then(|leaf| cert_role(leaf))
}

/// Client verification that accepts only a server certificate from the cluster CA.
#[derive(Debug)]
struct ServersOnly {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ServersOnly {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match cert_role(end_entity) {
            Some(CertRole::Server(_)) => Ok(verified),
            _ => Err(CertificateError::ApplicationVerificationFailure.into()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
