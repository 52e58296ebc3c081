//! A server started from a config file (`--config`), bound apart from its advertised address
//! (`--bind`), as the systemd units and Kubernetes manifests start it.

use colony_tests::{colony_bin, free_port, http_get, wait_for, Server};
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_runs_from_a_config_file_and_binds_apart_from_what_it_advertises(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let mut server = Server::new(1, dir.path().join("d1"), dir.path().join("server1.log"));
    // Advertised on 127.0.0.2, bound on every interface: served on 127.0.0.1 too, which binding
    // --listen's address alone would not do.
    let advertised = format!("127.0.0.2:{port}");
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "id = 1\nlisten = \"{advertised}\"\nbind = \"0.0.0.0:{port}\"\n\
             metrics-listen = \"{}\"\nbootstrap = true\nheartbeat-ms = 20\n",
            server.metrics_addr
        ),
    )?;
    server.start(&["--config".into(), config.display().to_string()])?;
    let metrics = server.metrics_addr.clone();
    wait_for("the server to be ready", Duration::from_secs(30), || {
        let metrics = metrics.clone();
        async move { Ok(http_get(&metrics, "/readyz").is_ok_and(|(code, _)| code == 200).then_some(())) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {}", server.log()))?;
    let log = server.log();
    assert!(log.contains("flags read from a config file"), "{log}");

    // Through the bind address (127.0.0.1), the cluster says it is at the advertised one.
    let ca = dir.path().join("d1").join("tls").join("ca.pem");
    let local = format!("127.0.0.1:{port}");
    let bootstrap = Command::new(colony_bin())
        .args(["--endpoint", &local, "acl", "bootstrap", "--ca-file"])
        .arg(&ca)
        .output()?;
    anyhow::ensure!(
        bootstrap.status.success(),
        "acl bootstrap through {local}: {}",
        String::from_utf8_lossy(&bootstrap.stderr)
    );
    let token = String::from_utf8_lossy(&bootstrap.stdout).trim().to_owned();
    let status = Command::new(colony_bin())
        .args(["--endpoint", &local, "--output", "json", "cluster", "status"])
        .env("COLONY_TOKEN", &token)
        .output()?;
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains(&advertised), "the member is advertised at {advertised}: {status}");

    // A config file with an unknown key stops the process before it starts, naming the line.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "id = 2\nlisten = \"127.0.0.1:1\"\nheartbeat-msec = 20\n")?;
    let refused = Command::new(colony_bin())
        .args(["server", "--data-dir"])
        .arg(dir.path().join("d2"))
        .arg("--config")
        .arg(&bad)
        .output()?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("line 3: unknown key `heartbeat-msec`"), "{stderr}");
    assert!(!dir.path().join("d2").exists(), "nothing was created: {stderr}");
    Ok(())
}
