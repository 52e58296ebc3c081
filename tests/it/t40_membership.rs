//! Add a fourth server and remove one while clients keep submitting.

use colony_proto::pb;
use colony_tests::{client, task_spec, wait_for, wait_for_exact_tasks, Cluster};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_and_shrink_while_submitting() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let addrs = cluster.addrs();
    let submitter = {
        let (stop, acked) = (stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let spec = task_spec("member-change", Some(format!("mc-{n}")));
                let mut attempt = n as usize;
                loop {
                    attempt += 1;
                    let mut c = client(&addrs[attempt % addrs.len()]).await?;
                    match c.submit_task(pb::SubmitTaskRequest { spec: Some(spec.clone()) }).await {
                        Ok(reply) => {
                            acked.lock().unwrap().extend(reply.into_inner().task.map(|t| t.id));
                            break;
                        }
                        Err(status)
                            if matches!(
                                status.code(),
                                tonic::Code::InvalidArgument | tonic::Code::AlreadyExists
                            ) =>
                        {
                            anyhow::bail!("submit refused during membership change: {status}")
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            }
            anyhow::Ok(())
        })
    };

    let fourth = cluster.add_server(false).await?;
    cluster
        .wait_for_voters(4, Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;

    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let removed = (0..3).find(|&i| i != leader).expect("a follower");
    let removed_id = cluster.servers[removed].id;
    let mut via_new = cluster.servers[fourth].client().await?;
    let reply =
        via_new.remove_node(pb::RemoveNodeRequest { node_id: removed_id }).await?.into_inner();
    assert!(
        !reply.voters.contains(&removed_id) && reply.voters.len() == 3,
        "voters after removal: {:?}",
        reply.voters
    );
    cluster.servers[removed].terminate()?;
    cluster.wait_for_voters(3, Duration::from_secs(30)).await?;

    let before = acked.lock().unwrap().len();
    wait_for("submissions to continue after the change", Duration::from_secs(20), || {
        let acked = acked.clone();
        async move { Ok((acked.lock().unwrap().len() >= before + 50).then_some(())) }
    })
    .await?;
    stop.store(true, Ordering::SeqCst);
    submitter.await??;

    let expected = acked.lock().unwrap().clone();
    for server in cluster.servers.iter().filter(|s| s.id != removed_id) {
        wait_for_exact_tasks(server, &expected, Duration::from_secs(30)).await?;
    }
    let status = cluster.servers[fourth].status().await?;
    assert!(
        status.members.iter().all(|m| m.id != removed_id),
        "removed server still listed: {:?}",
        status.members
    );
    Ok(())
}
