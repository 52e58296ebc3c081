//! Retention with real servers: finished tasks go from every replica once they are older than
//! `--task-retention` (their idempotency keys with them), a finished task an unfinished task
//! depends on stays until that one finishes, the replicas' states stay identical, and a feed
//! cursor retention passed is told where to resume.

use colony_proto::pb;
use colony_tests::{local_task_ids, task_finished, wait_for, Cluster};
use std::collections::BTreeSet;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

async fn submit(cluster: &Cluster, spec: pb::TaskSpec) -> anyhow::Result<u64> {
    colony_tests::submit_task(&cluster.addrs(), spec).await
}

async fn cancel(cluster: &Cluster, id: u64) -> anyhow::Result<()> {
    let mut c = colony_tests::client(&cluster.servers[0].addr).await?;
    c.cancel_task(pb::CancelTaskRequest { id, reason: String::new() }).await?;
    Ok(())
}

/// A task with idempotency key `key` that no executor can take (it stays pending until cancelled).
fn unplaceable(key: &str) -> pb::TaskSpec {
    let mut spec = colony_tests::task_spec("c", Some(key.to_owned()));
    spec.labels.insert("zone".to_owned(), "nowhere".to_owned());
    spec
}

/// Waits until every server's own applied state holds none of `gone` and all of `kept`.
async fn wait_on_every_server(
    cluster: &Cluster,
    gone: &BTreeSet<u64>,
    kept: &BTreeSet<u64>,
) -> anyhow::Result<()> {
    for server in &cluster.servers {
        let what = format!("server {} to drop {gone:?} and keep {kept:?}", server.id);
        wait_for(&what, LONG, || async {
            let ids: BTreeSet<u64> = local_task_ids(&server.addr).await?.into_iter().collect();
            Ok((ids.is_disjoint(gone) && ids.is_superset(kept)).then_some(()))
        })
        .await?;
    }
    Ok(())
}

/// Waits until every server reports the same state digest at the same applied index.
async fn wait_for_equal_digests(cluster: &Cluster) -> anyhow::Result<()> {
    wait_for("every server at the same state digest", LONG, || async {
        let mut digests = BTreeSet::new();
        for server in &cluster.servers {
            let mut c = colony_tests::client(&server.addr).await?;
            let d = c.state_digest(pb::StateDigestRequest {}).await?.into_inner();
            digests.insert((d.applied_index, d.sha256));
        }
        Ok((digests.len() == 1).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_exactly_what_it_should_on_every_replica() -> anyhow::Result<()> {
    let mut cluster = Cluster::start_with(3, 20_000, &["--task-retention", "3s"]).await?;
    cluster.add_executor("2", "2Gi", &[]).await?;
    cluster.wait_for_executors_up(1, LONG).await?;

    // `upstream` succeeds; `downstream` also waits on `never`, which nothing can place.
    let upstream =
        submit(&cluster, colony_tests::shell_task("upstream", "true", 100, 64, 10, 0)).await?;
    colony_tests::wait_task(&cluster.addrs(), upstream, "to succeed", LONG, |t| {
        colony_tests::task_state(t) == pb::TaskState::Succeeded
    })
    .await?;
    let never = submit(&cluster, unplaceable("never")).await?;
    let mut downstream = colony_tests::shell_task("downstream", "true", 100, 64, 10, 0);
    downstream.dependencies = vec![upstream, never];
    let downstream = submit(&cluster, downstream).await?;

    // Cancelled tasks with idempotency keys: finished, and due to go after 3 s.
    let mut cancelled = BTreeSet::new();
    for i in 0..20 {
        let id = submit(&cluster, unplaceable(&format!("retained-{i}"))).await?;
        cancel(&cluster, id).await?;
        cancelled.insert(id);
    }
    let held: BTreeSet<u64> = [upstream, never, downstream].into();
    wait_on_every_server(&cluster, &cancelled, &held).await?;
    wait_for_equal_digests(&cluster).await?;

    // The key of a removed task is free: the same key makes a new task.
    let again = submit(&cluster, unplaceable("retained-0")).await?;
    assert!(again > downstream, "a removed task's key made task {again}");

    // A feed cursor behind retention is told where to resume.
    let mut c = colony_tests::client(&cluster.servers[1].addr).await?;
    let refused = match c.watch_finished_tasks(pb::WatchFinishedTasksRequest { after_seq: 1 }).await
    {
        Ok(mut stream) => stream.get_mut().message().await.err(),
        Err(status) => Some(status),
    };
    let refused = refused.ok_or_else(|| anyhow::anyhow!("a cursor behind retention was served"))?;
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    let resume: u64 = refused
        .metadata()
        .get(colony_proto::RESUME_AFTER_SEQ)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no resume point in {refused:?}"))?;
    assert!(resume > 1, "resume after {resume}");

    // Once `never` is cancelled, `downstream` ends with it, and all three go.
    cancel(&cluster, never).await?;
    colony_tests::wait_task(&cluster.addrs(), downstream, "to end", LONG, task_finished).await?;
    wait_on_every_server(&cluster, &held, &BTreeSet::new()).await?;
    wait_for_equal_digests(&cluster).await?;

    let leader = cluster.wait_for_leader(LONG).await?;
    let metrics = colony_tests::http_get(&cluster.servers[leader].metrics_addr, "/metrics")?.1;
    let removed = colony_tests::sample(&metrics, "colony_retention_removed_total{kind=\"tasks\"}");
    assert!(removed.is_some_and(|n| n >= 23.0), "removed tasks: {removed:?}");
    Ok(())
}
