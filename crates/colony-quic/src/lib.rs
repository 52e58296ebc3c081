//! QUIC and TLS for the executor link: the cluster CA, join tokens, pinned and mutual TLS configurations, and length-delimited protobuf framing.
//!
//! This is the only crate that knows about quinn, rustls and rcgen. Every TLS configuration is
//! built with the ring provider passed explicitly and TLS 1.3 only, so nothing depends on a
//! process-default crypto provider being installed.

mod close;
mod frame;
mod pki;
mod tls;
mod token;

#[cfg(test)]
mod tests;

pub use close::CloseCode;
pub use frame::{read_frame, write_frame, FrameError, FRAME_BYTES_MAX};
pub use pki::{
    cert_fingerprint, fingerprint_der, new_executor_key, CertifiedKey, ClusterCa, Fingerprint,
    PkiError, SERVER_NAME,
};
pub use tls::{
    client_endpoint, join_client_config, mutual_client_config, peer_cert_fingerprint,
    server_config, ALPN,
};
pub use token::{JoinToken, TokenError};
