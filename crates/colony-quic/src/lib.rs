//! The cluster's PKI and transport security: the CA and the certificates it signs for each role,
//! tokens, TLS for the gRPC port and the executor link (QUIC), and length-delimited protobuf
//! framing.
//!
//! This is the only crate that makes certificates (rcgen) and builds TLS configurations (rustls);
//! the others only carry them. Every TLS configuration is built with the ring provider passed
//! explicitly and TLS 1.3 only, so nothing depends on a process-default crypto provider.

mod close;
mod frame;
mod grpc;
mod pki;
mod tls;
mod token;

#[cfg(test)]
mod tests;

pub use close::CloseCode;
pub use frame::{read_frame, write_frame, FrameError, FRAME_BYTES_MAX};
pub use grpc::{grpc_client_tls, grpc_server_tls, peer_role, GrpcServerTls, Trust, H2};
pub use pki::{
    cert_fingerprint, cert_role, fingerprint_der, new_key_and_csr, CertRole, CertifiedKey,
    ClusterCa, Fingerprint, PkiError, RAFT_SERVER_NAME, SERVER_NAME,
};
pub use tls::{
    client_endpoint, join_client_config, mutual_client_config, peer_cert_fingerprint,
    server_config, ALPN,
};
pub use token::{Token, TokenError};
