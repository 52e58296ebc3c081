//! Real executors run real processes: 300 tasks of mixed sizes and priorities survive kill -9 of an
//! executor and of the leader, no attempt runs on two executors, and no executor is ever over
//! capacity; then dependencies, retries, deadlines, timeouts, preemption and drain, one by one.

use colony_proto::pb;
use colony_tests::{
    client, get_task as get, shell_task as shell, submit_task as submit, task_finished as finished,
    task_state as state, wait_for, wait_task, Cluster,
};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TASKS: usize = 300;

/// Lines `task attempt token executor` appended by every attempt that started.
fn read_ledger(path: &Path) -> Vec<(u64, u64, u64, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let fields: Vec<u64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
            (fields.len() == 4).then(|| (fields[0], fields[1], fields[2], fields[3]))
        })
        .collect()
}

/// Samples the leader's executor table until stopped; fails on any executor over capacity.
async fn watch_capacity(addrs: Vec<String>, stop: Arc<AtomicBool>) -> anyhow::Result<usize> {
    let mut samples = 0;
    while !stop.load(Ordering::Relaxed) {
        for addr in &addrs {
            let mut c = client(addr).await?;
            let Ok(Ok(reply)) = tokio::time::timeout(
                Duration::from_secs(2),
                c.list_executors(pb::ListExecutorsRequest::default()),
            )
            .await
            else {
                continue;
            };
            for e in reply.into_inner().executors {
                let (cap, used) = (e.capacity.unwrap_or_default(), e.allocated.unwrap_or_default());
                anyhow::ensure!(
                    used.cpu_millis <= cap.cpu_millis
                        && used.memory_bytes <= cap.memory_bytes
                        && used.gpus <= cap.gpus,
                    "executor {} over capacity: {used:?} of {cap:?}",
                    e.id
                );
            }
            samples += 1;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(samples)
}

enum Fault {
    KillExecutor,
    KillLeader,
}

async fn run_workload(fault: Fault) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    for _ in 0..3 {
        cluster.add_executor("2", "2Gi", &[]).await?;
    }
    cluster.wait_for_executors_up(3, Duration::from_secs(30)).await?;
    let addrs = cluster.addrs();
    let ledger = cluster.task_writable("ledger")?;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_capacity(addrs.clone(), stop.clone()));

    let mut rng = rand::rngs::StdRng::seed_from_u64(80);
    let mut ids = Vec::with_capacity(TASKS);
    for i in 0..TASKS {
        let cpu = [100, 250, 500, 1000][rng.gen_range(0..4)];
        let memory = [64, 128, 256][rng.gen_range(0..3)];
        let sleep = ["0.05", "0.1", "0.2", "0.4"][rng.gen_range(0..4)];
        let priority = rng.gen_range(0..=1000);
        let script = format!(
            "echo \"$COLONY_TASK_ID $COLONY_ATTEMPT $COLONY_FENCING_TOKEN $COLONY_EXECUTOR_ID\" >> {}; sleep {sleep}",
            ledger.display()
        );
        ids.push(
            submit(&addrs, shell(&format!("mixed-{i}"), &script, cpu, memory, priority, 5)).await?,
        );
    }

    // Strike once a third of the work is done.
    wait_for("100 tasks to succeed", Duration::from_secs(120), || async {
        let mut c = client(&addrs[0]).await?;
        let status = c.cluster_status(pb::ClusterStatusRequest {}).await?.into_inner();
        Ok((status.tasks_by_state.get("succeeded").copied().unwrap_or(0) >= 100).then_some(()))
    })
    .await?;
    let mut stranded: Vec<u64> = Vec::new();
    let mut victim_id = 0;
    let victim = match fault {
        Fault::KillExecutor => {
            let busiest = cluster
                .executors()
                .await?
                .into_iter()
                .max_by_key(|e| e.tasks.len())
                .expect("three executors");
            (stranded, victim_id) = (busiest.tasks.clone(), busiest.id);
            let executor = cluster
                .executors
                .iter_mut()
                .find(|e| e.name == busiest.name)
                .expect("the executor exists");
            executor.kill9();
            format!("executor {}", busiest.name)
        }
        Fault::KillLeader => {
            let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
            cluster.servers[leader].kill9();
            format!("leader (server {})", cluster.servers[leader].id)
        }
    };
    let killed_at = Instant::now();
    let live_addrs: Vec<String> =
        cluster.servers.iter_mut().filter_map(|s| s.is_running().then(|| s.addr.clone())).collect();
    // How long until the attempts the dead executor held run elsewhere (reported, not asserted:
    // speed is the benchmark's business).
    for &id in &stranded {
        wait_task(&live_addrs, id, "to run elsewhere", Duration::from_secs(60), |t| {
            finished(t) || (t.executor_id != Some(victim_id) && state(t) == pb::TaskState::Running)
        })
        .await?;
    }
    let moved_after = killed_at.elapsed();

    let mut tasks = Vec::with_capacity(TASKS);
    for &id in &ids {
        tasks.push(
            wait_task(&live_addrs, id, "to finish", Duration::from_secs(180), finished)
                .await
                .map_err(|e| anyhow::anyhow!("{e:#}\n{}", cluster.logs()))?,
        );
    }
    let drained_after = killed_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let samples = watcher.await??;

    let not_succeeded: Vec<String> = tasks
        .iter()
        .filter(|t| state(t) != pb::TaskState::Succeeded)
        .map(|t| format!("{} {:?} {:?}", t.id, state(t), t.reason))
        .collect();
    assert!(
        not_succeeded.is_empty(),
        "after killing the {victim}, tasks did not succeed: {not_succeeded:?}"
    );
    // Exactly one executor per fencing token: an attempt never ran on two executors.
    let mut runs: BTreeMap<(u64, u64), BTreeSet<u64>> = BTreeMap::new();
    for (task, _attempt, token, executor) in read_ledger(&ledger) {
        runs.entry((task, token)).or_default().insert(executor);
    }
    let doubled: Vec<_> = runs.iter().filter(|(_, executors)| executors.len() > 1).collect();
    assert!(doubled.is_empty(), "attempts ran on two executors: {doubled:?}");
    let ran: BTreeSet<u64> = runs.keys().map(|(task, _)| *task).collect();
    assert_eq!(ran.len(), TASKS, "every task ran at least once");
    assert!(samples >= 10, "the capacity watcher took only {samples} samples");
    let retried = tasks.iter().filter(|t| t.attempt > 1).count();
    let moved = if stranded.is_empty() {
        String::new()
    } else {
        format!("its {} attempts ran elsewhere {moved_after:.1?} later; ", stranded.len())
    };
    eprintln!(
        "killed the {victim}: {moved}all {TASKS} tasks succeeded {drained_after:.1?} later; \
         {retried} needed another attempt (preemption or loss); {samples} capacity samples, none over"
    );
    let down: Vec<String> = cluster
        .executors()
        .await?
        .into_iter()
        .filter(|e| e.state == "down")
        .map(|e| e.name)
        .collect();
    match fault {
        Fault::KillExecutor => {
            assert_eq!(down.len(), 1, "exactly the killed executor is declared down: {down:?}")
        }
        Fault::KillLeader => assert!(
            down.is_empty(),
            "a leader change must not declare healthy executors down: {down:?}"
        ),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_survive_an_executor_killed_mid_run() -> anyhow::Result<()> {
    run_workload(Fault::KillExecutor).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_survive_the_leader_killed_mid_run() -> anyhow::Result<()> {
    run_workload(Fault::KillLeader).await
}

async fn small_cluster(executors: &[(&str, &str)]) -> anyhow::Result<Cluster> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    for (cpu, memory) in executors {
        cluster.add_executor(cpu, memory, &[]).await?;
    }
    cluster.wait_for_executors_up(executors.len(), Duration::from_secs(30)).await?;
    Ok(cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependencies_retries_deadlines_and_timeouts() -> anyhow::Result<()> {
    let cluster = small_cluster(&[("2", "2Gi")]).await?;
    let addrs = cluster.addrs();
    let long = Duration::from_secs(60);

    // A fan-out, fan-in pipeline runs in dependency order.
    let build = submit(&addrs, shell("build", "echo built", 100, 64, 10, 0)).await?;
    let mut test_a = shell("test-a", "echo a", 100, 64, 10, 0);
    test_a.dependencies = vec![build];
    let test_a = submit(&addrs, test_a).await?;
    let mut test_b = shell("test-b", "echo b", 100, 64, 10, 0);
    test_b.dependencies = vec![build];
    let test_b = submit(&addrs, test_b).await?;
    let mut report = shell("report", "echo report", 100, 64, 10, 0);
    report.dependencies = vec![test_a, test_b];
    let report = submit(&addrs, report).await?;
    let report = wait_task(&addrs, report, "to finish", long, finished).await?;
    assert_eq!(state(&report), pb::TaskState::Succeeded);
    for dependency in [test_a, test_b] {
        let dependency = get(&addrs, dependency).await?;
        assert!(
            report.started_unix_ms >= dependency.finished_unix_ms,
            "report started before a dependency finished"
        );
    }
    assert_eq!(report.stdout_tail.trim(), "report", "the output tail is kept with the task");

    // A failure cancels its dependents.
    let broken = submit(&addrs, shell("broken", "echo oops >&2; exit 3", 100, 64, 10, 0)).await?;
    let mut after = shell("after-broken", "echo never", 100, 64, 10, 0);
    after.dependencies = vec![broken];
    let after = submit(&addrs, after).await?;
    let broken = wait_task(&addrs, broken, "to finish", long, finished).await?;
    assert_eq!((state(&broken), broken.exit_code), (pb::TaskState::Failed, Some(3)));
    assert_eq!(broken.stderr_tail.trim(), "oops");
    let after = wait_task(&addrs, after, "to finish", long, finished).await?;
    assert_eq!(state(&after), pb::TaskState::Cancelled);

    // A failed attempt is retried, and the second one succeeds.
    let flaky =
        submit(&addrs, shell("flaky", "[ \"$COLONY_ATTEMPT\" -ge 2 ]", 100, 64, 10, 2)).await?;
    let flaky = wait_task(&addrs, flaky, "to finish", long, finished).await?;
    assert_eq!(
        (state(&flaky), flaky.attempt, flaky.retries_used),
        (pb::TaskState::Succeeded, 2, 1)
    );

    // A task no executor can take stays pending with the reason, then misses its deadline.
    let mut huge = shell("huge", "true", 100, 64 << 10, 10, 0);
    huge.deadline_unix_ms = Some(colony_process::unix_ms() + 3000);
    let huge = submit(&addrs, huge).await?;
    let pending =
        wait_task(&addrs, huge, "to be marked unschedulable", long, |t| t.reason.is_some()).await?;
    assert_eq!(state(&pending), pb::TaskState::Pending);
    assert_eq!(pending.reason.as_deref(), Some("unschedulable: no executor has 64Gi memory"));
    let huge = wait_task(&addrs, huge, "to time out", long, finished).await?;
    assert_eq!(
        (state(&huge), huge.reason.as_deref()),
        (pb::TaskState::TimedOut, Some("not started by its deadline"))
    );

    // A running attempt past its timeout is killed.
    let mut slow = shell("slow", "sleep 30", 100, 64, 10, 0);
    slow.timeout_ms = Some(1000);
    let slow = submit(&addrs, slow).await?;
    let slow = wait_task(&addrs, slow, "to time out", long, finished).await?;
    assert_eq!(state(&slow), pb::TaskState::TimedOut, "{:?}", slow.reason);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_preempts_without_spending_a_retry() -> anyhow::Result<()> {
    let cluster = small_cluster(&[("1", "1Gi")]).await?;
    let addrs = cluster.addrs();
    let long = Duration::from_secs(60);
    let low = submit(&addrs, shell("low", "sleep 30", 1000, 64, 100, 0)).await?;
    wait_task(&addrs, low, "to run", long, |t| state(t) == pb::TaskState::Running).await?;
    // A gap below the minimum (100) does not preempt.
    let close = submit(&addrs, shell("close", "true", 1000, 64, 150, 0)).await?;
    let high = submit(&addrs, shell("high", "echo high", 1000, 64, 900, 0)).await?;
    let high = wait_task(&addrs, high, "to finish", long, finished).await?;
    assert_eq!(state(&high), pb::TaskState::Succeeded);
    let low =
        wait_task(&addrs, low, "to be placed again after its eviction", long, |t| t.attempt >= 2)
            .await?;
    assert_eq!(low.retries_used, 0, "eviction spends no retry");
    let close = wait_task(&addrs, close, "to finish", long, finished).await?;
    assert_eq!(state(&close), pb::TaskState::Succeeded);
    assert!(
        close.started_unix_ms >= high.finished_unix_ms,
        "a priority gap below the minimum must not preempt"
    );
    for id in [low.id, close.id] {
        let mut c = client(&addrs[0]).await?;
        let _ = c.cancel_task(pb::CancelTaskRequest { id, reason: "test over".into() }).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_work_away_and_refuses_bad_requests() -> anyhow::Result<()> {
    let cluster = small_cluster(&[("1", "1Gi"), ("1", "1Gi")]).await?;
    let addrs = cluster.addrs();
    let long = Duration::from_secs(60);
    let sleeper = submit(&addrs, shell("sleeper", "sleep 60", 1000, 64, 10, 0)).await?;
    let running =
        wait_task(&addrs, sleeper, "to run", long, |t| state(t) == pb::TaskState::Running).await?;
    let drained = running.executor_id.expect("a running task has an executor");
    let mut c = client(&addrs[0]).await?;
    c.drain_executor(pb::DrainExecutorRequest { id: drained, deadline_ms: 1000 }).await?;
    let moved = wait_task(&addrs, sleeper, "to run elsewhere", long, |t| {
        t.executor_id.is_some_and(|e| e != drained) && state(t) == pb::TaskState::Running
    })
    .await?;
    assert_eq!((moved.attempt, moved.retries_used), (2, 0), "a drain eviction spends no retry");

    let again = c
        .drain_executor(pb::DrainExecutorRequest { id: drained, deadline_ms: 1000 })
        .await
        .expect_err("a second drain is refused");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again}");
    assert!(again.message().contains("draining"), "{again}");
    let unknown = c
        .drain_executor(pb::DrainExecutorRequest { id: 99, deadline_ms: 1000 })
        .await
        .expect_err("an unknown executor is refused");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown}");

    // Undrained, it takes work again: the other executor is full, so this task can only run there.
    c.undrain_executor(pb::UndrainExecutorRequest { id: drained }).await?;
    let up = cluster.executors().await?;
    assert!(up.iter().any(|e| e.id == drained && e.state == "up"), "{up:?}");
    let twice = c
        .undrain_executor(pb::UndrainExecutorRequest { id: drained })
        .await
        .expect_err("undraining an executor that is up is refused");
    assert_eq!(twice.code(), tonic::Code::FailedPrecondition, "{twice}");
    let back = submit(&addrs, shell("back", "sleep 60", 1000, 64, 10, 0)).await?;
    let back =
        wait_task(&addrs, back, "to run", long, |t| state(t) == pb::TaskState::Running).await?;
    assert_eq!(back.executor_id, Some(drained), "the undrained executor takes work again");
    for id in [sleeper, back.id] {
        c.cancel_task(pb::CancelTaskRequest { id, reason: "test over".into() }).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executors_with_bad_tokens_are_refused_clearly() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, 20_000).await?;
    let real = cluster.join_token().await?;
    let dir = cluster.dir.path();
    let run = |token: String, data: &str| {
        std::process::Command::new(colony_tests::colony_bin())
            .args(["executor", "--join", &cluster.addrs()[0], "--token", &token, "--data-dir"])
            .arg(dir.join(data))
            .output()
    };
    let garbage = run("not-a-token".into(), "g")?;
    assert!(!garbage.status.success());
    let text = String::from_utf8_lossy(&garbage.stderr);
    assert!(text.contains("error:") && text.contains("token"), "{text}");
    // Same CA pin, a secret the cluster never issued.
    let forged =
        format!("{}.{}", real.rsplit_once('.').map_or("", |(head, _)| head), "00".repeat(32));
    let forged = run(forged, "f")?;
    assert!(!forged.status.success());
    let text = String::from_utf8_lossy(&forged.stderr);
    assert!(text.contains("unknown, has expired"), "{text}");
    Ok(())
}
