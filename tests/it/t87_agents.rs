//! Long-running agents on a real cluster with real executors, through the `colony` CLI as a user
//! drives it: an instance that exits is restarted (with backoff); an instance whose executor is
//! killed with kill -9 is replaced on the other executor; a new spec rolls onto every instance;
//! scale up and down; stop; and bad specs (zero replicas, a placement no executor could ever
//! make) refused with a clear line.

use colony_tests::{wait_for, Cluster};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

fn refused(cluster: &Cluster, args: &[&str], expected: &str) {
    let out = cluster.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "`colony {}` was accepted", args.join(" "));
    assert!(
        stderr.contains(expected),
        "`colony {}`: {stderr:?} should mention {expected:?}",
        args.join(" ")
    );
}

fn agent(cluster: &Cluster, name: &str) -> serde_json::Value {
    let text = cluster.cli_ok(&["--output", "json", "agent", "get", name]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Waits until `check` holds for the agent's JSON; returns it.
async fn wait_agent(
    cluster: &Cluster,
    name: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let check = &check;
    wait_for(&format!("agent {name}: {what}"), LONG, || async move {
        let a = agent(cluster, name);
        Ok(check(&a).then_some(a))
    })
    .await
}

fn instances(a: &serde_json::Value) -> Vec<serde_json::Value> {
    a["instances"].as_array().cloned().unwrap_or_default()
}

fn all_running(a: &serde_json::Value, n: usize) -> bool {
    let i = instances(a);
    i.len() == n && i.iter().all(|i| i["state"] == "running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_restart_are_replaced_roll_scale_and_stop() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    for _ in 0..2 {
        cluster.add_executor("4", "4Gi", &[]).await?;
    }
    cluster.wait_for_executors_up(2, LONG).await?;

    // Restart: an instance that keeps failing is started again, with backoff.
    cluster.cli_ok(&[
        "agent",
        "run",
        "--name",
        "crasher",
        "--restart",
        "on-failure",
        "--backoff",
        "200ms",
        "--backoff-max",
        "400ms",
        "--",
        "/bin/sh",
        "-c",
        "sleep 0.3; exit 3",
    ]);
    let crasher = wait_agent(&cluster, "crasher", "3 restarts", |a| {
        instances(a).first().and_then(|i| i["restarts"].as_u64()).is_some_and(|r| r >= 3)
    })
    .await?;
    assert_eq!(crasher["restart"], "on-failure");
    cluster.cli_ok(&["agent", "stop", "crasher"]);

    // Two long-running instances, then the executor of one is killed: it is replaced elsewhere.
    cluster.cli_ok(&[
        "agent",
        "run",
        "--name",
        "researcher",
        "--replicas",
        "2",
        "--restart",
        "always",
        "--spread",
        "--",
        "/bin/sleep",
        "3600",
    ]);
    let running = wait_agent(&cluster, "researcher", "2 running", |a| all_running(a, 2)).await?;
    let first = &instances(&running)[0];
    let (victim_task, victim_executor) = (first["task"].as_u64(), first["executor"].as_u64());
    let executors = cluster.executors().await?;
    let victim_name = executors
        .iter()
        .find(|e| Some(e.id) == victim_executor)
        .map(|e| e.name.clone())
        .ok_or_else(|| anyhow::anyhow!("instance 0 runs on no known executor: {running:#}"))?;
    let victim = cluster
        .executors
        .iter()
        .position(|e| e.name == victim_name)
        .ok_or_else(|| anyhow::anyhow!("no executor process named {victim_name}"))?;
    cluster.executors[victim].kill9();
    let replaced = wait_agent(&cluster, "researcher", "instance 0 replaced and running", |a| {
        let i = &instances(a)[0];
        i["state"] == "running"
            && i["task"].as_u64() != victim_task
            && i["executor"].as_u64() != victim_executor
    })
    .await?;
    assert!(instances(&replaced)[0]["restarts"].as_u64() >= Some(1), "{replaced:#}");
    let table = cluster.cli_ok(&["agent", "list"]);
    assert!(table.contains("researcher") && table.contains("running"), "{table}");

    // A new spec rolls onto every instance; the old tasks end as replaced.
    let before: Vec<u64> = instances(&replaced).iter().filter_map(|i| i["task"].as_u64()).collect();
    cluster.cli_ok(&[
        "agent",
        "run",
        "--name",
        "researcher",
        "--replicas",
        "2",
        "--restart",
        "always",
        "--",
        "/bin/sleep",
        "3601",
    ]);
    let rolled =
        wait_agent(&cluster, "researcher", "both instances on version 2 and running", |a| {
            all_running(a, 2)
                && instances(a).iter().all(|i| i["version"] == 2 && i["replacing"].is_null())
        })
        .await?;
    assert_eq!(rolled["command"][1], "3601");
    for task in before {
        let text = cluster.cli_ok(&["--output", "json", "task", "get", &task.to_string()]);
        let task: serde_json::Value = serde_json::from_str(&text)?;
        assert_eq!(task["state"], "cancelled", "{task:#}");
        assert!(task["reason"].as_str().unwrap_or_default().contains("replaced"), "{task:#}");
    }

    // Scale up and down, then stop.
    cluster.cli_ok(&["agent", "scale", "researcher", "3"]);
    wait_agent(&cluster, "researcher", "3 running", |a| all_running(a, 3)).await?;
    cluster.cli_ok(&["agent", "scale", "researcher", "1"]);
    wait_agent(&cluster, "researcher", "1 instance", |a| instances(a).len() == 1).await?;
    let stopped = cluster.cli_ok(&["--output", "json", "agent", "stop", "researcher"]);
    let stopped: serde_json::Value = serde_json::from_str(&stopped)?;
    assert_eq!(stopped["state"], "stopped");
    assert!(instances(&stopped).is_empty());

    // Bad specs: refused, saying why, nothing created.
    refused(
        &cluster,
        &["agent", "run", "--name", "zero", "--replicas", "0", "--", "/bin/true"],
        "replicas",
    );
    refused(
        &cluster,
        &["agent", "run", "--name", "gpu-hungry", "--gpus", "4", "--", "/bin/true"],
        "no executor could ever run",
    );
    refused(&cluster, &["agent", "scale", "nobody", "2"], "does not exist");
    let all = cluster.cli_ok(&["--output", "json", "agent", "list"]);
    assert!(!all.contains("gpu-hungry") && !all.contains("\"zero\""), "{all}");
    Ok(())
}
