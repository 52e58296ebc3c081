//! Starting, running and stopping one server: identity, storage, Raft, the gRPC services on one
//! port, joining a cluster, and graceful shutdown on SIGTERM/SIGINT.

use crate::admin_service::AdminService;
use crate::config::ServerConfig;
use crate::identity::Identity;
use crate::metrics::{Metrics, NodeCell};
use crate::network::Network;
use crate::peers::{Peers, RAFT_MESSAGE_BYTES_MAX};
use crate::proposer::{Proposer, ProposerConfig};
use crate::raft_service::RaftService;
use anyhow::{bail, Context};
use colony_proto::pb::admin_server::AdminServer;
use colony_proto::pb::raft_server::RaftServer;
use colony_proto::pb::{ClusterInfoRequest, ClusterInfoResponse, JoinClusterRequest};
use colony_store::{Applied, LogStore, SharedState, TypeConfig};
use openraft::{BasicNode, Raft, SnapshotPolicy};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLockReadGuard};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

/// How long a joining server keeps trying to reach the cluster it was told to join.
const JOIN_CONTACT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a joining server keeps asking to be added before it gives up.
const JOIN_TIMEOUT: Duration = Duration::from_secs(300);
const RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// What the gRPC services share about the running server.
pub struct Node {
    pub id: u64,
    pub cluster_id: String,
    pub raft: Raft<TypeConfig>,
    pub proposer: Proposer,
    pub peers: Peers,
    pub log: LogStore,
    pub metrics: Arc<Metrics>,
    pub config: ServerConfig,
    pub snapshot_stats: Arc<colony_store::SnapshotStats>,
    /// Executors connected to this server (only while it leads).
    pub sessions: crate::gateway::Sessions,
    /// Wakes the leader's scheduler: work arrived or capacity was freed.
    pub scheduler_wake: tokio::sync::Notify,
    state: SharedState,
}

impl Node {
    /// The applied state, for reads. Held briefly: the state machine waits on it to apply.
    pub fn state(&self) -> RwLockReadGuard<'_, Applied> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The wall clock in Unix milliseconds: what the leader stamps into proposals and plans with.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// This process's resident memory, from /proc (0 where unavailable).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Asks the servers in `targets` which cluster they form. Retries unreachable servers for a while;
/// a reply that is not Colony's is an error at once.
async fn cluster_info(peers: &Peers, targets: &[String]) -> anyhow::Result<ClusterInfoResponse> {
    let deadline = Instant::now() + JOIN_CONTACT_TIMEOUT;
    loop {
        let mut failures = Vec::new();
        for target in targets {
            let mut client = peers.admin(target)?;
            match tokio::time::timeout(RPC_TIMEOUT, client.cluster_info(ClusterInfoRequest {})).await {
                Ok(Ok(info)) => return Ok(info.into_inner()),
                Ok(Err(status)) if status.code() == tonic::Code::Unavailable => failures.push(format!("{target}: {}", status.message())),
                Ok(Err(status)) => bail!("{target} is not a Colony server ({}: {})", status.code(), status.message()),
                Err(_) => failures.push(format!("{target}: no answer within {RPC_TIMEOUT:?}")),
            }
        }
        if Instant::now() >= deadline {
            bail!("could not reach any server to join after {JOIN_CONTACT_TIMEOUT:?}: {}", failures.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Finds out who this server is: from its data directory, or, the first time, from its flags.
async fn resolve_identity(config: &ServerConfig, peers: &Peers) -> anyhow::Result<Identity> {
    let dir = &config.data_dir;
    if let Some(identity) = Identity::load(dir)? {
        if let Some(id) = config.id.filter(|&id| id != identity.node_id) {
            bail!("data directory {} belongs to node {}, not node {id}", dir.display(), identity.node_id);
        }
        if let Some(listen) = config.listen.as_ref().filter(|&l| l != &identity.addr) {
            bail!("data directory {} belongs to the server at {}, not {listen}; a server's address cannot change", dir.display(), identity.addr);
        }
        if !config.join.is_empty() {
            match cluster_info(peers, &config.join).await {
                Ok(info) if info.cluster_id != identity.cluster_id => bail!(
                    "data directory {} belongs to cluster {}, but {} is cluster {}",
                    dir.display(),
                    identity.cluster_id,
                    config.join.join(","),
                    info.cluster_id
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!("restarting from {} without reaching the join target: {e:#}", dir.display()),
            }
        }
        return Ok(identity);
    }
    let node_id = config.id.context("--id is required the first time a server starts in an empty data directory")?;
    if node_id == 0 {
        bail!("node id 0 is reserved; use 1 or more");
    }
    let addr = config.listen.clone().context("--listen is required the first time a server starts in an empty data directory")?;
    let cluster_id = if config.bootstrap {
        uuid::Uuid::new_v4().to_string()
    } else if !config.join.is_empty() {
        let info = cluster_info(peers, &config.join).await?;
        for (member, member_addr) in &info.members {
            if *member == node_id && member_addr != &addr {
                bail!("node id {node_id} is already a member of cluster {} at {member_addr}; pick another id", info.cluster_id);
            }
            if *member != node_id && member_addr == &addr {
                bail!("{addr} is already the address of member {member}");
            }
        }
        info.cluster_id
    } else {
        bail!("{} holds no server yet: pass --bootstrap to start a new cluster, or --join HOST:PORT to join one", dir.display());
    };
    let identity = Identity::new(node_id, addr, cluster_id);
    identity.store(dir)?;
    Ok(identity)
}

/// Keeps asking the cluster to add this server until it is a voter.
async fn join(raft: Raft<TypeConfig>, peers: Peers, identity: Identity, targets: Vec<String>) -> anyhow::Result<()> {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    let request = JoinClusterRequest { node_id: identity.node_id, addr: identity.addr.clone(), cluster_id: identity.cluster_id.clone() };
    let mut delay = Duration::from_millis(200);
    loop {
        let is_voter = raft.metrics().borrow().membership_config.membership().voter_ids().any(|v| v == identity.node_id);
        if is_voter {
            tracing::info!("this server is a voter");
            return Ok(());
        }
        let mut last_error = String::new();
        for target in &targets {
            let mut client = peers.admin(target)?;
            match client.join_cluster(request.clone()).await {
                Ok(_) => {
                    tracing::info!(via = %target, "joined the cluster as a voter");
                    return Ok(());
                }
                Err(status) if matches!(status.code(), tonic::Code::AlreadyExists | tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument) => {
                    bail!("the cluster refused this server: {}", status.message());
                }
                Err(status) => last_error = format!("{target}: {}", status.message()),
            }
        }
        if Instant::now() >= deadline {
            bail!("could not join within {JOIN_TIMEOUT:?}: {last_error}");
        }
        tracing::info!("join not yet accepted ({last_error}); retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Accepted connections with Nagle's algorithm off: `Server::tcp_nodelay` applies only to
/// listeners tonic binds itself, and Nagle plus delayed ACKs stalls small RPCs for tens of ms.
fn incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.and_then(|stream| {
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    })
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Serves executors once the cluster CA exists (the bootstrap leader creates it; every other
/// server finds it in the replicated state).
async fn start_gateway(node: Arc<Node>, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let mut changes = node.raft.metrics();
    let ca = loop {
        let record = node.state().machine.ca().cloned();
        if let Some(record) = record {
            break colony_quic::ClusterCa::from_pem(&record.cert_pem, &record.key_pem).context("the replicated cluster CA is unreadable")?;
        }
        changes.changed().await.context("raft stopped before the cluster CA was created")?;
    };
    crate::gateway::run(node, addr, ca).await
}

/// Runs a server until SIGTERM or SIGINT, then shuts it down gracefully.
pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    if config.bootstrap && !config.join.is_empty() {
        bail!("--bootstrap and --join cannot be used together");
    }
    let peers = Peers::default();
    let identity = resolve_identity(&config, &peers).await?;
    let id = identity.node_id;
    tracing::info!(node_id = id, addr = %identity.addr, cluster_id = %identity.cluster_id, data_dir = %config.data_dir.display(), "starting server");
    if config.unsafe_stale_reads {
        tracing::warn!("--unsafe-stale-reads: every read is served from this server's own state; reads are NOT linearizable");
    }

    let listener = TcpListener::bind(&identity.addr).await.with_context(|| format!("cannot listen on {}", identity.addr))?;
    let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);
    let node_cell = NodeCell::default();
    let metrics_listener = match &config.metrics_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("cannot listen for metrics on {addr}"))?),
        None => None,
    };
    let store_options = colony_store::StoreOptions { check_invariants: config.check_invariants };
    let (log, sm) = colony_store::open(&config.data_dir, &store_options).with_context(|| format!("cannot open storage in {}", config.data_dir.display()))?;
    let state = sm.shared();
    let snapshot_stats = sm.stats();
    let raft_config = openraft::Config {
        cluster_name: "colony".into(),
        heartbeat_interval: config.heartbeat_interval.as_millis() as u64,
        election_timeout_min: config.election_timeout_min.as_millis() as u64,
        election_timeout_max: config.election_timeout_max.as_millis() as u64,
        install_snapshot_timeout: 5_000,
        max_payload_entries: 64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_logs_threshold),
        max_in_snapshot_log_to_keep: (config.snapshot_logs_threshold / 4).min(1000),
        ..Default::default()
    }
    .validate()
    .context("invalid raft configuration")?;
    let network = Network { peers: peers.clone(), cluster_id: identity.cluster_id.clone(), metrics: metrics.clone() };
    let raft = Raft::new(id, Arc::new(raft_config), network, log.clone(), sm).await.context("cannot start raft")?;

    if config.bootstrap && !raft.is_initialized().await? {
        tracing::info!("bootstrapping a new cluster");
        raft.initialize(BTreeMap::from([(id, BasicNode::new(&identity.addr))])).await.context("cannot bootstrap the cluster")?;
    }

    let node = Arc::new(Node {
        id,
        cluster_id: identity.cluster_id.clone(),
        raft: raft.clone(),
        proposer: Proposer::spawn(
            raft.clone(),
            ProposerConfig {
                batch_commands_max: config.proposal_commands_max,
                in_flight_max: config.proposals_in_flight_max,
                ..ProposerConfig::default()
            },
            metrics.clone(),
        ),
        peers: peers.clone(),
        log,
        metrics: metrics.clone(),
        config: config.clone(),
        snapshot_stats,
        sessions: Default::default(),
        scheduler_wake: Default::default(),
        state,
    });
    if node_cell.set(node.clone()).is_err() {
        bail!("node initialised twice");
    }

    let (mut health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(colony_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let raft_service = RaftServer::new(RaftService { raft: raft.clone(), cluster_id: identity.cluster_id.clone() })
        .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
    let (stop_serving, serving_stopped) = watch::channel(false);
    let mut serving_stopped_rx = serving_stopped.clone();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(raft_service)
        .add_service(AdminServer::new(AdminService { node: node.clone() }))
        .serve_with_incoming_shutdown(incoming(listener), async move {
            let _ = serving_stopped_rx.wait_for(|stop| *stop).await;
        });
    let mut server = tokio::spawn(server);
    if let Some(listener) = metrics_listener {
        let mut stopped = serving_stopped.clone();
        let app = crate::metrics::router(metrics.clone(), node_cell.clone());
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                tracing::error!("metrics endpoint stopped: {e}");
            }
        });
    }

    let quic_addr = tokio::net::lookup_host(&identity.addr)
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .with_context(|| format!("cannot resolve {} for the executor gateway", identity.addr))?;
    let mut gateway = tokio::spawn(start_gateway(node.clone(), quic_addr));
    let mut leading: Option<tokio::task::JoinHandle<()>> = None;

    let mut joining = if config.join.is_empty() {
        tokio::spawn(std::future::pending())
    } else {
        tokio::spawn(join(raft.clone(), peers.clone(), identity.clone(), config.join.clone()))
    };

    let mut raft_metrics = raft.metrics();
    let mut serving = None;
    let mut known_leader = None;
    let outcome: anyhow::Result<()> = loop {
        let (leader, fatal) = {
            let m = raft_metrics.borrow_and_update();
            metrics.raft_term.set(m.current_term as i64);
            metrics.raft_is_leader.set(i64::from(m.state == openraft::ServerState::Leader));
            metrics.raft_applied_index.set(m.last_applied.map_or(0, |l| l.index) as i64);
            metrics.raft_last_log_index.set(m.last_log_index.unwrap_or(0) as i64);
            metrics.raft_snapshot_index.set(m.snapshot.map_or(0, |l| l.index) as i64);
            let last_log = m.last_log_index.unwrap_or(0);
            metrics.raft_log_entries.set(last_log.saturating_sub(m.purged.map_or(0, |l| l.index)) as i64);
            metrics.raft_commit_index.set(node.log.committed_index().unwrap_or(0) as i64);
            if m.current_leader.is_some() && m.current_leader != known_leader {
                known_leader = m.current_leader;
                metrics.raft_leader_changes.inc();
            }
            let is_leader = m.state == openraft::ServerState::Leader;
            if is_leader && leading.is_none() {
                leading = Some(tokio::spawn(crate::leader::run(node.clone())));
            } else if !is_leader {
                if let Some(duties) = leading.take() {
                    duties.abort();
                    node.sessions.close_all("this server is no longer the leader");
                    tracing::info!("no longer leading: scheduler stopped, executor sessions closed");
                }
            }
            (m.current_leader, m.running_state.clone().err())
        };
        if let Some(fatal) = fatal {
            break Err(anyhow::anyhow!("raft stopped: {fatal}"));
        }
        // Ready means a leader is known; metrics change on every apply, health only on this edge.
        let ready = leader.is_some();
        if serving != Some(ready) {
            serving = Some(ready);
            let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
            health.set_service_status("", status).await;
            health.set_service_status("colony.v1.Admin", status).await;
        }
        tokio::select! {
            signal = shutdown_signal() => {
                tracing::info!("{signal} received; shutting down");
                break Ok(());
            }
            changed = raft_metrics.changed() => {
                if changed.is_err() {
                    break Err(anyhow::anyhow!("raft stopped unexpectedly"));
                }
            }
            result = &mut server => {
                break Err(anyhow::anyhow!("gRPC server stopped: {}", match result {
                    Ok(Ok(())) => "without error".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                }));
            }
            stopped = &mut gateway => {
                break Err(anyhow::anyhow!("executor gateway stopped: {}", match stopped {
                    Ok(Ok(())) => "without error".to_owned(),
                    Ok(Err(e)) => format!("{e:#}"),
                    Err(e) => e.to_string(),
                }));
            }
            joined = &mut joining => {
                match joined {
                    Ok(Ok(())) => joining = tokio::spawn(std::future::pending()),
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(anyhow::anyhow!("join task failed: {e}")),
                }
            }
        }
    };

    joining.abort();
    gateway.abort();
    if let Some(duties) = leading.take() {
        duties.abort();
    }
    node.sessions.close_all("server shutting down");
    let _ = stop_serving.send(true);
    if let Err(e) = raft.shutdown().await {
        tracing::warn!("raft shutdown: {e}");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    tracing::info!("server stopped");
    outcome
}
