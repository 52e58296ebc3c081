//! Who this server is and how it becomes a member: its identity from the data directory (or,
//! the first time, from its flags and the cluster it joins), and asking the cluster to add it.

use crate::config::ServerConfig;
use crate::identity::Identity;
use crate::peers::Peers;
use anyhow::{bail, Context};
use colony_proto::pb::{ClusterInfoRequest, ClusterInfoResponse, JoinClusterRequest};
use colony_store::TypeConfig;
use openraft::Raft;
use std::time::{Duration, Instant};

/// How long a joining server keeps trying to reach the cluster it was told to join.
const JOIN_CONTACT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a joining server keeps asking to be added before it gives up.
const JOIN_TIMEOUT: Duration = Duration::from_secs(300);
const RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks the servers in `targets` which cluster they form. Retries unreachable servers for a while;
/// a reply that is not Colony's is an error at once.
async fn cluster_info(peers: &Peers, targets: &[String]) -> anyhow::Result<ClusterInfoResponse> {
    let deadline = Instant::now() + JOIN_CONTACT_TIMEOUT;
    loop {
        let mut failures = Vec::new();
        for target in targets {
            let mut client = peers.admin(target)?;
            match tokio::time::timeout(RPC_TIMEOUT, client.cluster_info(ClusterInfoRequest {}))
                .await
            {
                Ok(Ok(info)) => return Ok(info.into_inner()),
                Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                    failures.push(format!("{target}: {}", status.message()))
                }
                Ok(Err(status)) => bail!(
                    "{target} is not a Colony server ({}: {})",
                    status.code(),
                    status.message()
                ),
                Err(_) => failures.push(format!("{target}: no answer within {RPC_TIMEOUT:?}")),
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "could not reach any server to join after {JOIN_CONTACT_TIMEOUT:?}: {}",
                failures.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Finds out who this server is: from its data directory, or, the first time, from its flags.
pub async fn resolve_identity(config: &ServerConfig, peers: &Peers) -> anyhow::Result<Identity> {
    let dir = &config.data_dir;
    if let Some(identity) = Identity::load(dir)? {
        if let Some(id) = config.id.filter(|&id| id != identity.node_id) {
            bail!(
                "data directory {} belongs to node {}, not node {id}",
                dir.display(),
                identity.node_id
            );
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
                Err(e) => tracing::warn!(
                    "restarting from {} without reaching the join target: {e:#}",
                    dir.display()
                ),
            }
        }
        return Ok(identity);
    }
    let node_id = config
        .id
        .context("--id is required the first time a server starts in an empty data directory")?;
    if node_id == 0 {
        bail!("node id 0 is reserved; use 1 or more");
    }
    let addr = config.listen.clone().context(
        "--listen is required the first time a server starts in an empty data directory",
    )?;
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
pub async fn join(
    raft: Raft<TypeConfig>,
    peers: Peers,
    identity: Identity,
    targets: Vec<String>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    let request = JoinClusterRequest {
        node_id: identity.node_id,
        addr: identity.addr.clone(),
        cluster_id: identity.cluster_id.clone(),
    };
    let mut delay = Duration::from_millis(200);
    loop {
        let is_voter = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == identity.node_id);
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
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::AlreadyExists
                            | tonic::Code::FailedPrecondition
                            | tonic::Code::InvalidArgument
                    ) =>
                {
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
