//! Starting, running and stopping one server: storage and Raft, the gRPC services on one port,
//! the executor gateway, the metrics endpoint, joining a cluster, following leadership (the
//! leader's duties start and stop with it), and a graceful stop on SIGTERM/SIGINT.

use crate::admin::AdminService;
use crate::audit::Audit;
use crate::config::ServerConfig;
use crate::identity::Identity;
use crate::join::{join, peer_auth, resolve_identity};
use crate::metrics::Metrics;
use crate::network::Network;
use crate::node::{Node, Parts};
use crate::peers::{Peers, RAFT_MESSAGE_BYTES_MAX};
use crate::proposer::{Proposer, ProposerConfig};
use crate::raft_service::RaftService;
use crate::sessions::Sessions;
use crate::tls::ServerTls;
use anyhow::{bail, Context};
use colony_core::leader::LeaderConfig;
use colony_proto::pb::admin_server::AdminServer;
use colony_proto::pb::raft_server::RaftServer;
use openraft::{BasicNode, Raft, RaftMetrics, SnapshotPolicy};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// An assignment the executor has not listed in a heartbeat is sent again after this long.
const ASSIGN_RESEND_AFTER: Duration = Duration::from_secs(2);
/// Entries per AppendEntries. Each entry is at most `ENTRY_BYTES_MAX` unless it is one command
/// alone (a model's weights, at most 4 MiB): 32 of them stay well under the peer message limit.
const RAFT_PAYLOAD_ENTRIES_MAX: u64 = 32;
const _: () = assert!(
    (RAFT_PAYLOAD_ENTRIES_MAX as usize + 4) * crate::proposer::ENTRY_BYTES_MAX
        < RAFT_MESSAGE_BYTES_MAX
);
/// How long the gRPC server may take to finish in-flight requests at shutdown.
const SERVE_DRAIN_MAX: Duration = Duration::from_secs(5);
/// HTTP/2 streams one connection may have open at once (a client opening thousands is refused
/// more, not served).
const STREAMS_PER_CONNECTION_MAX: u32 = 256;
/// The largest header list a request may carry.
const HEADER_LIST_BYTES_MAX: u32 = 16 << 10;
/// No request is served longer than this, whatever it asks; every RPC has its own, shorter
/// deadline (15 s, 150 s for a join) inside it.
const REQUEST_TIME_MAX: Duration = Duration::from_secs(180);

/// Runs a server until SIGTERM or SIGINT, then shuts it down gracefully.
pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    if config.bootstrap && !config.join.is_empty() {
        bail!("--bootstrap and --join cannot be used together");
    }
    // The data directory holds keys and the replicated CA: only its owner may read it.
    colony_process::private_dir(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    let (identity, tls) = resolve_identity(&config).await?;
    let peers = Peers::new(peer_auth(&tls)?);
    tracing::info!(node_id = identity.node_id, addr = %identity.addr, cluster_id = %identity.cluster_id, data_dir = %config.data_dir.display(), "starting server");
    if config.unsafe_stale_reads {
        tracing::warn!("--unsafe-stale-reads: every read is served from this server's own state; reads are NOT linearizable");
    }
    // Listeners first, so a port in use fails the start before anything is opened.
    let bind = config.bind.as_ref().unwrap_or(&identity.addr);
    let listener =
        TcpListener::bind(bind).await.with_context(|| format!("cannot listen on {bind}"))?;
    let metrics_listener = match &config.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?,
        ),
        None => None,
    };
    let quic_addr = tokio::net::lookup_host(bind)
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .with_context(|| format!("cannot resolve {bind} for the executor gateway"))?;

    let grpc_tls = colony_quic::grpc_server_tls(&tls.ca_pem, &tls.own)?;
    let node = Arc::new(open_node(&config, &identity, &peers, tls).await?);
    let (stop_serving, serving_stopped) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let incoming = crate::tls::accept(listener, grpc_tls);
    let (health, mut grpc) = serve_grpc(&node, incoming, stopped(serving_stopped.clone()))?;
    if let Some(listener) = metrics_listener {
        let probe: Arc<dyn colony_process::Probe> = node.clone();
        let shutdown = stopped(serving_stopped.clone());
        // The web console (`/ui`) shares the metrics port.
        let console = crate::console::router(node.clone());
        tokio::spawn(async move {
            let served = colony_process::serve_http_with(listener, probe, console, shutdown);
            if let Err(e) = served.await {
                tracing::error!("metrics endpoint stopped: {e}");
            }
        });
    }
    let gateway = tokio::spawn(crate::gateway::start(node.clone(), quic_addr));
    let joining = match config.join.is_empty() {
        true => None,
        false => Some(tokio::spawn(join(
            node.raft().clone(),
            peers.clone(),
            identity.clone(),
            config.join.clone(),
        ))),
    };

    let outcome = follow(&node, health, &mut grpc, gateway, joining).await;
    if outcome.is_ok() {
        crate::handover::hand_over(&node).await;
    }

    node.sessions().close_all("server shutting down");
    let _ = stop_serving.send(true);
    if let Err(e) = node.raft().shutdown().await {
        tracing::warn!("raft shutdown: {e}");
    }
    if tokio::time::timeout(SERVE_DRAIN_MAX, &mut grpc).await.is_err() {
        grpc.abort();
    }
    tracing::info!("server stopped");
    outcome
}

/// Opens storage and Raft (bootstrapping a new cluster when asked) and builds the node.
async fn open_node(
    config: &ServerConfig,
    identity: &Identity,
    peers: &Peers,
    tls: ServerTls,
) -> anyhow::Result<Node> {
    let id = identity.node_id;
    let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);
    if config.backup_dir.is_some() {
        metrics.backup_interval.set(config.backup_interval.as_secs_f64());
    }
    let store_options = colony_store::StoreOptions { check_invariants: config.check_invariants };
    let (log, sm) = colony_store::open(&config.data_dir, &store_options)
        .with_context(|| format!("cannot open storage in {}", config.data_dir.display()))?;
    let (state, snapshot_stats) = (sm.shared(), sm.stats());
    let raft_config = openraft::Config {
        cluster_name: "colony".into(),
        heartbeat_interval: replication_timeout(config).as_millis() as u64,
        election_timeout_min: config.election_timeout_min.as_millis() as u64,
        election_timeout_max: config.election_timeout_max.as_millis() as u64,
        install_snapshot_timeout: 5_000,
        max_payload_entries: RAFT_PAYLOAD_ENTRIES_MAX,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_logs_threshold),
        max_in_snapshot_log_to_keep: (config.snapshot_logs_threshold / 4).min(1000),
        ..Default::default()
    }
    .validate()
    .context("invalid raft configuration")?;
    let network = Network {
        id,
        peers: peers.clone(),
        cluster_id: identity.cluster_id.clone(),
        metrics: metrics.clone(),
    };
    let raft = Raft::new(id, Arc::new(raft_config), network.clone(), log.clone(), sm)
        .await
        .context("cannot start raft")?;
    // openraft loads the stored vote and log on a task of its own; until that task first reports,
    // the metrics are the initial ones (term 0, no log), which nothing may serve or act on.
    raft.metrics().changed().await.context("raft stopped while loading its state")?;
    tokio::spawn(crate::heartbeat::run(
        raft.clone(),
        network,
        config.heartbeat_interval,
        replication_timeout(config),
    ));
    if config.bootstrap && !raft.is_initialized().await? {
        tracing::info!("bootstrapping a new cluster");
        raft.initialize(BTreeMap::from([(id, BasicNode::new(&identity.addr))]))
            .await
            .context("cannot bootstrap the cluster")?;
    }
    let proposer_config = ProposerConfig {
        batch_commands_max: config.proposal_commands_max,
        in_flight_max: config.proposals_in_flight_max,
        ..ProposerConfig::default()
    };
    let leader_config = LeaderConfig {
        heartbeat_timeout: config.executor_heartbeat_timeout,
        leader_grace: config.executor_leader_grace,
        assign_resend_after: ASSIGN_RESEND_AFTER,
    };
    Ok(Node::new(Parts {
        id,
        cluster_id: identity.cluster_id.clone(),
        proposer: Proposer::spawn(raft.clone(), proposer_config, metrics.clone()),
        raft,
        peers: peers.clone(),
        log,
        metrics,
        config: config.clone(),
        snapshot_stats,
        sessions: Sessions::new(leader_config),
        state,
        ca_fingerprint: colony_quic::cert_fingerprint(&tls.ca_pem)?,
        tls,
        audit: Audit::open(&config.data_dir, config.audit.clone())
            .context("cannot open the audit trail")?,
    }))
}

/// openraft 0.9 takes its heartbeat interval as the time limit of every AppendEntries too, and
/// sends its own heartbeats at that interval through the replication loop, behind log appends.
/// Leases are kept by `heartbeat` at `--heartbeat-ms`, so openraft's interval is set to what an
/// append may take before it is sent again: three quarters of the shortest election timeout
/// (openraft requires less than it). A tight limit resends appends that a follower under load
/// was about to answer.
fn replication_timeout(config: &ServerConfig) -> Duration {
    config.election_timeout_min * 3 / 4
}

/// The gRPC services on the server's port (TLS): health, reflection, Raft and the admin API.
fn serve_grpc(
    node: &Arc<Node>,
    incoming: impl tokio_stream::Stream<Item = std::io::Result<crate::tls::Conn>> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(HealthReporter, JoinHandle<Result<(), tonic::transport::Error>>)> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(colony_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let raft_service =
        RaftServer::new(RaftService::new(node.raft().clone(), node.cluster_id().to_owned()))
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(STREAMS_PER_CONNECTION_MAX))
        .http2_max_header_list_size(Some(HEADER_LIST_BYTES_MAX))
        .timeout(REQUEST_TIME_MAX)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(raft_service)
        .add_service(AdminServer::new(AdminService::new(node.clone())))
        .serve_with_incoming_shutdown(incoming, shutdown);
    Ok((health, tokio::spawn(server)))
}

/// Follows Raft until a stop signal or a failure: keeps the Raft gauges and the health status
/// current, and starts the leader's duties when this server takes office and stops them (and
/// closes executor sessions) when it leaves.
async fn follow(
    node: &Arc<Node>,
    mut health: HealthReporter,
    grpc: &mut JoinHandle<Result<(), tonic::transport::Error>>,
    mut gateway: JoinHandle<anyhow::Result<()>>,
    joining: Option<JoinHandle<anyhow::Result<()>>>,
) -> anyhow::Result<()> {
    let mut raft_metrics = node.raft().metrics();
    let mut joining = joining.unwrap_or_else(|| tokio::spawn(std::future::pending()));
    let mut leading: Option<JoinHandle<()>> = None;
    let (mut serving, mut known_leader) = (None, None);
    // One listener for the whole loop: a listener made anew each turn would miss a signal that
    // arrives while the turn's body runs (tokio delivers only what comes after a listener
    // exists), and under load, when metrics change on every apply, a SIGTERM was lost that way.
    let mut stop = std::pin::pin!(colony_process::shutdown_signal());
    let outcome = loop {
        let (leader, fatal) = {
            let m = raft_metrics.borrow_and_update();
            export_raft_metrics(node, &m, &mut known_leader);
            let is_leader = m.state == openraft::ServerState::Leader;
            if is_leader && leading.is_none() {
                node.sessions().became_leader();
                leading = Some(tokio::spawn(crate::leader::run(node.clone())));
            } else if !is_leader {
                if let Some(duties) = leading.take() {
                    duties.abort();
                    node.sessions().close_all("this server is no longer the leader");
                    tracing::info!(
                        "no longer leading: scheduler stopped, executor sessions closed"
                    );
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
            signal = &mut stop => {
                tracing::info!("{signal} received; shutting down");
                break Ok(());
            }
            changed = raft_metrics.changed() => {
                if changed.is_err() {
                    break Err(anyhow::anyhow!("raft stopped unexpectedly"));
                }
            }
            result = &mut *grpc => break Err(anyhow::anyhow!("gRPC server stopped: {}", ended(result.map(|r| r.map_err(anyhow::Error::from))))),
            result = &mut gateway => break Err(anyhow::anyhow!("executor gateway stopped: {}", ended(result))),
            joined = &mut joining => match joined {
                Ok(Ok(())) => joining = tokio::spawn(std::future::pending()),
                Ok(Err(e)) => break Err(e),
                Err(e) => break Err(anyhow::anyhow!("join task failed: {e}")),
            },
        }
    };
    joining.abort();
    gateway.abort();
    if let Some(duties) = leading.take() {
        duties.abort();
    }
    outcome
}

/// Why a spawned part of the server ended.
fn ended(result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> String {
    match result {
        Ok(Ok(())) => "without error".to_owned(),
        Ok(Err(e)) => format!("{e:#}"),
        Err(e) => e.to_string(),
    }
}

fn export_raft_metrics(
    node: &Node,
    m: &RaftMetrics<u64, BasicNode>,
    known_leader: &mut Option<u64>,
) {
    let metrics = node.metrics();
    metrics.raft_term.set(m.current_term as i64);
    metrics.raft_is_leader.set(i64::from(m.state == openraft::ServerState::Leader));
    metrics.raft_applied_index.set(m.last_applied.map_or(0, |l| l.index) as i64);
    metrics.raft_last_log_index.set(m.last_log_index.unwrap_or(0) as i64);
    metrics.raft_snapshot_index.set(m.snapshot.map_or(0, |l| l.index) as i64);
    let last_log = m.last_log_index.unwrap_or(0);
    metrics.raft_log_entries.set(last_log.saturating_sub(m.purged.map_or(0, |l| l.index)) as i64);
    metrics.raft_commit_index.set(node.committed_index() as i64);
    if m.current_leader.is_some() && m.current_leader != *known_leader {
        *known_leader = m.current_leader;
        metrics.raft_leader_changes.inc();
    }
}
