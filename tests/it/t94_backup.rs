//! Backups with real processes: `colony cluster snapshot save` under load, `inspect`, damaged
//! files refused with a clear line, scheduled backups on the leader, and a restore into a new
//! 3-server cluster that holds every task acknowledged before the save, stops the attempt that was
//! running, takes back the executor it knew and refuses one it never knew.

use colony_proto::pb;
use colony_tests::{colony_bin, local_task_ids, wait_for, Cluster, Server};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

/// Runs `colony ARGS` against `endpoints` with `token`.
fn colony(endpoints: &str, token: &str, args: &[&str]) -> anyhow::Result<Output> {
    Ok(std::process::Command::new(colony_bin())
        .args(["--endpoint", endpoints, "--timeout", "20s"])
        .args(args)
        .env("COLONY_TOKEN", token)
        .output()?)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A task no executor can take, with an idempotency key.
fn unplaceable(key: &str) -> pb::TaskSpec {
    let mut spec = colony_tests::task_spec("kept", Some(key.to_owned()));
    spec.labels.insert("zone".to_owned(), "nowhere".to_owned());
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_under_load_inspect_and_restore_into_a_new_cluster() -> anyhow::Result<()> {
    // Scheduled backups every second into their own directory, on whichever server leads.
    let backups = tempfile::tempdir()?;
    let backups_arg = backups.path().display().to_string();
    let schedule = ["--backup-dir", backups_arg.as_str(), "--backup-interval", "1s"];
    let mut cluster = Cluster::start_with(3, 20_000, &schedule).await?;
    cluster.add_executor("2", "2Gi", &[]).await?;
    cluster.wait_for_executors_up(1, LONG).await?;
    let endpoints = cluster.addrs().join(",");
    let running = colony_tests::submit_task(
        &cluster.addrs(),
        colony_tests::shell_task("long", "sleep 300", 100, 64, 10, 0),
    )
    .await?;
    colony_tests::wait_task(&cluster.addrs(), running, "to run", LONG, |t| {
        colony_tests::task_state(t) == pb::TaskState::Running
    })
    .await?;

    // Load while the backup is taken: one writer keeps submitting; what it had acknowledged
    // before the save started must be in the backup.
    let acknowledged = Arc::new(std::sync::Mutex::new(BTreeSet::from([running])));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acknowledged, stop, addrs) = (acknowledged.clone(), stop.clone(), cluster.addrs());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if let Ok(id) =
                    colony_tests::submit_task(&addrs, unplaceable(&format!("k{n}"))).await
                {
                    acknowledged.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
                }
            }
        })
    };
    wait_for("50 acknowledged submissions", LONG, || async {
        Ok((acknowledged.lock().unwrap_or_else(|p| p.into_inner()).len() > 50).then_some(()))
    })
    .await?;
    let before_save = acknowledged.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let file = cluster.dir.path().join("backup.snap");
    let file_arg = file.display().to_string();
    let saved = colony(&endpoints, &cluster.token, &["cluster", "snapshot", "save", &file_arg])?;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    anyhow::ensure!(saved.status.success(), "save failed: {}", stderr(&saved));

    let inspected = colony(
        &endpoints,
        &cluster.token,
        &["--output", "json", "cluster", "snapshot", "inspect", &file_arg],
    )?;
    anyhow::ensure!(inspected.status.success(), "inspect failed: {}", stderr(&inspected));
    let summary: serde_json::Value = serde_json::from_slice(&inspected.stdout)?;
    let cluster_id = summary["cluster_id"].as_str().unwrap_or_default().to_owned();
    let status = cluster.servers[0].status().await?;
    assert_eq!(cluster_id, status.cluster_id, "{summary}");
    assert!(summary["tasks"].as_u64() >= Some(before_save.len() as u64), "{summary}");

    // Damaged files and another cluster's are refused, each with a line that says why.
    let bytes = std::fs::read(&file)?;
    let damaged = |name: &str, contents: &[u8]| -> anyhow::Result<String> {
        let path = cluster.dir.path().join(name);
        std::fs::write(&path, contents)?;
        let out = colony(
            &endpoints,
            "",
            &["cluster", "snapshot", "inspect", &path.display().to_string()],
        )?;
        anyhow::ensure!(!out.status.success(), "{name} was accepted");
        Ok(stderr(&out))
    };
    assert!(damaged("cut.snap", &bytes[..bytes.len() / 2])?.contains("truncated"));
    let mut flipped = bytes.clone();
    let middle = flipped.len() - 100;
    flipped[middle] ^= 0x10;
    assert!(damaged("flipped.snap", &flipped)?.contains("corrupted"));
    assert!(damaged("text.snap", b"not a backup")?.contains("not a Colony snapshot file"));
    let other = colony(
        &endpoints,
        "",
        &["cluster", "snapshot", "inspect", &file_arg, "--expect-cluster-id", "another"],
    )?;
    assert!(
        !other.status.success() && stderr(&other).contains("is of cluster"),
        "{}",
        stderr(&other)
    );

    // The leader also wrote scheduled backups, each a whole, valid file.
    let scheduled = wait_for("a scheduled backup", LONG, || async {
        let files: Vec<_> = std::fs::read_dir(backups.path())
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        Ok(files.into_iter().find(|p| p.extension().is_some_and(|e| e == "snap")))
    })
    .await?;
    let out = colony(
        &endpoints,
        "",
        &["cluster", "snapshot", "inspect", &scheduled.display().to_string()],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));

    // An executor the old cluster admitted after the save: the restored cluster never knew it.
    cluster.add_executor("1", "1Gi", &[]).await?;
    cluster.wait_for_executors_up(2, LONG).await?;

    // A restore refuses a data directory that holds anything.
    let restored_dir = tempfile::tempdir()?;
    let busy = restored_dir.path().join("busy");
    std::fs::create_dir_all(&busy)?;
    std::fs::write(busy.join("something"), b"x")?;
    let mut refused = Server::new(1, busy.clone(), restored_dir.path().join("refused.log"));
    refused.start(&restore_args(&refused, &file))?;
    wait_for("the refusal", LONG, || {
        let exited = !refused.is_running();
        async move { Ok(exited.then_some(())) }
    })
    .await?;
    assert!(refused.log().contains("needs an empty data directory"), "{}", refused.log());

    // Restore into a new cluster: one server from the backup, two joining it.
    let mut first =
        Server::new(1, restored_dir.path().join("r1"), restored_dir.path().join("r1.log"));
    let auth = colony_client::Auth::token(&cluster.token)?;
    colony_tests::register(&first.addr, &auth);
    first.start(&restore_args(&first, &file))?;
    let first_addr = first.addr.clone();
    wait_for("the restored server to lead", LONG, || async {
        let status = colony_tests::status(&first_addr, Duration::from_secs(2)).await.ok();
        Ok(status.filter(|s| s.leader_id == Some(1)))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", first.log()))?;
    let new_status = colony_tests::status(&first_addr, Duration::from_secs(2)).await?;
    assert_ne!(new_status.cluster_id, cluster_id, "a restore makes a new cluster");
    let mut c = colony_tests::client(&first_addr).await?;
    let request = pb::CreateJoinTokenRequest { ttl_ms: 600_000, kind: "server".to_owned() };
    let server_token = c.create_join_token(request).await?.into_inner().token;
    let mut restored = vec![first];
    for id in 2..=3 {
        let dir = restored_dir.path().join(format!("r{id}"));
        let mut server = Server::new(id, dir, restored_dir.path().join(format!("r{id}.log")));
        colony_tests::register(&server.addr, &auth);
        let args = vec![
            "--id".to_owned(),
            id.to_string(),
            "--listen".to_owned(),
            server.addr.clone(),
            "--join".to_owned(),
            first_addr.clone(),
            "--token".to_owned(),
            server_token.clone(),
        ];
        server.start(&args)?;
        restored.push(server);
    }
    for server in &restored {
        let addr = server.addr.clone();
        wait_for(
            &format!("restored server {} to hold the acknowledged tasks", server.id),
            LONG,
            || async {
                let ids: BTreeSet<u64> =
                    local_task_ids(&addr).await.unwrap_or_default().into_iter().collect();
                Ok(ids.is_superset(&before_save).then_some(()))
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", server.log()))?;
    }
    let restored_addrs: Vec<String> = restored.iter().map(|s| s.addr.clone()).collect();
    let task = colony_tests::get_task(&restored_addrs, running).await?;
    assert_ne!(
        colony_tests::task_state(&task),
        pb::TaskState::Running,
        "the attempt from before the save was stopped"
    );

    // The executor from before the save registers again; the one admitted after it is refused.
    for executor in &mut cluster.executors {
        executor.kill9();
        executor.point_at(&restored_addrs.join(","));
        executor.start()?;
    }
    let restored_any = colony_client::Client::new(&restored_addrs, Duration::from_secs(3), &auth)?;
    wait_for("the executor from before the save to be up again", LONG, || async {
        let executors = restored_any
            .call("list executors", |mut c| async move {
                c.list_executors(pb::ListExecutorsRequest::default()).await
            })
            .await?
            .executors;
        Ok((executors.len() == 1 && executors[0].state == "up").then_some(()))
    })
    .await?;
    let late = &mut cluster.executors[1];
    wait_for("the executor admitted after the save to be refused", LONG, || {
        let exited = !late.is_running();
        async move { Ok(exited.then_some(())) }
    })
    .await?;
    assert!(late.log().to_lowercase().contains("unknown"), "{}", late.log());
    Ok(())
}

fn restore_args(server: &Server, file: &Path) -> Vec<String> {
    vec![
        "--id".to_owned(),
        server.id.to_string(),
        "--listen".to_owned(),
        server.addr.clone(),
        "--bootstrap".to_owned(),
        "--restore".to_owned(),
        file.display().to_string(),
    ]
}
