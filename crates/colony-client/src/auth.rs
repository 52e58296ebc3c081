//! A caller's credentials and the TLS channel that carries them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use colony_quic::{grpc_client_tls, CertifiedKey, Fingerprint, PkiError, Token, Trust};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tonic::codegen::http::{self, HeaderValue};
use tonic::transport::Endpoint;
use tower_service::Service;

/// Why credentials cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid token: {0}")]
    Token(#[from] colony_quic::TokenError),
    #[error("TLS: {0}")]
    Tls(#[from] PkiError),
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

/// How a caller proves who it is and recognises the cluster: TLS settings, the name it asks the
/// server for, and the `authorization` header its calls carry, if any.
#[derive(Clone)]
pub struct Auth {
    tls: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    authorization: Option<HeaderValue>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the header: it holds the secret.
        f.debug_struct("Auth")
            .field("server_name", &self.server_name)
            .field("bearer", &self.authorization.is_some())
            .finish()
    }
}

impl Auth {
    /// An ACL token (`colony1.<CA sha-256>.<secret>`): pins the CA and authenticates every call.
    pub fn token(token: &str) -> Result<Auth, AuthError> {
        let parsed: Token = token.parse()?;
        let mut auth = Auth::pinned(parsed.ca_fingerprint);
        // Indexed by HPACK like any header (sent in full once per connection, then as an index):
        // the connection is TLS to a verified server, and nothing on it is chosen by a third party.
        let header = HeaderValue::from_str(&format!("Bearer {parsed}"))
            .map_err(|_| AuthError::ServerName("token".to_owned()))?;
        auth.authorization = Some(header);
        Ok(auth)
    }

    /// No credentials, the CA known by fingerprint: for `BootstrapAcl` and `Enroll` only.
    pub fn pinned(ca_fingerprint: Fingerprint) -> Auth {
        Auth::anonymous(Trust::Pinned(ca_fingerprint))
            .unwrap_or_else(|_| unreachable!("a pinned configuration has no PEM to parse"))
    }

    /// No credentials, the CA given whole (PEM).
    pub fn anonymous(trust: Trust) -> Result<Auth, AuthError> {
        Ok(Auth {
            tls: grpc_client_tls(&trust, None)?,
            server_name: server_name(colony_quic::SERVER_NAME)?,
            authorization: None,
        })
    }

    /// A certificate from the cluster CA (a server, the learner), asking for `server_name`
    /// (`colony-server`, or `colony-raft` between servers).
    pub fn certificate(
        ca_pem: &str,
        identity: &CertifiedKey,
        server_name_: &str,
    ) -> Result<Auth, AuthError> {
        Ok(Auth {
            tls: grpc_client_tls(&Trust::Ca(ca_pem.to_owned()), Some(identity))?,
            server_name: server_name(server_name_)?,
            authorization: None,
        })
    }

    /// The same credentials, asking the server for `name` (`colony-raft` reaches the Raft side,
    /// which only a server certificate passes).
    pub fn with_server_name(&self, name: &str) -> Result<Auth, AuthError> {
        Ok(Auth { server_name: server_name(name)?, ..self.clone() })
    }

    /// A lazily connected channel over `endpoint` (which names `http://HOST:PORT`).
    pub fn channel(&self, endpoint: Endpoint) -> Channel {
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone());
        let server_name = self.server_name.clone();
        let connector = tower::service_fn(move |uri: http::Uri| {
            let (tls, server_name) = (tls.clone(), server_name.clone());
            async move {
                let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
                let port = uri.port_u16().unwrap_or(80);
                let tcp = match host.parse::<std::net::IpAddr>() {
                    Ok(ip) => tokio::net::TcpStream::connect(SocketAddr::new(ip, port)).await?,
                    Err(_) => tokio::net::TcpStream::connect((host.as_str(), port)).await?,
                };
                tcp.set_nodelay(true)?;
                let stream = tls.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        Channel {
            inner: endpoint.connect_with_connector_lazy(connector),
            authorization: self.authorization.clone(),
        }
    }
}

fn server_name(name: &str) -> Result<ServerName<'static>, AuthError> {
    ServerName::try_from(name.to_owned()).map_err(|_| AuthError::ServerName(name.to_owned()))
}

/// A TLS channel that puts the caller's `authorization` header on every request.
#[derive(Clone)]
pub struct Channel {
    inner: tonic::transport::Channel,
    authorization: Option<HeaderValue>,
}

type Request = http::Request<tonic::body::BoxBody>;

impl Service<Request> for Channel {
    type Response = <tonic::transport::Channel as Service<Request>>::Response;
    type Error = <tonic::transport::Channel as Service<Request>>::Error;
    type Future = <tonic::transport::Channel as Service<Request>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Request>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        if let Some(authorization) = &self.authorization {
            request.headers_mut().insert(http::header::AUTHORIZATION, authorization.clone());
        }
        self.inner.call(request)
    }
}
