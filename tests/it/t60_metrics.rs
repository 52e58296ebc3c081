//! Every server serves Prometheus metrics that agree with what the cluster reports.

use colony_proto::pb;
use colony_tests::{http_get, sample, task_spec, wait_for, Cluster};
use anyhow::Context as _;
use std::time::Duration;

/// `promtool check metrics` (Prometheus's own linter) on an exposition; cluster/test.sh installs it.
fn promtool_accepts(exposition: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("promtool is required (cluster/test.sh installs Debian's prometheus package): {e}"))?;
    child.stdin.take().context("promtool stdin")?.write_all(exposition.as_bytes())?;
    let out = child.wait_with_output()?;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success() && report.trim().is_empty(), "promtool check metrics: {report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_cluster() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let mut c = cluster.servers[(leader + 1) % 3].client().await?;
    for n in 0..5 {
        c.submit_task(pb::SubmitTaskRequest { spec: Some(task_spec(&format!("m-{n}"), None)) }).await?;
    }

    for server in &cluster.servers {
        let status = server.status().await?;
        let addr = server.metrics_addr.clone();
        let text = wait_for(&format!("server {} to export 5 pending tasks", server.id), Duration::from_secs(10), || {
            let addr = addr.clone();
            async move {
                let (code, body) = http_get(&addr, "/metrics")?;
                anyhow::ensure!(code == 200, "/metrics answered {code}");
                Ok((sample(&body, "colony_tasks_pending") == Some(5.0)).then_some(body))
            }
        })
        .await?;
        assert_eq!(sample(&text, "colony_raft_term"), Some(status.term as f64), "server {}", server.id);
        let is_leader = if status.state == "leader" { 1.0 } else { 0.0 };
        assert_eq!(sample(&text, "colony_raft_is_leader"), Some(is_leader), "server {}", server.id);
        assert!(sample(&text, "process_resident_memory_bytes").is_some_and(|rss| rss > 0.0));
        promtool_accepts(&text)?;
        assert_eq!(http_get(&server.metrics_addr, "/readyz")?.0, 200);
        assert_eq!(http_get(&server.metrics_addr, "/healthz")?.0, 200);
    }
    let leader_text = http_get(&cluster.servers[leader].metrics_addr, "/metrics")?.1;
    assert!(sample(&leader_text, "colony_raft_proposal_seconds_count").is_some_and(|n| n >= 1.0), "the leader timed its proposals");

    let survivor = (leader + 1) % 3;
    let before = sample(&http_get(&cluster.servers[survivor].metrics_addr, "/metrics")?.1, "colony_raft_leader_changes_total").unwrap_or(0.0);
    cluster.servers[leader].kill9();
    let addr = cluster.servers[survivor].metrics_addr.clone();
    wait_for("the leader kill to move colony_raft_leader_changes_total", Duration::from_secs(20), || {
        let addr = addr.clone();
        async move {
            let changes = sample(&http_get(&addr, "/metrics")?.1, "colony_raft_leader_changes_total").unwrap_or(0.0);
            Ok((changes > before).then_some(()))
        }
    })
    .await?;
    Ok(())
}
