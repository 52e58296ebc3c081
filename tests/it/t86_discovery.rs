//! Discovery on a real cluster with real executors: instances that ask for a port serve HTTP on
//! it, their executors check their health, and `colony agent endpoints` lists exactly the healthy
//! ones at addresses that answer. An instance that turns unhealthy leaves the registry and comes
//! back when it recovers; one whose executor is killed with kill -9 leaves it; a rolling update
//! whose new version never turns healthy keeps the old one serving; a check that hangs is cut at
//! its timeout and never registers its instance.

use colony_tests::{wait_for, Cluster};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

/// Serves `GET /healthz` on $COLONY_PORT: 200, or 503 while `$SICK_DIR/sick-<instance>` exists or
/// the instance runs version "broken".
const SERVER: &str = r#"
import http.server, os
index = os.environ["COLONY_AGENT_INSTANCE"]
sick = os.path.join(os.environ["SICK_DIR"], "sick-" + index)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = not os.path.exists(sick) and os.environ.get("VERSION") != "broken"
        body = ("instance " + index + "\n").encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("0.0.0.0", int(os.environ["COLONY_PORT"])), H).serve_forever()
"#;

fn json(cluster: &Cluster, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let text = cluster.cli_ok(&all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn endpoints(cluster: &Cluster, name: &str) -> Vec<serde_json::Value> {
    json(cluster, &["agent", "endpoints", name]).as_array().cloned().unwrap_or_default()
}

/// Waits until the agent's registry satisfies `check`; returns it.
async fn wait_endpoints(
    cluster: &Cluster,
    name: &str,
    what: &str,
    check: impl Fn(&[serde_json::Value]) -> bool,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let check = &check;
    wait_for(&format!("agent {name} endpoints: {what}"), LONG, || async move {
        let e = endpoints(cluster, name);
        Ok(check(&e).then_some(e))
    })
    .await
}

fn indices(endpoints: &[serde_json::Value]) -> Vec<u64> {
    let mut i: Vec<u64> = endpoints.iter().filter_map(|e| e["index"].as_u64()).collect();
    i.sort_unstable();
    i
}

/// The body of a GET of `path` at `address`, as a client that found it in the registry would.
fn get(address: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

fn run_web(cluster: &Cluster, sick_dir: &Path, version: &str) {
    let sick = format!("SICK_DIR={}", sick_dir.display());
    let version = format!("VERSION={version}");
    cluster.cli_ok(&[
        "agent",
        "run",
        "--name",
        "web",
        "--replicas",
        "2",
        "--restart",
        "always",
        "--spread",
        "--port",
        "--health-http",
        "/healthz",
        "--health-interval",
        "300ms",
        "--health-timeout",
        "250ms",
        "--health-failures",
        "2",
        "--env",
        &sick,
        "--env",
        &version,
        "--",
        "python3",
        "-c",
        SERVER,
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_instances_are_found_and_the_unhealthy_or_lost_leave() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    // Both executors share this host: each leases from its own range.
    cluster.add_executor("4", "4Gi", &["--ports", "31200-31299"]).await?;
    cluster.add_executor("4", "4Gi", &["--ports", "31300-31399"]).await?;
    cluster.wait_for_executors_up(2, LONG).await?;
    let sick_dir = tempfile::tempdir()?;
    // The instances run as nobody and must read it.
    std::fs::set_permissions(sick_dir.path(), std::fs::Permissions::from_mode(0o755))?;

    run_web(&cluster, sick_dir.path(), "1");
    let both =
        wait_endpoints(&cluster, "web", "both instances healthy", |e| indices(e) == [0, 1]).await?;
    for e in &both {
        let address = e["address"].as_str().unwrap_or_default();
        assert!(address.starts_with("127.0.0.1:31"), "{e}");
        let answer = get(address, "/")?;
        let index = e["index"].as_u64().unwrap_or(99);
        assert!(answer.contains(&format!("instance {index}")), "{address}: {answer:?}");
    }
    let agent = json(&cluster, &["agent", "get", "web"]);
    assert_eq!(agent["port"], true);
    assert_eq!(agent["health"]["http_path"], "/healthz");

    // Instance 0 turns unhealthy: it leaves the registry, keeps running, and comes back.
    let sick = sick_dir.path().join("sick-0");
    std::fs::write(&sick, b"")?;
    wait_endpoints(&cluster, "web", "instance 0 gone", |e| indices(e) == [1]).await?;
    let agent = json(&cluster, &["agent", "get", "web"]);
    assert_eq!(agent["instances"][0]["state"], "running", "unhealthy is not dead: {agent:#}");
    std::fs::remove_file(&sick)?;
    wait_endpoints(&cluster, "web", "instance 0 back", |e| indices(e) == [0, 1]).await?;

    // The executor of instance 1 is killed: its entry leaves, and its replacement on the other
    // executor registers.
    let agent = json(&cluster, &["agent", "get", "web"]);
    let lost_task = agent["instances"][1]["task"].as_u64();
    let lost_executor = agent["instances"][1]["executor"].as_u64();
    let executors = cluster.executors().await?;
    let name = executors
        .iter()
        .find(|e| Some(e.id) == lost_executor)
        .map(|e| e.name.clone())
        .ok_or_else(|| anyhow::anyhow!("instance 1 runs on no known executor: {agent:#}"))?;
    let victim = cluster
        .executors
        .iter()
        .position(|e| e.name == name)
        .ok_or_else(|| anyhow::anyhow!("no executor process named {name}"))?;
    cluster.executors[victim].kill9();
    wait_endpoints(&cluster, "web", "the lost instance gone", |e| {
        e.iter().all(|e| e["task"].as_u64() != lost_task)
    })
    .await?;
    let replaced = wait_endpoints(&cluster, "web", "instance 1 replaced", |e| {
        indices(e) == [0, 1] && e.iter().all(|e| e["task"].as_u64() != lost_task)
    })
    .await?;
    assert!(replaced.iter().all(|e| e["executor"].as_u64() != lost_executor), "{replaced:?}");

    // A new version that never turns healthy: its first instance starts, and the old one serves
    // on beside it, registered as the older version; nothing else is replaced.
    let before = json(&cluster, &["agent", "get", "web"]);
    let old_task = before["instances"][0]["task"].as_u64();
    run_web(&cluster, sick_dir.path(), "broken");
    let rolling = wait_for("the broken version's instance 0 running", LONG, || async {
        let a = json(&cluster, &["agent", "get", "web"]);
        let i = &a["instances"][0];
        Ok((i["state"] == "running" && i["task"].as_u64() != old_task).then_some(a))
    })
    .await?;
    assert_eq!(rolling["instances"][0]["replacing"].as_u64(), old_task, "{rolling:#}");
    // Six failed checks' worth of time: long enough for a roll that ignored health to finish.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let serving = endpoints(&cluster, "web");
    let old = serving.iter().find(|e| e["task"].as_u64() == old_task);
    assert!(old.is_some_and(|e| e["version"] == 0), "the old instance 0 left: {serving:?}");
    let agent = json(&cluster, &["agent", "get", "web"]);
    assert_eq!(agent["instances"][0]["replacing"].as_u64(), old_task, "{agent:#}");
    assert_eq!(agent["instances"][1]["version"], 1, "the roll went past a broken instance");
    // A healthy version finishes the roll.
    run_web(&cluster, sick_dir.path(), "3");
    wait_endpoints(&cluster, "web", "version 3 on both", |e| {
        indices(e) == [0, 1] && e.iter().all(|e| e["version"] == 3)
    })
    .await?;

    // A health check that hangs is cut at its timeout each time: its instance runs, never
    // registered.
    cluster.cli_ok(&[
        "agent",
        "run",
        "--name",
        "hung",
        "--health-cmd",
        "sleep 600",
        "--health-interval",
        "300ms",
        "--health-timeout",
        "100ms",
        "--",
        "/bin/sleep",
        "3600",
    ]);
    wait_for("agent hung running", LONG, || async {
        let a = json(&cluster, &["agent", "get", "hung"]);
        Ok((a["instances"][0]["state"] == "running").then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(endpoints(&cluster, "hung").is_empty(), "a hanging check registered its instance");
    let stray = std::process::Command::new("pgrep").args(["-f", "^sleep 600$"]).output()?;
    let stray = String::from_utf8_lossy(&stray.stdout).lines().count();
    assert!(stray <= 1, "{stray} hanging checks still run: each must be killed at its timeout");

    // Refused before anything is stored: an HTTP check without a port.
    let out =
        cluster.cli(&["agent", "run", "--name", "x", "--health-http", "/h", "--", "/bin/true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--port"), "{out:?}");
    Ok(())
}
