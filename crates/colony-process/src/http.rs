//! The HTTP endpoint every Colony process may serve: `/metrics` (Prometheus text format),
//! `/healthz` (the process is alive) and `/readyz` (it can do its job), over one [`Probe`], and
//! whatever routes the process adds ([`serve_http_with`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};

/// What a process exposes over HTTP.
pub trait Probe: Send + Sync + 'static {
    /// Prometheus text format for /metrics; Err answers 500 with the message.
    fn metrics_text(&self) -> Result<String, String>;
    /// Ok for /readyz 200 "ready\n"; Err(why) answers 503 with why.
    fn ready(&self) -> Result<(), String>;
}

/// Encodes a registry in the text format (for [`Probe::metrics_text`]).
pub fn encode(registry: &Registry) -> Result<String, String> {
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out).map_err(|error| error.to_string())?;
    String::from_utf8(out).map_err(|error| error.to_string())
}

async fn metrics(State(probe): State<Arc<dyn Probe>>) -> Response {
    match probe.metrics_text() {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(message) => (StatusCode::INTERNAL_SERVER_ERROR, message).into_response(),
    }
}

async fn ready(State(probe): State<Arc<dyn Probe>>) -> Response {
    match probe.ready() {
        Ok(()) => "ready\n".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

/// Serves /metrics, /healthz ("ok\n", always 200) and /readyz on `listener` until `shutdown`.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    probe: Arc<dyn Probe>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_http_with(listener, probe, Router::new(), shutdown).await
}

/// Like [`serve_http`], with the process's own `routes` beside the three (a server's console).
/// Handlers may extract `axum::extract::ConnectInfo<SocketAddr>`, the peer's address.
pub async fn serve_http_with(
    listener: tokio::net::TcpListener,
    probe: Arc<dyn Probe>,
    routes: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(probe)
        .merge(routes);
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A probe whose answers the test switches.
    #[derive(Default)]
    struct Switches {
        ready: AtomicBool,
        broken: AtomicBool,
    }

    impl Probe for Switches {
        fn metrics_text(&self) -> Result<String, String> {
            if self.broken.load(Ordering::Relaxed) {
                return Err("cannot encode".to_owned());
            }
            let registry = Registry::new();
            let gauge = prometheus::IntGauge::new("colony_test_gauge", "A gauge.")
                .map_err(|error| error.to_string())?;
            gauge.set(7);
            registry.register(Box::new(gauge)).map_err(|error| error.to_string())?;
            encode(&registry)
        }

        fn ready(&self) -> Result<(), String> {
            if self.ready.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("not ready: switched off\n".to_owned())
            }
        }
    }

    /// One HTTP/1.0 GET: the status code, the content type and the body.
    async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String, String)> {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let code = head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
        let content_type =
            head.lines().find_map(|line| line.strip_prefix("content-type: ")).unwrap_or_default();
        Ok((code, content_type.to_owned(), body.to_owned()))
    }

    #[tokio::test]
    async fn answers_every_route_and_stops_on_shutdown() -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let switches = Arc::new(Switches::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_http(listener, switches.clone(), async {
            // A dropped sender stops the server as well.
            let _ = stopped.await;
        }));

        assert_eq!(get(addr, "/healthz").await?.0, 200);
        assert_eq!(get(addr, "/healthz").await?.2, "ok\n");
        let (code, _, body) = get(addr, "/readyz").await?;
        assert_eq!((code, body.as_str()), (503, "not ready: switched off\n"));
        switches.ready.store(true, Ordering::Relaxed);
        let (code, _, body) = get(addr, "/readyz").await?;
        assert_eq!((code, body.as_str()), (200, "ready\n"));

        let (code, content_type, body) = get(addr, "/metrics").await?;
        assert_eq!(code, 200);
        assert_eq!(content_type, "text/plain; version=0.0.4");
        assert!(body.lines().any(|line| line == "colony_test_gauge 7"), "{body}");
        switches.broken.store(true, Ordering::Relaxed);
        let (code, _, body) = get(addr, "/metrics").await?;
        assert_eq!((code, body.as_str()), (500, "cannot encode"));
        assert_eq!(get(addr, "/nothing").await?.0, 404);

        let _ = stop.send(());
        let served = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
        assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        Ok(())
    }

    #[tokio::test]
    async fn a_process_adds_its_own_routes_which_see_the_peer() -> std::io::Result<()> {
        use axum::extract::ConnectInfo;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let routes = Router::new().route(
            "/peer",
            axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                peer.ip().to_string()
            }),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let probe = Arc::new(Switches::default());
        let server = tokio::spawn(serve_http_with(listener, probe, routes, async {
            let _ = stopped.await;
        }));
        assert_eq!(get(addr, "/peer").await?.2, "127.0.0.1");
        assert_eq!(get(addr, "/healthz").await?.2, "ok\n", "the three routes stay");
        let _ = stop.send(());
        let served = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
        assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
        Ok(())
    }
}
