//! Bad input through the `colony` binary: one clear line on stderr, a non-zero exit, nothing changed.

use colony_tests::{colony_bin, free_port, local_task_ids, wait_for, Cluster};
use std::process::{Command, Output};
use std::time::Duration;

fn colony<S: AsRef<str>>(args: &[S]) -> Output {
    Command::new(colony_bin()).args(args.iter().map(|s| s.as_ref())).output().expect("run colony")
}

/// Runs a command that must fail, and returns its stderr (asserting it is one `error:` line).
fn fails<S: AsRef<str>>(args: &[S], expected: &str) -> String {
    let args: Vec<&str> = args.iter().map(|s| s.as_ref()).collect();
    let args = args.as_slice();
    let out = colony(args);
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert!(
        !out.status.success(),
        "`colony {}` should fail; stdout: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "`colony {}` panicked: {stderr}",
        args.join(" ")
    );
    // The error is the first line; clap's usage errors add a "For more information" hint after it.
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("error: "),
        "`colony {}`: error line expected, got {stderr:?}",
        args.join(" ")
    );
    assert!(
        first.to_lowercase().contains(&expected.to_lowercase()),
        "`colony {}`: {first:?} should mention {expected:?}",
        args.join(" ")
    );
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, 20_000).await?;
    let endpoint = cluster.addrs().join(",");
    let ep = endpoint.as_str();
    let token = cluster.token.as_str();
    let submit = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["--endpoint", ep, "--token", token, "task", "submit"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    let ok = colony(&submit(&[
        "--name",
        "good",
        "--cpu",
        "250m",
        "--memory",
        "64Mi",
        "--",
        "/bin/echo",
        "hi",
    ]));
    assert!(ok.status.success(), "good submit failed: {}", String::from_utf8_lossy(&ok.stderr));
    let good_id = String::from_utf8_lossy(&ok.stdout).trim().to_owned();
    assert!(good_id.parse::<u64>().is_ok(), "submit prints the new id, got {good_id:?}");

    fails(&submit(&["--name", "x", "--cpu", "-1", "--", "/bin/true"]), "negative");
    fails(&submit(&["--name", "x", "--memory", "12Q", "--", "/bin/true"]), "unit");
    fails(&submit(&["--name", "", "--", "/bin/true"]), "name");
    fails(&submit(&["--name", &"n".repeat(300), "--", "/bin/true"]), "253");
    fails(&submit(&["--name", "x", "--priority", "5000", "--", "/bin/true"]), "priority");
    fails(&submit(&["--name", "x", "--after", "424242", "--", "/bin/true"]), "424242");
    fails(&["--endpoint", ep, "--token", token, "task", "get", "424242"], "424242");
    fails(&["--endpoint", ep, "--token", token, "task", "cancel", "424242"], "424242");
    fails(&["--endpoint", ep, "--token", token, "task", "list", "--state", "sleeping"], "sleeping");

    let ids = local_task_ids(&cluster.servers[0].addr).await?;
    assert_eq!(ids.len(), 1, "only the good submission exists: {ids:?}");

    // `colony task list | head`: stdout's reader is gone before anything is written.
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let out = Command::new(colony_bin())
        .args(["--endpoint", ep, "--token", token, "task", "list"])
        .stdout(writer)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.is_empty(),
        "a closed stdout must end the command quietly: {} {stderr}",
        out.status
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_refuse_wrong_clusters_and_duplicate_ids() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    let scratch = tempfile::tempdir()?;
    let leader_addr = cluster.addrs()[0].clone();

    // Something that is not a Colony server: a plain TCP listener answering HTTP/1.
    let impostor = std::net::TcpListener::bind("127.0.0.1:0")?;
    let impostor_addr = impostor.local_addr()?.to_string();
    std::thread::spawn(move || {
        for stream in impostor.incoming().flatten() {
            use std::io::Write;
            let mut stream = stream;
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let dir = scratch.path().join("impostor");
    let listen = format!("127.0.0.1:{}", free_port());
    let dir_s = dir.to_string_lossy().to_string();
    let server_token = cluster.join_token_of("server").await?;
    let join = |dir: &str, id: &str, target: &str, token: &str| -> Vec<String> {
        let listen = format!("127.0.0.1:{}", free_port());
        ["server", "--id", id, "--data-dir", dir, "--listen", &listen, "--join", target]
            .iter()
            .map(|s| s.to_string())
            .chain(["--token".to_owned(), token.to_owned()])
            .collect()
    };
    fails(&join(&dir_s, "7", &impostor_addr, &server_token), "not a colony server");
    // Joining needs a server join token: none, an executor's, or garbage are refused.
    fails(
        &["server", "--id", "7", "--data-dir", &dir_s, "--listen", &listen, "--join", &leader_addr],
        "--token is required",
    );
    let executor_token = cluster.join_token().await?;
    fails(&join(&dir_s, "7", &leader_addr, &executor_token), "does not admit a server");
    fails(&join(&dir_s, "7", &leader_addr, "colony1.garbage"), "invalid --token");

    // A second server claiming an id that is already a member.
    let dup = scratch.path().join("dup").to_string_lossy().to_string();
    fails(&join(&dup, "2", &leader_addr, &server_token), "already a member");

    // A data directory of this cluster pointed at another cluster.
    let other = Cluster::start(1, 20_000).await?;
    let server3 = &mut cluster.servers[2];
    server3.terminate()?;
    let data = server3.data_dir.to_string_lossy().to_string();
    fails(&["server", "--data-dir", &data, "--join", &other.servers[0].addr], "belongs to cluster");
    assert!(!dir.join("node.json").exists(), "a refused join leaves no identity behind");

    // A data directory that belongs to another node id.
    fails(&["server", "--id", "9", "--data-dir", &data], "belongs to node");

    // Nothing changed: the cluster still has its three members, the other cluster its one.
    let status = cluster.servers[0].status().await?;
    assert_eq!(status.members.len(), 3, "{:?}", status.members);
    assert_eq!(other.servers[0].status().await?.members.len(), 1);
    cluster.servers[2].restart()?;
    let addr = cluster.servers[2].addr.clone();
    wait_for("server 3 to rejoin its own cluster", Duration::from_secs(20), || {
        let addr = addr.clone();
        async move {
            Ok(colony_tests::client(&addr)
                .await?
                .cluster_status(colony_proto::pb::ClusterStatusRequest {})
                .await
                .ok()
                .filter(|s| s.get_ref().leader_id.is_some())
                .map(|_| ()))
        }
    })
    .await?;
    Ok(())
}
