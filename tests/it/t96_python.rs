//! A client in another language needs only proto/, the CA certificate and a token: the Python
//! grpcio example in examples/python runs against a real cluster.

use colony_tests::Cluster;
use std::process::Command;

/// Where cluster/setup.sh installs grpcio and grpcio-tools (it exports `COLONY_PYTHONPATH`).
fn python_path() -> String {
    std::env::var("COLONY_PYTHONPATH").unwrap_or_else(|_| "/opt/colony/python".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_calls_the_api_with_the_ca_and_a_token() -> anyhow::Result<()> {
    let path = python_path();
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .env("PYTHONPATH", &path)
        .output()?;
    anyhow::ensure!(
        probe.status.success(),
        "grpcio is missing from {path}: cluster/setup.sh installs it (pip install --target {path} grpcio grpcio-tools): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let cluster = Cluster::start(1, 20_000).await?;
    let ca = cluster.servers[0].data_dir.join("tls").join("ca.pem");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/python/colony_admin.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["--endpoint", &cluster.servers[0].addr, "--ca"])
        .arg(&ca)
        .args(["--token", &cluster.token])
        .env("PYTHONPATH", &path)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "the Python client failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_str(stdout.trim())?;
    assert_eq!(answer["leader_id"], 1, "{answer}");
    assert_eq!(answer["namespace"], "default", "a task without a namespace is in default");
    assert_eq!(answer["state"], "TASK_STATE_PENDING", "{answer}");
    assert_eq!(answer["anonymous"], "UNAUTHENTICATED", "{answer}");
    Ok(())
}
