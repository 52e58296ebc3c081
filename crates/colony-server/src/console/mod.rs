//! The web console: a read-only view of the cluster served on the HTTP (`--metrics-listen`) port
//! under `/ui`: the static page (`assets`, no data, no token) and a JSON API under `/ui/api/`
//! (`api`) that the page polls.
//!
//! Every API request is one admin RPC, called in-process on this server's `AdminService` with
//! the request's `authorization: Bearer` header and nothing else: authentication, the permission
//! the RPC names, the namespace filtering of task reads, the deadline and the audit line are the
//! admin API's own (`admin/route.rs`), so the console can never show a token more than
//! `colony` would. Reads that take a consistency are asked for as stale reads: they are answered
//! from this server's applied state without a round trip to the leader, and every answer says
//! which server and which applied index it is as of. The HTTP port is plain HTTP, so the API
//! answers only requests from loopback (an SSH tunnel, `kubectl port-forward`, or a TLS proxy on
//! the same host) and the page sends no token from another address: a token never crosses a
//! network in clear.

mod api;
mod assets;

use crate::admin::AdminService;
use crate::node::Node;
use crate::tls::ConnInfo;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::Serialize;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::metadata::MetadataMap;

/// API requests served at once; more are refused (503) rather than queued.
const REQUESTS_IN_FLIGHT_MAX: usize = 32;
/// The deadline each console read runs under (the admin API's `grpc-timeout`).
const READ_DEADLINE: Duration = Duration::from_secs(5);

/// What the console's handlers share.
#[derive(Clone)]
pub(crate) struct Console {
    node: Arc<Node>,
    admin: Arc<AdminService>,
    in_flight: Arc<Semaphore>,
}

/// The console's routes, for `colony_process::serve_http_with`.
pub fn router(node: Arc<Node>) -> Router {
    let console = Console {
        admin: Arc::new(AdminService::new(node.clone())),
        node,
        in_flight: Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX)),
    };
    assets::routes().nest("/ui/api", api::routes(console))
}

/// An API error: the admin API's status as an HTTP status and a JSON body
/// `{"error": MESSAGE, "code": CODE}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    code: &'a str,
}

impl ApiError {
    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_argument",
            message: message.into(),
        }
    }

    fn not_found() -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: "no such console endpoint".to_owned(),
        }
    }

    fn not_loopback() -> ApiError {
        ApiError {
            status: StatusCode::FORBIDDEN,
            code: "plaintext",
            message: "this console is plain HTTP, so it answers only over loopback: reach it through `ssh -L` or `kubectl port-forward` at 127.0.0.1".to_owned(),
        }
    }

    fn busy() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            message: format!(
                "this server is answering {REQUESTS_IN_FLIGHT_MAX} console requests already; retry"
            ),
        }
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> ApiError {
        let (http, code) = http_status(status.code());
        ApiError { status: http, code, message: status.message().to_owned() }
    }
}

/// The HTTP status and the short code a console answer carries for an admin API status.
fn http_status(code: tonic::Code) -> (StatusCode, &'static str) {
    use tonic::Code;
    match code {
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
        Code::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        Code::InvalidArgument | Code::OutOfRange => (StatusCode::BAD_REQUEST, "invalid_argument"),
        Code::FailedPrecondition => (StatusCode::CONFLICT, "failed_precondition"),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: &self.message, code: self.code };
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl Console {
    fn node(&self) -> &Node {
        &self.node
    }

    /// A slot for one API request, or `busy`.
    fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.in_flight.clone().try_acquire_owned().map_err(|_| ApiError::busy())
    }

    /// Calls one admin RPC as the HTTP caller: `message` with the request's `authorization`
    /// header (the only header carried over) and its peer address (for the audit line; no
    /// certificate, so nothing a server would trust from another server).
    async fn call<Req, Resp, F, Fut>(
        &self,
        headers: &HeaderMap,
        peer: SocketAddr,
        message: Req,
        rpc: F,
    ) -> Result<Resp, ApiError>
    where
        F: FnOnce(Arc<AdminService>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        if !peer.ip().to_canonical().is_loopback() {
            return Err(ApiError::not_loopback());
        }
        let _permit = self.admit()?;
        let mut carried = HeaderMap::new();
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            carried.insert(header::AUTHORIZATION, value.clone());
        }
        let timeout = format!("{}m", READ_DEADLINE.as_millis());
        if let Ok(value) = HeaderValue::from_str(&timeout) {
            carried.insert("grpc-timeout", value);
        }
        let mut request = tonic::Request::from_parts(
            MetadataMap::from_headers(carried),
            tonic::Extensions::default(),
            message,
        );
        request.extensions_mut().insert(ConnInfo { remote: Some(peer), peer: None, raft: false });
        let response = rpc(self.admin.clone(), request).await?;
        Ok(response.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_statuses_become_http_statuses() {
        use tonic::Code;
        assert_eq!(http_status(Code::Unauthenticated).0, StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(Code::PermissionDenied).0, StatusCode::FORBIDDEN);
        assert_eq!(http_status(Code::NotFound).0, StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::InvalidArgument).0, StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::Unavailable).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status(Code::Internal).0, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn only_loopback_peers_are_answered() {
        let refused = ApiError::not_loopback();
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        for (peer, loopback) in [
            ("127.0.0.1:5000", true),
            ("[::1]:5000", true),
            ("[::ffff:127.0.0.1]:5000", true),
            ("10.0.0.2:5000", false),
            ("[::ffff:10.0.0.2]:5000", false),
        ] {
            let peer: SocketAddr = peer.parse().expect("an address");
            assert_eq!(peer.ip().to_canonical().is_loopback(), loopback, "{peer}");
        }
    }

    #[tokio::test]
    async fn an_unauthenticated_answer_asks_for_a_bearer_token() {
        let response = ApiError::from(tonic::Status::unauthenticated("unknown or revoked token"))
            .into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers().get(header::WWW_AUTHENTICATE).map(HeaderValue::as_bytes),
            Some(&b"Bearer"[..])
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 10).await;
        let body = body.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        assert_eq!(body, r#"{"error":"unknown or revoked token","code":"unauthenticated"}"#);
    }
}
