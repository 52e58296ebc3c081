//! Containment with real executor processes: limits that hold (an OOM kill is its own outcome
//! and harms nothing else), kills that reach processes that left the process group, tasks that
//! cannot see the executor's key or environment, GPU indices never shared, output that never
//! breaks a session, leftovers killed after `kill -9`, and unplaceable tasks that never block
//! placeable ones.

use colony_proto::pb;
use colony_tests::{task_finished, wait_for, Cluster};
use std::path::Path;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

/// A `/bin/sh -c SCRIPT` task of 100m, without retries.
fn shell(name: &str, script: &str, memory_mib: u64, priority: u32) -> pb::TaskSpec {
    colony_tests::shell_task(name, script, 100, memory_mib, priority, 0)
}

async fn submit(cluster: &Cluster, spec: pb::TaskSpec) -> anyhow::Result<u64> {
    colony_tests::submit_task(&cluster.addrs(), spec).await
}

/// Submits through one client, kept open: for a burst of submissions.
async fn submit_with(client: &colony_client::Client, spec: pb::TaskSpec) -> anyhow::Result<u64> {
    let request = pb::SubmitTaskRequest { spec: Some(spec) };
    let response = client
        .call("submit", |mut c| {
            let request = request.clone();
            async move { c.submit_task(request).await }
        })
        .await?;
    response.task.map(|t| t.id).ok_or_else(|| anyhow::anyhow!("no task in the answer"))
}

async fn wait_task(
    cluster: &Cluster,
    id: u64,
    what: &str,
    done: impl Fn(&pb::Task) -> bool,
) -> anyhow::Result<pb::Task> {
    colony_tests::wait_task(&cluster.addrs(), id, what, LONG, done).await
}

async fn run_to_end(cluster: &Cluster, spec: pb::TaskSpec) -> anyhow::Result<pb::Task> {
    let id = submit(cluster, spec).await?;
    wait_task(cluster, id, "to finish", task_finished).await
}

/// Whether `pid` runs (a zombie awaiting its reaper counts as gone).
fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
    !matches!(state, None | Some('Z' | 'X'))
}

/// The pid a task wrote to `pid_file`.
async fn pid_in(pid_file: &Path) -> anyhow::Result<i32> {
    wait_for(&format!("a pid in {}", pid_file.display()), LONG, || async {
        Ok(std::fs::read_to_string(pid_file).ok().and_then(|t| t.trim().parse().ok()))
    })
    .await
}

async fn wait_gone(pid: i32) -> anyhow::Result<()> {
    wait_for(&format!("process {pid} to be killed"), Duration::from_secs(10), || async {
        Ok((!alive(pid)).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_are_contained() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1, 20_000).await?;
    cluster.add_executor("4", "4Gi", &["--gpus", "2"]).await?;
    cluster.wait_for_executors_up(1, LONG).await?;
    let executor = &cluster.executors[0];
    let metrics = colony_tests::http_get(&executor.metrics_addr, "/metrics")?.1;
    for controller in ["memory", "cpu", "pids"] {
        let name = format!("colony_executor_limits_enforced{{controller=\"{controller}\"}}");
        assert_eq!(colony_tests::sample(&metrics, &name), Some(1.0), "{controller} enforced");
    }

    // A task far over its memory ends oom_killed; the executor and later tasks are unharmed.
    let hog = "python3 -c 'b = bytearray(4 << 30)'";
    let oom = run_to_end(&cluster, shell("hog", hog, 64, 10)).await?;
    assert_eq!(oom.state(), pb::TaskState::Failed, "{oom:?}");
    let reason = oom.reason.clone().unwrap_or_default();
    assert!(reason.starts_with("oom_killed"), "{reason}");
    assert!(reason.contains("memory limit of 64.0 MiB"), "{reason}");
    let after = run_to_end(&cluster, shell("after-oom", "echo fine", 64, 10)).await?;
    assert_eq!(after.state(), pb::TaskState::Succeeded, "{after:?}");

    // The executor's key and environment are out of reach.
    let identity = cluster.executors[0].data_dir.join("identity.json");
    let peek = format!("cat {} ../../identity.json; env", identity.display());
    let peeked = run_to_end(&cluster, shell("peek", &peek, 64, 10)).await?;
    assert!(peeked.stderr_tail.contains("Permission denied"), "{peeked:?}");
    assert!(!peeked.stdout_tail.contains("PRIVATE KEY"), "{peeked:?}");
    assert!(!peeked.stdout_tail.contains("COLONY_TEST_EXECUTOR_ONLY"), "{}", peeked.stdout_tail);
    assert!(!peeked.stdout_tail.contains("RUST_LOG"), "{}", peeked.stdout_tail);
    assert!(peeked.stdout_tail.contains("COLONY_TASK_ID="), "{}", peeked.stdout_tail);
    let whoami = run_to_end(&cluster, shell("whoami", "id -u", 64, 10)).await?;
    assert_eq!(whoami.stdout_tail.trim(), "65534", "tasks run as nobody");

    // Binary output and a 6,000-byte program name: reports that fit, a session that stays.
    let binary = run_to_end(&cluster, shell("binary", "head -c 8192 /dev/urandom", 64, 10)).await?;
    assert_eq!(binary.state(), pb::TaskState::Succeeded, "{:?}", binary.reason);
    assert!(binary.stdout_tail.len() <= 4096, "{} bytes", binary.stdout_tail.len());
    let mut long_name = shell("long-name", "", 64, 10);
    long_name.run = Some(pb::task_spec::Run::Process(pb::ProcessRun {
        program: format!("/{}", "x".repeat(6000)),
        args: vec![],
        env: Default::default(),
    }));
    let long_name = run_to_end(&cluster, long_name).await?;
    assert_eq!(long_name.state(), pb::TaskState::Failed);
    let reason = long_name.reason.unwrap_or_default();
    assert!(reason.len() <= 4096 && reason.ends_with("[truncated]"), "{} bytes", reason.len());
    let later = run_to_end(&cluster, shell("later", "echo still here", 64, 10)).await?;
    assert_eq!(later.state(), pb::TaskState::Succeeded);
    let metrics = colony_tests::http_get(&cluster.executors[0].metrics_addr, "/metrics")?.1;
    assert_eq!(
        colony_tests::sample(&metrics, "colony_executor_reconnects_total"),
        Some(0.0),
        "the session was never dropped"
    );

    // GPU indices: two attempts at once never share one; one without GPUs sees none.
    let mut gpu_ids = Vec::new();
    for i in 0..2 {
        let script = "echo \"[$CUDA_VISIBLE_DEVICES]\"; sleep 1";
        let mut spec = shell(&format!("gpu-{i}"), script, 64, 10);
        if let Some(r) = spec.resources.as_mut() {
            r.gpus = 1;
        }
        gpu_ids.push(submit(&cluster, spec).await);
    }
    let mut seen = Vec::new();
    for id in gpu_ids {
        let task = wait_task(&cluster, id?, "to finish", task_finished).await?;
        seen.push(task.stdout_tail.trim().to_owned());
    }
    seen.sort();
    assert_eq!(seen, ["[0]", "[1]"]);
    let none =
        run_to_end(&cluster, shell("no-gpu", "echo \"[$CUDA_VISIBLE_DEVICES]\"", 64, 10)).await?;
    assert_eq!(none.stdout_tail.trim(), "[]");

    // Cancel kills a process that called setsid.
    let escaped = cluster.task_writable("escaped")?;
    let script = format!("setsid sleep 300 & echo $! > {}; wait", escaped.display());
    let id = submit(&cluster, shell("escape", &script, 64, 10)).await?;
    // Running is reported as the attempt starts: its shell may not have written the pid yet,
    // and a cancel before it does would leave nothing to look for.
    let pid = pid_in(&escaped).await?;
    let client = cluster.any_server(Duration::from_secs(5))?;
    let cancel = pb::CancelTaskRequest { id, reason: "t97".to_owned() };
    client
        .call("cancel", |mut c| {
            let cancel = cancel.clone();
            async move { c.cancel_task(cancel).await }
        })
        .await?;
    wait_gone(pid).await?;

    // After kill -9 of the executor, its restart kills what its attempts left running.
    let orphan = cluster.task_writable("orphan")?;
    let script = format!("setsid sleep 300 & echo $! > {}; wait", orphan.display());
    let id = submit(&cluster, shell("orphan", &script, 64, 10)).await?;
    wait_task(&cluster, id, "to run", |t| t.state() == pb::TaskState::Running).await?;
    let pid = pid_in(&orphan).await?;
    cluster.executors[0].kill9();
    assert!(alive(pid), "the orphan outlives its executor's kill -9 (until the restart)");
    cluster.executors[0].start()?;
    wait_gone(pid).await?;
    cluster.wait_for_executors_up(1, LONG).await?;

    // 600 high-priority tasks no executor can run never hold back one that fits.
    let client = cluster.any_server(Duration::from_secs(5))?;
    for i in 0..600 {
        let mut spec = shell(&format!("unplaceable-{i}"), "true", 64, 1000);
        spec.capabilities.push("quantum".to_owned());
        submit_with(&client, spec).await?;
    }
    let low = submit(&cluster, shell("placeable", "true", 64, 0)).await?;
    let low = wait_task(&cluster, low, "to start", |t| t.started_unix_ms.is_some()).await?;
    let waited = low.started_unix_ms.unwrap_or_default().saturating_sub(low.created_unix_ms);
    assert!(waited <= 2_000, "the placeable task waited {waited} ms behind unplaceable ones");
    Ok(())
}

/// `colony executor ARGS` on a host without cgroups: a private mount namespace where the cgroup
/// hierarchies are unmounted (the host's stay as they are).
fn executor_without_cgroups(args: &[String]) -> anyhow::Result<std::process::Child> {
    let colony = colony_tests::colony_bin();
    Ok(std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("umount -R /sys/fs/cgroup && exec \"$0\" \"$@\"")
        .arg(colony)
        .arg("executor")
        .args(args)
        .arg("--parent-pid")
        .arg(std::process::id().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_cgroups_is_refused_unless_allowed() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, 20_000).await?;
    let token = cluster.join_token().await?;
    let data_dir = |name: &str| cluster.dir.path().join(name).display().to_string();
    let mut args = vec![
        "--join".to_owned(),
        cluster.addrs()[0].clone(),
        "--token".to_owned(),
        token,
        "--capability".to_owned(),
        "shell".to_owned(),
    ];

    // Required (the default): refused at start-up, naming what is missing, before joining.
    let refused = executor_without_cgroups(
        &[args.clone(), vec!["--data-dir".to_owned(), data_dir("refused")]].concat(),
    )?;
    let output = tokio::task::spawn_blocking(move || refused.wait_with_output()).await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "an executor without cgroups started: {stderr}");
    assert!(stderr.contains("no usable cgroup memory, cpu, pids controller"), "{stderr}");
    assert!(stderr.contains("--require-limits=false"), "{stderr}");
    assert!(cluster.executors().await?.is_empty(), "the refused executor joined");

    // Allowed: it runs tasks unlimited and says so in /metrics.
    let metrics_addr = format!("127.0.0.1:{}", colony_tests::free_port());
    args.extend([
        "--data-dir".to_owned(),
        data_dir("allowed"),
        "--require-limits=false".to_owned(),
        "--metrics-listen".to_owned(),
        metrics_addr.clone(),
    ]);
    let mut allowed = executor_without_cgroups(&args)?;
    let result = async {
        cluster.wait_for_executors_up(1, LONG).await?;
        let metrics = colony_tests::http_get(&metrics_addr, "/metrics")?.1;
        for controller in ["memory", "cpu", "pids"] {
            let name = format!("colony_executor_limits_enforced{{controller=\"{controller}\"}}");
            assert_eq!(colony_tests::sample(&metrics, &name), Some(0.0), "{controller}");
        }
        let ran = run_to_end(&cluster, shell("unlimited", "echo ran", 64, 10)).await?;
        assert_eq!(ran.stdout_tail.trim(), "ran", "{ran:?}");
        anyhow::Ok(())
    }
    .await;
    let _ = allowed.kill();
    let _ = allowed.wait();
    result
}
