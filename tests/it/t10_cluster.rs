//! A three-server cluster answers every request on every server.

use colony_proto::pb::{self, ClusterStatusRequest};
use colony_tests::{local_task_ids, task_spec, wait_for, Cluster};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_server_accepts_any_request() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;

    for server in &cluster.servers {
        let status = server.status().await?;
        assert_eq!(status.members.len(), 3, "server {} sees {:?}", server.id, status.members);
        assert!(
            status.members.iter().all(|m| m.role == "voter" && m.reachable),
            "server {}: {:?}",
            server.id,
            status.members
        );
        assert_eq!(status.leader_id, Some(cluster.servers[leader].id));
        assert!(status.term >= 1);
    }

    let mut via_follower = cluster.servers[follower].client().await?;
    let submitted = via_follower
        .submit_task(pb::SubmitTaskRequest { spec: Some(task_spec("hello", None)) })
        .await?
        .into_inner();
    let task = submitted.task.expect("task in reply");
    assert_eq!(task.state, pb::TaskState::Pending as i32, "no executors: a new task waits");

    let mut via_other = cluster.servers[other].client().await?;
    let got = via_other
        .get_task(pb::GetTaskRequest { id: task.id, consistency: None })
        .await?
        .into_inner();
    assert_eq!(
        got.task.map(|t| t.id),
        Some(task.id),
        "a linearizable read on another server sees the write"
    );

    let blocked = task_spec("after-hello", None);
    let blocked = pb::TaskSpec { dependencies: vec![task.id], ..blocked };
    let dependent = via_other
        .submit_task(pb::SubmitTaskRequest { spec: Some(blocked) })
        .await?
        .into_inner()
        .task
        .expect("task");
    assert_eq!(dependent.state, pb::TaskState::Blocked as i32);

    let cancelled = via_follower
        .cancel_task(pb::CancelTaskRequest { id: task.id, reason: "test".into() })
        .await?
        .into_inner();
    assert_eq!(cancelled.task.map(|t| t.state), Some(pb::TaskState::Cancelled as i32));
    assert_eq!(
        cancelled.cascaded,
        vec![dependent.id],
        "cancelling a dependency cancels its dependents"
    );

    let missing = via_other.get_task(pb::GetTaskRequest { id: 9999, consistency: None }).await;
    assert_eq!(missing.map_err(|s| s.code()).err(), Some(tonic::Code::NotFound));

    let listed = via_follower
        .list_tasks(pb::ListTasksRequest {
            state: pb::TaskState::Cancelled as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(listed.tasks.len(), 2);

    for server in &cluster.servers {
        let addr = server.addr.clone();
        wait_for(
            &format!("server {} to apply both tasks", server.id),
            Duration::from_secs(10),
            || {
                let addr = addr.clone();
                async move {
                    Ok((local_task_ids(&addr).await? == vec![task.id, dependent.id]).then_some(()))
                }
            },
        )
        .await?;
    }

    // Health and reflection answer anyone (they carry no secrets), over TLS like everything.
    let endpoint = |addr: &str| tonic::transport::Endpoint::from_shared(format!("http://{addr}"));
    let auth = cluster.auth()?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        auth.channel(endpoint(&cluster.servers[other].addr)?),
    );
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest { service: "colony.v1.Admin".into() })
        .await?
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    };
    use tonic_reflection::pb::v1::{
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let mut reflection =
        ServerReflectionClient::new(auth.channel(endpoint(&cluster.servers[other].addr)?));
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies =
        reflection.server_reflection_info(tokio_stream::iter([ask])).await?.into_inner();
    let reply = replies.message().await?.and_then(|r| r.message_response);
    let Some(MessageResponse::ListServicesResponse(list)) = reply else {
        anyhow::bail!("reflection did not list services: {reply:?}")
    };
    let services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["colony.v1.Admin", "colony.v1.Raft", "grpc.health.v1.Health"] {
        assert!(
            services.iter().any(|s| s == expected),
            "reflection lists {services:?}, missing {expected}"
        );
    }

    let stopped = cluster.servers[follower].terminate()?;
    assert!(stopped.success(), "SIGTERM must stop a server cleanly, got {stopped}");
    let mut status_client = cluster.servers[leader].client().await?;
    let status = status_client.cluster_status(ClusterStatusRequest {}).await?.into_inner();
    let stopped_id = cluster.servers[follower].id;
    assert!(
        status.members.iter().any(|m| m.id == stopped_id && !m.reachable),
        "a stopped server shows as unreachable: {:?}",
        status.members
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_tasks_are_listed_in_pages_under_the_message_limit() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, 20_000).await?;
    let mut c = cluster.servers[0].client().await?;
    for n in 0..40 {
        let mut spec = task_spec(&format!("big-{n}"), None);
        spec.run = Some(pb::task_spec::Run::Process(pb::ProcessRun {
            program: "/bin/true".into(),
            args: vec!["x".repeat(7000); 8],
            env: Default::default(),
        }));
        c.submit_task(pb::SubmitTaskRequest { spec: Some(spec) }).await?;
    }
    let first = c
        .list_tasks(pb::ListTasksRequest { page_size: 5000, ..Default::default() })
        .await?
        .into_inner();
    assert!(
        first.tasks.len() < 40 && first.next_after_id != 0,
        "2.2 MiB of tasks must not fit one page: got {}",
        first.tasks.len()
    );

    let out = std::process::Command::new(colony_tests::colony_bin())
        .args(["--endpoint", &cluster.servers[0].addr, "--output", "json", "task", "list"])
        .args(["--token", &cluster.token])
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(listed.as_array().map(Vec::len), Some(40), "the CLI follows every page");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_refreshes_until_interrupted() -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let cluster = Cluster::start(1, 20_000).await?;
    let mut child = std::process::Command::new(colony_tests::colony_bin())
        .args([
            "--endpoint",
            &cluster.servers[0].addr,
            "--output",
            "json",
            "cluster",
            "status",
            "--watch",
            "--interval",
            "100ms",
            "--token",
            &cluster.token,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().expect("a first refresh")?)?;
    assert_eq!(first["status"]["leader_id"], 1);
    assert!(first["throughput"].is_null(), "no rate before a second sample");
    let second: serde_json::Value =
        serde_json::from_str(&lines.next().expect("a second refresh")?)?;
    assert!(
        second["throughput"]["tasks_per_second"].is_number(),
        "the second refresh has rates: {second}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    let status = child.wait()?;
    assert!(status.success(), "Ctrl-C ends --watch cleanly, got {status}");
    Ok(())
}
