//! kill -9 the leader in the middle of 1,000 submissions: nothing acknowledged is lost. And the
//! same with SIGTERM, where the leader hands leadership over before it goes.

use colony_proto::pb;
use colony_tests::{client, task_spec, wait_for, wait_for_exact_tasks, Cluster};
use rand::Rng;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TASKS: usize = 1000;
const WORKERS: usize = 8;

/// Submits with `key` through random servers until some server acknowledges it.
async fn submit_until_acked(addrs: &[String], key: String) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let addr = &addrs[rand::thread_rng().gen_range(0..addrs.len())];
        let mut c = client(addr).await?;
        let request = pb::SubmitTaskRequest { spec: Some(task_spec("durable", Some(key.clone()))) };
        match tokio::time::timeout(Duration::from_secs(5), c.submit_task(request)).await {
            Ok(Ok(reply)) => return Ok(reply.into_inner().task.map(|t| t.id).unwrap_or(0)),
            Ok(Err(status))
                if matches!(
                    status.code(),
                    tonic::Code::InvalidArgument | tonic::Code::AlreadyExists
                ) =>
            {
                anyhow::bail!("submission {key} refused: {status}")
            }
            _ if Instant::now() > deadline => anyhow::bail!("submission {key} never acknowledged"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    Kill,
    Term,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_leader_mid_stream_loses_nothing() -> anyhow::Result<()> {
    stop_leader_mid_stream(Stop::Kill).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_leader_hands_over_and_loses_nothing() -> anyhow::Result<()> {
    stop_leader_mid_stream(Stop::Term).await
}

async fn stop_leader_mid_stream(stop: Stop) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    let addrs = cluster.addrs();
    let acked: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let acks = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let first_ack_after_kill: Arc<Mutex<Option<Instant>>> = Arc::default();

    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (addrs, acked, acks, next) = (addrs.clone(), acked.clone(), acks.clone(), next.clone());
        let (killed_at, first_ack_after_kill) = (killed_at.clone(), first_ack_after_kill.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= TASKS {
                    return anyhow::Ok(());
                }
                let invoked = Instant::now();
                let id = submit_until_acked(&addrs, format!("kill-test-{n}")).await?;
                // Only a write invoked after the kill proves a new leader is serving.
                if killed_at.lock().unwrap().is_some_and(|k| invoked > k) {
                    let acked_at = Instant::now();
                    let mut first = first_ack_after_kill.lock().unwrap();
                    if first.is_none_or(|f| acked_at < f) {
                        *first = Some(acked_at);
                    }
                }
                acked.lock().unwrap().insert(id);
                acks.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    wait_for("300 acknowledged submissions", Duration::from_secs(60), || {
        let acks = acks.clone();
        async move { Ok((acks.load(Ordering::SeqCst) >= 300).then_some(())) }
    })
    .await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(5)).await?;
    match stop {
        Stop::Kill => {
            cluster.servers[leader].kill9();
            *killed_at.lock().unwrap() = Some(Instant::now());
        }
        Stop::Term => {
            let status = tokio::task::block_in_place(|| cluster.servers[leader].terminate())?;
            // Writes invoked once the old process is gone can only be acknowledged by another.
            *killed_at.lock().unwrap() = Some(Instant::now());
            assert!(status.success(), "the leader must stop cleanly on SIGTERM, got {status}");
            let log = cluster.servers[leader].log();
            assert!(
                log.contains("handed leadership over to node"),
                "the stopping leader did not hand over:\n{log}"
            );
        }
    }

    for worker in workers {
        worker.await??;
    }
    let kill = killed_at.lock().unwrap().expect("killed");
    let recovery = first_ack_after_kill.lock().unwrap().map(|t| t - kill);
    println!("leader {stop:?} -> first acknowledged write invoked after it: {recovery:?}");
    assert!(recovery.is_some(), "no write was acknowledged after the leader was stopped");

    cluster.servers[leader].restart()?;
    let acked: BTreeSet<u64> = acked.lock().unwrap().clone();
    assert_eq!(
        acked.len(),
        TASKS,
        "every submission has its own task (idempotency keys deduplicate retries)"
    );
    for server in &cluster.servers {
        wait_for_exact_tasks(server, &acked, Duration::from_secs(30))
            .await
            .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    }
    Ok(())
}
