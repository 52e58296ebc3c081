//! Every server serves Prometheus metrics that agree with what the cluster reports.

use anyhow::Context as _;
use colony_proto::pb;
use colony_tests::{http_get, sample, task_spec, wait_for, Cluster};
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
        .map_err(|e| {
            anyhow::anyhow!(
                "promtool is required (cluster/test.sh installs Debian's prometheus package): {e}"
            )
        })?;
    child.stdin.take().context("promtool stdin")?.write_all(exposition.as_bytes())?;
    let out = child.wait_with_output()?;
    let report =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_cluster() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let mut c = cluster.servers[(leader + 1) % 3].client().await?;
    for n in 0..5 {
        c.submit_task(pb::SubmitTaskRequest { spec: Some(task_spec(&format!("m-{n}"), None)) })
            .await?;
    }

    for server in &cluster.servers {
        let status = server.status().await?;
        let addr = server.metrics_addr.clone();
        let text = wait_for(
            &format!("server {} to export 5 pending tasks", server.id),
            Duration::from_secs(10),
            || {
                let addr = addr.clone();
                async move {
                    let (code, body) = http_get(&addr, "/metrics")?;
                    anyhow::ensure!(code == 200, "/metrics answered {code}");
                    Ok((sample(&body, "colony_tasks_pending") == Some(5.0)).then_some(body))
                }
            },
        )
        .await?;
        assert_eq!(
            sample(&text, "colony_raft_term"),
            Some(status.term as f64),
            "server {}",
            server.id
        );
        let is_leader = if status.state == "leader" { 1.0 } else { 0.0 };
        assert_eq!(sample(&text, "colony_raft_is_leader"), Some(is_leader), "server {}", server.id);
        assert!(sample(&text, "process_resident_memory_bytes").is_some_and(|rss| rss > 0.0));
        promtool_accepts(&text)?;
        assert_eq!(http_get(&server.metrics_addr, "/readyz")?.0, 200);
        assert_eq!(http_get(&server.metrics_addr, "/healthz")?.0, 200);
    }
    let leader_text = http_get(&cluster.servers[leader].metrics_addr, "/metrics")?.1;
    assert!(
        sample(&leader_text, "colony_raft_proposal_seconds_count").is_some_and(|n| n >= 1.0),
        "the leader timed its proposals"
    );
    let raft_round_trips =
        r#"colony_agent_communication_seconds_count{destination="server",source="server"}"#;
    assert!(
        sample(&leader_text, raft_round_trips).is_some_and(|n| n >= 1.0),
        "the leader timed its Raft round trips"
    );
    let follower_text = http_get(&cluster.servers[(leader + 1) % 3].metrics_addr, "/metrics")?.1;
    let forwards =
        r#"colony_agent_communication_seconds_count{destination="leader",source="server"}"#;
    assert!(
        sample(&follower_text, forwards).is_some_and(|n| n >= 5.0),
        "the follower timed the 5 submissions it forwarded"
    );

    let survivor = (leader + 1) % 3;
    let before = sample(
        &http_get(&cluster.servers[survivor].metrics_addr, "/metrics")?.1,
        "colony_raft_leader_changes_total",
    )
    .unwrap_or(0.0);
    cluster.servers[leader].kill9();
    let addr = cluster.servers[survivor].metrics_addr.clone();
    wait_for(
        "the leader kill to move colony_raft_leader_changes_total",
        Duration::from_secs(20),
        || {
            let addr = addr.clone();
            async move {
                let changes =
                    sample(&http_get(&addr, "/metrics")?.1, "colony_raft_leader_changes_total")
                        .unwrap_or(0.0);
                Ok((changes > before).then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}

/// A Prometheus server process, killed when dropped.
struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Percent-encodes a PromQL query for a URL.
fn encode_query(query: &str) -> String {
    query
        .bytes()
        .map(
            |b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            },
        )
        .collect()
}

/// The instant-query result vector: (labels, value) per series.
fn query(prometheus: &str, promql: &str) -> anyhow::Result<Vec<(serde_json::Value, f64)>> {
    let (code, body) =
        http_get(prometheus, &format!("/api/v1/query?query={}", encode_query(promql)))?;
    anyhow::ensure!(code == 200, "query {promql}: HTTP {code}: {body}");
    let reply: serde_json::Value = serde_json::from_str(&body)?;
    let result = reply["data"]["result"].as_array().context("no result vector")?;
    result
        .iter()
        .map(|series| {
            let value = series["value"][1].as_str().context("no sample value")?.parse()?;
            Ok((series["metric"].clone(), value))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_shipped_config() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    for _ in 0..2 {
        cluster.add_executor("1", "1Gi", &[]).await?;
    }
    cluster.wait_for_executors_up(2, Duration::from_secs(30)).await?;
    let dir = tempfile::tempdir()?;
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster/prometheus");
    for file in ["prometheus.yml", "alerts.yml"] {
        std::fs::copy(shipped.join(file), dir.path().join(file))?;
    }
    std::fs::create_dir(dir.path().join("targets"))?;
    let targets: Vec<String> = cluster.servers.iter().map(|s| s.metrics_addr.clone()).collect();
    let executor_targets: Vec<String> =
        cluster.executors.iter().map(|e| e.metrics_addr.clone()).collect();
    let list = serde_json::json!([
        { "targets": targets, "labels": { "job": "colony-server" } },
        { "targets": executor_targets, "labels": { "job": "colony-executor" } },
    ]);
    std::fs::write(dir.path().join("targets/test.json"), list.to_string())?;

    let web = format!("127.0.0.1:{}", colony_tests::free_port());
    let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
    let _prometheus = Prometheus(
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={web}"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("prometheus is required (cluster/test.sh installs Debian's prometheus package): {e}"))?,
    );

    let mut c = cluster.servers[0].client().await?;
    for n in 0..3 {
        // A capability no executor offers: the tasks stay pending, so the queue depth is known.
        let mut spec = task_spec(&format!("p-{n}"), None);
        spec.capabilities = vec!["quantum".into()];
        c.submit_task(pb::SubmitTaskRequest { spec: Some(spec) }).await?;
    }
    for executor in &cluster.executors {
        let (code, text) = http_get(&executor.metrics_addr, "/metrics")?;
        assert_eq!(code, 200);
        promtool_accepts(&text)?;
        assert_eq!(
            http_get(&executor.metrics_addr, "/readyz")?.0,
            200,
            "a connected executor is ready"
        );
    }
    let prometheus_log =
        || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    wait_for(
        "Prometheus to scrape all three servers and both executors as up",
        Duration::from_secs(60),
        || {
            let web = web.clone();
            async move {
                let up = query(&web, "up{job=~\"colony-.*\"}")?;
                Ok((up.len() == 5 && up.iter().all(|(_, v)| *v == 1.0)).then_some(()))
            }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", prometheus_log()))?;
    wait_for(
        "every server's colony_tasks_pending to read 3 in Prometheus",
        Duration::from_secs(30),
        || {
            let web = web.clone();
            async move {
                let pending = query(&web, "colony_tasks_pending")?;
                Ok((pending.len() == 3 && pending.iter().all(|(_, v)| *v == 3.0)).then_some(()))
            }
        },
    )
    .await?;
    let term = cluster.servers[0].status().await?.term as f64;
    let terms = query(&web, "colony_raft_term")?;
    assert!(
        terms.len() == 3 && terms.iter().all(|(_, v)| *v == term),
        "colony_raft_term in Prometheus {terms:?}, cluster term {term}"
    );
    let leaders = query(&web, "sum(colony_raft_is_leader)")?;
    assert_eq!(leaders.first().map(|(_, v)| *v), Some(1.0), "exactly one leader");
    assert!(
        query(&web, "ALERTS{alertname=\"NoLeader\"}")?.is_empty(),
        "NoLeader must not fire with a leader"
    );
    let up = query(&web, "max(colony_executors{state=\"up\"})")?;
    assert_eq!(up.first().map(|(_, v)| *v), Some(2.0), "the servers count two executors up");
    let connected = query(&web, "sum(colony_executor_connected)")?;
    assert_eq!(
        connected.first().map(|(_, v)| *v),
        Some(2.0),
        "both executors say they are connected"
    );
    Ok(())
}
