//! QUIC endpoint configurations: the server's, the joining executor's (CA pinned by
//! fingerprint) and the joined executor's (mutual TLS).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::pki::{
    certs, fingerprint_der, private_key, CertifiedKey, ClusterCa, Fingerprint, PkiError,
};

/// The application protocol both sides insist on, so a stray QUIC client fails the handshake.
pub const ALPN: &[u8] = b"colony-executor/1";

/// Keep-alives well inside the idle timeout, so a quiet but live link never times out.
const KEEP_ALIVE_MS: u64 = 500;
/// A silent peer is declared gone after this long; the executor link wants fast failure
/// detection more than tolerance of long pauses.
const IDLE_TIMEOUT_MS_MAX: u32 = 2_000;
/// Streams a peer may have open at once; the link needs a handful, never hundreds.
const STREAMS_BIDI_MAX: u32 = 4;
/// Nothing on the link uses unidirectional streams.
const STREAMS_UNI_MAX: u32 = 0;

/// Server side: presents `server` with the CA after it, so a joining executor can find the CA
/// it pinned. Client certificates are optional (a joining executor has none) but one that is
/// presented must chain to the CA.
pub fn server_config(
    ca: &ClusterCa,
    server: &CertifiedKey,
) -> Result<quinn::ServerConfig, PkiError> {
    let provider = provider();
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(ca_roots(ca)?), provider.clone())
            .allow_unauthenticated()
            .build()?;
    let mut chain = certs(&server.cert_pem, "the server certificate PEM")?;
    chain.push(ca.cert_der().clone());
    let key = private_key(&server.key_pem, "the server key PEM")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(transport());
    Ok(config)
}

/// Client side for joining: no client certificate; the server's chain must carry a certificate
/// whose SHA-256 is `ca_fingerprint`, and the leaf must verify against that CA for
/// [`SERVER_NAME`](crate::SERVER_NAME).
pub fn join_client_config(ca_fingerprint: Fingerprint) -> Result<quinn::ClientConfig, PkiError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCaVerifier { ca_fingerprint, provider: provider.clone() });
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    client(tls)
}

/// Client side with mutual TLS: trusts only the CA in `ca_pem` and presents `cert_pem`/`key_pem`.
pub fn mutual_client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<quinn::ClientConfig, PkiError> {
    let roots = roots_from_pem(ca_pem)?;
    let chain = certs(cert_pem, "the executor certificate PEM")?;
    let key = private_key(key_pem, "the executor key PEM")?;
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    client(tls)
}

/// The SHA-256 of the client certificate the peer presented, if any.
pub fn peer_cert_fingerprint(connection: &quinn::Connection) -> Option<Fingerprint> {
    let chain = connection.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().map(|leaf| fingerprint_der(leaf))
}

/// An IPv4 endpoint on an ephemeral port with no default client configuration: every
/// `connect_with` names the configuration it means.
pub fn client_endpoint() -> Result<quinn::Endpoint, std::io::Error> {
    quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
}

/// Verifies a server against a CA known only by fingerprint, for an executor that has nothing
/// else yet. The CA must arrive in the server's chain; once found, verification is ordinary
/// webpki verification with that CA as the only root.
#[derive(Debug)]
pub(crate) struct PinnedCaVerifier {
    pub(crate) ca_fingerprint: Fingerprint,
    pub(crate) provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (pinned, others): (Vec<_>, Vec<_>) =
            intermediates.iter().partition(|cert| fingerprint_der(cert) == self.ca_fingerprint);
        let Some(ca) = pinned.first() else {
            return Err(CertificateError::UnknownIssuer.into());
        };
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(ca.as_ref()).into_owned())?;
        let others: Vec<CertificateDer<'_>> = others.into_iter().cloned().collect();
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|error| rustls::Error::General(error.to_string()))?
            .verify_server_cert(end_entity, &others, server_name, ocsp_response, now)
    }

    // Handshake signatures do not depend on the roots, so these use the same functions
    // WebPkiServerVerifier itself delegates to.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The ring provider, passed to every builder so no process-default provider is needed.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in `ca_pem` as a trust root.
pub(crate) fn roots_from_pem(ca_pem: &str) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca_pem, "the CA certificate PEM")? {
        roots.add(cert)?;
    }
    Ok(roots)
}

pub(crate) fn ca_roots(ca: &ClusterCa) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone())?;
    Ok(roots)
}

fn client(mut tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, PkiError> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(transport());
    Ok(config)
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_millis(KEEP_ALIVE_MS)))
        .max_idle_timeout(Some(quinn::VarInt::from_u32(IDLE_TIMEOUT_MS_MAX).into()))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(STREAMS_BIDI_MAX))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(STREAMS_UNI_MAX));
    Arc::new(transport)
}
