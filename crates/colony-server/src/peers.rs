//! Connections to other servers, one lazily connected gRPC channel per address, shared by Raft
//! replication, forwarding and reachability probes. Every one is mutual TLS with this server's
//! certificate, asking for the Raft name, so the peer accepts it only from a server.

use colony_client::{Auth, Channel};
use colony_proto::pb::admin_client::AdminClient;
use colony_proto::pb::raft_client::RaftClient;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Endpoint;

/// Raft messages (log batches, snapshot chunks) may be this large.
pub const RAFT_MESSAGE_BYTES_MAX: usize = 64 << 20;

/// A connection whose pings go unanswered this long is dropped and dialled again. After a
/// partition heals, a connection that lost packets otherwise waits out TCP's retransmission
/// backoff (seconds after a partition of a few seconds); the chaos suite measured 3.7 to 6.9 s
/// without a leader after a partition of majorities healed, with 10 s / 5 s here.
const PEER_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
const PEER_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// A pool of channels keyed by address.
#[derive(Clone)]
pub struct Peers {
    auth: Auth,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("bad peer address {addr:?}: {detail}")]
pub struct BadAddress {
    pub addr: String,
    pub detail: String,
}

impl Peers {
    /// Peers reached with `auth`: this server's certificate, asking for the Raft name.
    pub fn new(auth: Auth) -> Peers {
        Peers { auth, channels: Arc::default() }
    }

    pub fn channel(&self, addr: &str) -> Result<Channel, BadAddress> {
        let mut channels = self.channels.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| BadAddress { addr: addr.to_owned(), detail: e.to_string() })?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(PEER_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(PEER_KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = self.auth.channel(endpoint);
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    pub fn raft(&self, addr: &str) -> Result<RaftClient<Channel>, BadAddress> {
        Ok(RaftClient::new(self.channel(addr)?)
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX))
    }

    pub fn admin(&self, addr: &str) -> Result<AdminClient<Channel>, BadAddress> {
        Ok(AdminClient::new(self.channel(addr)?))
    }
}
