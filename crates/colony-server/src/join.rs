//! Who this server is and how it becomes a member: its identity and certificate from the data
//! directory (or, the first time, from its flags and the cluster it joins), and asking the
//! cluster to add it.

use crate::config::ServerConfig;
use crate::identity::Identity;
use crate::peers::Peers;
use crate::tls::ServerTls;
use anyhow::{bail, Context};
use colony_client::{Auth, Client};
use colony_proto::pb::{
    ClusterInfoRequest, ClusterInfoResponse, EnrollRequest, JoinClusterRequest,
};
use colony_quic::{cert_fingerprint, CertRole, CertifiedKey, ClusterCa, Token};
use colony_store::TypeConfig;
use openraft::Raft;
use std::time::{Duration, Instant};

/// How long a joining server keeps trying to reach the cluster it was told to join.
const JOIN_CONTACT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a joining server keeps asking to be added before it gives up.
const JOIN_TIMEOUT: Duration = Duration::from_secs(300);
const RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// The TLS handshake with a server to join failed: it is not a server of this server's cluster
/// (its certificate is from another CA, or it is not Colony at all).
#[derive(Debug, thiserror::Error)]
#[error("{target} is not a server of this server's cluster (TLS: {cause})")]
struct NotThisCluster {
    target: String,
    cause: String,
}

/// Asks the servers in `targets` which cluster they form, with this server's certificate.
/// Retries unreachable servers for a while; a reply that is not Colony's is an error at once.
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
                Ok(Err(status)) if colony_client::tls_failure(&status).is_some() => {
                    let cause = colony_client::tls_failure(&status).unwrap_or_default();
                    return Err(NotThisCluster { target: target.clone(), cause }.into());
                }
                Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                    failures.push(format!("{target}: {}", status.message()))
                }
                Ok(Err(status)) => {
                    bail!("{target} refused this server ({}: {})", status.code(), status.message())
                }
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

/// Finds out who this server is and what it holds: from its data directory, or, the first time,
/// from its flags (a new cluster's CA and this server's certificate for `--bootstrap`; a
/// certificate enrolled with a server join token for `--join`).
pub async fn resolve_identity(config: &ServerConfig) -> anyhow::Result<(Identity, ServerTls)> {
    let dir = &config.data_dir;
    if config.restore.is_some() {
        crate::restore::check_empty(dir)?;
    }
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
        let tls = ServerTls::load(dir)?.with_context(|| {
            format!(
                "data directory {} holds no certificate (tls/): it was written by a Colony without TLS; start this server afresh in an empty directory",
                dir.display()
            )
        })?;
        if !config.join.is_empty() {
            let peers = Peers::new(peer_auth(&tls)?);
            match cluster_info(&peers, &config.join).await {
                Ok(info) if info.cluster_id != identity.cluster_id => bail!(
                    "data directory {} belongs to cluster {}, but {} is cluster {}",
                    dir.display(),
                    identity.cluster_id,
                    config.join.join(","),
                    info.cluster_id
                ),
                Ok(_) => {}
                // Another cluster's server (or not Colony): its certificate is not from our CA.
                Err(e) if e.downcast_ref::<NotThisCluster>().is_some() => bail!(
                    "data directory {} belongs to cluster {}, but {e:#}",
                    dir.display(),
                    identity.cluster_id
                ),
                Err(e) => tracing::warn!(
                    "restarting from {} without reaching the join target: {e:#}",
                    dir.display()
                ),
            }
        }
        return Ok((identity, tls));
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
    let hosts = vec![host_of(&addr).to_owned()];
    if let Some(file) = config.restore.as_deref().filter(|_| config.bootstrap) {
        return crate::restore::restore(config, file, node_id, addr, &hosts);
    }
    let (cluster_id, tls) = if config.bootstrap {
        let cluster_id = uuid::Uuid::new_v4().to_string();
        let ca = ClusterCa::generate(&cluster_id)?;
        let own = ca.issue(CertRole::Server(node_id), &hosts)?;
        let tls = ServerTls {
            ca_pem: ca.cert_pem().to_owned(),
            own,
            ca_key_pem: Some(ca.key_pem().to_owned()),
        };
        (cluster_id, tls)
    } else if !config.join.is_empty() {
        let token = config.token.as_deref().context(
            "--token is required to join a cluster: a server join token (colony cluster token create --kind server)",
        )?;
        enroll(config, token, node_id, &addr).await?
    } else {
        bail!("{} holds no server yet: pass --bootstrap to start a new cluster, or --join HOST:PORT --token TOKEN to join one", dir.display());
    };
    // The certificate first: a directory with an identity but no certificate cannot start.
    tls.store(dir)?;
    let identity = Identity::new(node_id, addr, cluster_id);
    identity.store(dir)?;
    Ok((identity, tls))
}

/// Trades a server join token and a fresh key's CSR for a certificate, through any server of the
/// cluster, verifying it against the CA the token pins.
async fn enroll(
    config: &ServerConfig,
    token: &str,
    node_id: u64,
    addr: &str,
) -> anyhow::Result<(String, ServerTls)> {
    let parsed: Token = token.parse().context("invalid --token")?;
    let (key_pem, csr_pem) = colony_quic::new_key_and_csr()?;
    let client =
        Client::new(&config.join, JOIN_CONTACT_TIMEOUT, &Auth::pinned(parsed.ca_fingerprint))?;
    let request =
        EnrollRequest { token: token.to_owned(), csr_pem, node_id, addr: addr.to_owned() };
    let enrolled = client
        .call("enroll this server", |mut c| {
            let request = request.clone();
            async move { c.enroll(request).await }
        })
        .await
        .context("the cluster did not issue this server a certificate")?;
    if cert_fingerprint(&enrolled.ca_pem)? != parsed.ca_fingerprint {
        bail!("the cluster answered with a CA other than the one the token names");
    }
    tracing::info!(cluster_id = %enrolled.cluster_id, "enrolled: this server holds a certificate from the cluster CA");
    let tls = ServerTls {
        ca_pem: enrolled.ca_pem,
        own: CertifiedKey { cert_pem: enrolled.cert_pem, key_pem },
        ca_key_pem: None,
    };
    Ok((enrolled.cluster_id, tls))
}

/// The host part of `HOST:PORT` (brackets of an IPv6 literal removed).
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(host, _)| host).trim_matches(['[', ']'])
}

/// How this server dials the others: its own certificate, asking for the Raft name.
pub fn peer_auth(tls: &ServerTls) -> anyhow::Result<Auth> {
    Ok(Auth::certificate(&tls.ca_pem, &tls.own, colony_quic::RAFT_SERVER_NAME)?)
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
                            | tonic::Code::Unauthenticated
                            | tonic::Code::PermissionDenied
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
