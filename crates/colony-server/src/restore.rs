//! `colony server --bootstrap --restore FILE`: a new cluster whose first server starts from a
//! backup. The data directory must be empty. The new cluster keeps the backup's CA (its tokens
//! and executor certificates stay valid) under a new cluster id (Raft messages of the old
//! cluster are refused), every attempt and executor from before the snapshot is stopped
//! (`StateMachine::prepare_restore`), and this server is the only voter; others join it.

use crate::config::ServerConfig;
use crate::identity::Identity;
use crate::tls::ServerTls;
use anyhow::{bail, Context};
use colony_quic::{CertRole, ClusterCa};
use colony_store::backup;
use colony_store::Applied;
use openraft::{BasicNode, CommittedLeaderId, LogId, Membership, StoredMembership};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Refuses a restore into a data directory that holds anything.
pub fn check_empty(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "--restore needs an empty data directory, and {} is not empty; a restore never overwrites a server",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", dir.display())),
    }
}

/// Writes this server's identity, certificate and the restored state into the (empty) data
/// directory, as the first server of a new cluster.
pub fn restore(
    config: &ServerConfig,
    file: &Path,
    node_id: u64,
    addr: String,
    hosts: &[String],
) -> anyhow::Result<(Identity, ServerTls)> {
    let refused = || format!("cannot restore {}", file.display());
    let expected = config.restore_expect_cluster_id.as_deref();
    let backup = backup::read_file(file, expected).with_context(refused)?;
    let mut machine = backup.applied.machine;
    let ca = machine.ca().cloned().with_context(|| {
        format!("cannot restore {}: the backup holds no cluster CA", file.display())
    })?;
    let restored = machine.prepare_restore();
    let ca = ClusterCa::from_pem(&ca.cert_pem, &ca.key_pem).with_context(refused)?;
    let own = ca.issue(CertRole::Server(node_id), hosts)?;
    let tls = ServerTls {
        ca_pem: ca.cert_pem().to_owned(),
        own,
        ca_key_pem: Some(ca.key_pem().to_owned()),
    };
    let index = backup.header.last_applied.map_or(1, |l| l.index.max(1));
    let log_id = LogId::new(CommittedLeaderId::new(0, node_id), index);
    let membership = Membership::new(
        vec![BTreeSet::from([node_id])],
        BTreeMap::from([(node_id, BasicNode::new(&addr))]),
    );
    let applied = Applied {
        last_applied: Some(log_id),
        membership: StoredMembership::new(Some(log_id), membership),
        machine,
    };
    let cluster_id = uuid::Uuid::new_v4().to_string();
    let dir = &config.data_dir;
    tls.store(dir)?;
    colony_store::seed_snapshot(dir, &applied)
        .with_context(|| format!("cannot write the restored state into {}", dir.display()))?;
    let identity = Identity::new(node_id, addr, cluster_id);
    identity.store(dir)?;
    tracing::info!(
        file = %file.display(),
        from_cluster = %backup.header.cluster_id,
        cluster_id = %identity.cluster_id,
        index,
        tasks = applied.machine.task_count(),
        requeued = restored.requeued.len(),
        executors_down = restored.executors_down,
        deliveries_expired = restored.deliveries_expired,
        "restored a backup into a new cluster; attempts from before the snapshot were stopped and executors must register again"
    );
    Ok((identity, tls))
}
