//! A server whose log was purged behind a snapshot while it was down catches up by snapshot install.

use colony_proto::pb;
use colony_tests::{task_spec, wait_for_exact_tasks, Cluster};
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_server_catches_up_by_snapshot() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 50).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let lagging = (leader + 1) % 3;
    cluster.servers[lagging].kill9();
    let lagging_id = cluster.servers[lagging].id;

    let mut c = cluster.servers[leader].client().await?;
    let mut ids = BTreeSet::new();
    for n in 0..400 {
        let spec = task_spec(&format!("snap-{n}"), None);
        ids.insert(
            c.submit_task(pb::SubmitTaskRequest { spec: Some(spec) })
                .await?
                .into_inner()
                .task
                .map_or(0, |t| t.id),
        );
    }
    // openraft purges the log behind a snapshot in the background, after the snapshot is built.
    let leader_addr = cluster.servers[leader].addr.clone();
    let purged = colony_tests::wait_for(
        "the leader to snapshot and purge its log",
        Duration::from_secs(20),
        || {
            let addr = leader_addr.clone();
            async move {
                let status = colony_tests::status(&addr, Duration::from_secs(3)).await?;
                let purged = status.purged_index.unwrap_or(0);
                Ok((status.snapshot_index.is_some() && purged > 100).then_some(purged))
            }
        },
    )
    .await?;

    cluster.servers[lagging].restart()?;
    wait_for_exact_tasks(&cluster.servers[lagging], &ids, Duration::from_secs(30))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    let caught_up = cluster.servers[lagging].status().await?;
    assert!(
        caught_up.snapshot_index.is_some_and(|s| s >= purged),
        "server {lagging_id} should hold the leader's snapshot (purged at {purged}): {caught_up:?}"
    );

    // A restart now recovers from the installed snapshot plus the log after it.
    cluster.servers[lagging].kill9();
    cluster.servers[lagging].restart()?;
    wait_for_exact_tasks(&cluster.servers[lagging], &ids, Duration::from_secs(30)).await?;
    Ok(())
}
