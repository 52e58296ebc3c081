//! What the proxy's tests share: a bounded wait, faults with a delay, and a proxy serving one
//! link in the background.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::time::timeout;

use super::{bind, Faults, Link, ProxyConfig};

/// Longest any one step of a test may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);
pub(super) const LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

pub(super) async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match timeout(WAIT, future).await {
        Ok(output) => output,
        Err(_) => panic!("no {what} within {WAIT:?}"),
    }
}

pub(super) fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

pub(super) fn delayed(delay_ms: u64, jitter_ms: u64) -> Faults {
    Faults { delay: ms(delay_ms), jitter: ms(jitter_ms), ..Faults::default() }
}

/// Binds a proxy for `link` and serves it in the background; returns where it listens.
pub(super) async fn start(link: Link, faults: Faults, seed: u64) -> SocketAddr {
    let config = ProxyConfig { links: vec![link], faults, seed };
    let bound = bind(&config).await.expect("bind the proxy");
    let listen = bound.local_addrs()[0];
    tokio::spawn(bound.run());
    listen
}
