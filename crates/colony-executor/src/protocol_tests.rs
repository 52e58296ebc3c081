//! The agent against a scripted server over real QUIC on loopback: join, redirect, Hello,
//! assignments, reports resent across a dropped connection, kills and graceful shutdown. The
//! scripted server plays the leader's side of executor.proto; nothing of the agent is mocked.

use crate::config::ExecutorConfig;
use anyhow::{bail, Context};
use colony_core::Resources;
use colony_proto::pb;
use colony_quic::{ClusterCa, Token, FRAME_BYTES_MAX};
use pb::executor_message::Body as Up;
use pb::server_message::Body as Down;
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use std::future::IntoFuture;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::sync::oneshot;

/// Every step finishes well within this on loopback; a hang fails the test instead.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
const HEARTBEAT_INTERVAL_MS: u64 = 100;

async fn within<T>(what: &str, future: impl IntoFuture<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, future).await.with_context(|| format!("timed out: {what}"))
}

fn server(ca: &ClusterCa) -> anyhow::Result<(Endpoint, SocketAddr)> {
    let config = colony_quic::server_config(ca, &ca.issue_server_cert()?)?;
    let endpoint = Endpoint::server(config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    let addr = endpoint.local_addr()?;
    Ok((endpoint, addr))
}

/// The server side of one executor connection.
struct Peer {
    conn: Connection,
    send: SendStream,
    recv: RecvStream,
}

impl Peer {
    async fn accept(endpoint: &Endpoint) -> anyhow::Result<Peer> {
        let incoming = within("accept", endpoint.accept()).await?.context("endpoint closed")?;
        let conn = within("handshake", incoming).await??;
        let (send, recv) = within("accept_bi", conn.accept_bi()).await??;
        Ok(Peer { conn, send, recv })
    }

    async fn next(&mut self) -> anyhow::Result<Up> {
        let message: Option<pb::ExecutorMessage> =
            within("read", colony_quic::read_frame(&mut self.recv, FRAME_BYTES_MAX)).await??;
        message.and_then(|m| m.body).context("stream ended")
    }

    /// The next message that is not a heartbeat.
    async fn next_non_heartbeat(&mut self) -> anyhow::Result<Up> {
        loop {
            match self.next().await? {
                Up::Heartbeat(_) => {}
                other => return Ok(other),
            }
        }
    }

    async fn next_heartbeat(&mut self) -> anyhow::Result<pb::Heartbeat> {
        loop {
            if let Up::Heartbeat(heartbeat) = self.next().await? {
                return Ok(heartbeat);
            }
        }
    }

    async fn next_report(&mut self) -> anyhow::Result<pb::StatusReport> {
        match self.next_non_heartbeat().await? {
            Up::Report(report) => Ok(report),
            other => bail!("expected a report, got {other:?}"),
        }
    }

    async fn send(&mut self, body: Down) -> anyhow::Result<()> {
        colony_quic::write_frame(&mut self.send, &pb::ServerMessage { body: Some(body) }).await?;
        Ok(())
    }

    async fn hello(&mut self) -> anyhow::Result<pb::Hello> {
        match self.next().await? {
            Up::Hello(hello) => Ok(hello),
            other => bail!("expected Hello, got {other:?}"),
        }
    }
}

fn assign(task_id: u64, fencing_token: u64, run: pb::task_spec::Run) -> Down {
    let spec = pb::TaskSpec {
        name: format!("t{task_id}"),
        run: Some(run),
        resources: Some(pb::Resources { cpu_millis: 500, ..Default::default() }),
        ..Default::default()
    };
    Down::Assign(pb::Assign {
        task_id,
        attempt: 1,
        fencing_token,
        spec: Some(spec),
        ..Default::default()
    })
}

fn running(list: &[pb::RunningTask]) -> Vec<(u64, u64)> {
    list.iter().map(|r| (r.task_id, r.fencing_token)).collect()
}

#[tokio::test]
async fn agent_joins_follows_redirects_reports_and_stops() -> anyhow::Result<()> {
    let ca = ClusterCa::generate("protocol")?;
    let token = Token::generate(&ca);
    let (follower, follower_addr) = server(&ca)?;
    let (leader, leader_addr) = server(&ca)?;
    let data_dir = tempfile::tempdir()?;
    let work_dir = tempfile::tempdir()?;
    let config = ExecutorConfig {
        servers: vec![follower_addr.to_string()],
        token: Some(token.to_string()),
        data_dir: data_dir.path().to_owned(),
        name: "worker-1".to_owned(),
        capacity: Resources {
            cpu_millis: 2000,
            memory_bytes: 1 << 30,
            gpus: 0,
            ..Resources::default()
        },
        labels: [("zone".to_owned(), "a".to_owned())].into(),
        capabilities: ["shell".to_owned()].into(),
        metrics_listen: None,
        work_dir: Some(work_dir.path().to_owned()),
        run_as: None,
        require_limits: false,
        cgroups: true,
        task_pids_max: crate::TASK_PIDS_MAX_DEFAULT,
        ports: crate::PORT_RANGE_DEFAULT,
        advertise_host: None,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(crate::run(config, async move {
        let _ = stopped.await;
    }));

    // Join: the follower redirects, the leader admits.
    let mut peer = Peer::accept(&follower).await?;
    let Up::Join(join) = peer.next().await? else { bail!("expected Join") };
    assert_eq!((join.token.as_str(), join.name.as_str()), (token.to_string().as_str(), "worker-1"));
    peer.send(Down::Redirect(pb::Redirect { leader_address: leader_addr.to_string() })).await?;
    let mut peer = Peer::accept(&leader).await?;
    let Up::Join(join) = peer.next().await? else { bail!("expected Join") };
    let cert_pem = ca.sign_executor_csr(&join.csr_pem, 5)?;
    peer.send(Down::JoinAccepted(pb::JoinAccepted {
        executor_id: 5,
        cert_pem,
        ca_pem: ca.cert_pem().to_owned(),
    }))
    .await?;

    // Session: Hello goes to the follower first (the configured server), which redirects again.
    let mut peer = Peer::accept(&follower).await?;
    let hello = peer.hello().await?;
    assert_eq!(
        (hello.executor_id, hello.name.as_str(), hello.capabilities.as_slice()),
        (5, "worker-1", ["shell".to_owned()].as_slice())
    );
    peer.send(Down::Redirect(pb::Redirect { leader_address: leader_addr.to_string() })).await?;
    let mut peer = Peer::accept(&leader).await?;
    assert!(peer.hello().await?.running.is_empty());
    peer.send(Down::Welcome(pb::Welcome { heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS })).await?;
    assert!(data_dir.path().join("identity.json").exists());

    // An assignment is started, reported, and an Assign repeated for it changes nothing.
    let echo =
        pb::task_spec::Run::Builtin(pb::BuiltinRun { handler: "echo".into(), input: "hi".into() });
    peer.send(assign(1, 10, echo.clone())).await?;
    peer.send(assign(1, 10, echo)).await?;
    let started = peer.next_report().await?;
    assert!(matches!(started.status, Some(pb::status_report::Status::Started(_))));
    let finished = peer.next_report().await?;
    let Some(pb::status_report::Status::Finished(result)) = &finished.status else {
        bail!("expected Finished")
    };
    assert_eq!(
        (result.outcome, result.stdout_tail.as_str()),
        (pb::AttemptOutcome::Succeeded as i32, "hi")
    );
    peer.send(Down::ReportAck(pb::ReportAck {
        report_id: started.report_id,
        error: String::new(),
    }))
    .await?;

    // Until Finished is acknowledged the attempt still counts as running; the connection drops.
    assert_eq!(running(&peer.next_heartbeat().await?.running), [(1, 10)]);
    colony_quic::CloseCode::GoingAway.close(&peer.conn, "leader stepping down");

    // The agent comes back with the last leader first and re-sends the unacknowledged report.
    let mut peer = Peer::accept(&leader).await?;
    assert_eq!(running(&peer.hello().await?.running), [(1, 10)]);
    peer.send(Down::Welcome(pb::Welcome { heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS })).await?;
    let resent = peer.next_report().await?;
    assert_eq!((resent.report_id, resent.fencing_token), (finished.report_id, 10));
    peer.send(Down::ReportAck(pb::ReportAck { report_id: resent.report_id, error: String::new() }))
        .await?;
    // Acknowledged: no longer running, and not reported again.
    let mut heartbeat = peer.next_heartbeat().await?;
    while !heartbeat.running.is_empty() {
        heartbeat = peer.next_heartbeat().await?;
    }

    // A process attempt, killed by the leader: its group dies and nothing is reported.
    // Somewhere the task's user (nobody, when the test runs as root) may write.
    let shared = tempfile::tempdir()?;
    std::fs::set_permissions(shared.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let pid_file = shared.path().join("pid");
    let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
    let sleeper = pb::task_spec::Run::Process(pb::ProcessRun {
        program: "sh".into(),
        args: vec!["-c".into(), script],
        env: Default::default(),
    });
    peer.send(assign(2, 20, sleeper)).await?;
    let started = peer.next_report().await?;
    assert_eq!((started.task_id, started.fencing_token), (2, 20));
    peer.send(Down::ReportAck(pb::ReportAck {
        report_id: started.report_id,
        error: String::new(),
    }))
    .await?;
    assert_eq!(running(&peer.next_heartbeat().await?.running), [(2, 20)]);
    peer.send(Down::Kill(pb::Kill { task_id: 2, fencing_token: 20, reason: "superseded".into() }))
        .await?;
    let mut heartbeat = peer.next_heartbeat().await?;
    while !heartbeat.running.is_empty() {
        heartbeat = peer.next_heartbeat().await?;
    }

    // A failing attempt then a graceful stop: the Finished report arrives and is acknowledged,
    // then the agent closes with code 0 and returns.
    let fail =
        pb::task_spec::Run::Builtin(pb::BuiltinRun { handler: "fail".into(), input: "no".into() });
    peer.send(assign(3, 30, fail)).await?;
    let mut reports = Vec::new();
    while reports.len() < 2 {
        let report = peer.next_report().await?;
        peer.send(Down::ReportAck(pb::ReportAck {
            report_id: report.report_id,
            error: String::new(),
        }))
        .await?;
        reports.push(report);
    }
    // The killed attempt sent only Started: the next reports are the failure's.
    assert_eq!(reports.iter().map(|r| r.task_id).collect::<Vec<_>>(), [3, 3]);
    let Some(pb::status_report::Status::Finished(result)) = &reports[1].status else {
        bail!("expected Finished")
    };
    assert_eq!(
        (result.outcome, result.message.as_str()),
        (pb::AttemptOutcome::Failed as i32, "no")
    );
    let _ = stop.send(());
    let closed = within("close", peer.conn.closed()).await?;
    assert!(colony_quic::CloseCode::Stopping.closed_by_peer_with(&peer.conn), "{closed:?}");
    within("agent exit", agent).await??.context("agent")?;
    Ok(())
}

#[tokio::test]
async fn unknown_executor_is_fatal() -> anyhow::Result<()> {
    let ca = ClusterCa::generate("protocol")?;
    let (leader, leader_addr) = server(&ca)?;
    let data_dir = tempfile::tempdir()?;
    let work_dir = tempfile::tempdir()?;
    let (key_pem, csr_pem) = colony_quic::new_key_and_csr()?;
    let creds = crate::Credentials {
        executor_id: colony_core::ExecutorId(9),
        key_pem,
        cert_pem: ca.sign_executor_csr(&csr_pem, 9)?,
        ca_pem: ca.cert_pem().to_owned(),
    };
    crate::identity::store(data_dir.path(), &creds)?;
    let config = ExecutorConfig {
        servers: vec![leader_addr.to_string()],
        token: None,
        data_dir: data_dir.path().to_owned(),
        name: "gone".to_owned(),
        capacity: Resources::default(),
        labels: Default::default(),
        capabilities: Default::default(),
        metrics_listen: None,
        work_dir: Some(work_dir.path().to_owned()),
        run_as: None,
        require_limits: false,
        cgroups: true,
        task_pids_max: crate::TASK_PIDS_MAX_DEFAULT,
        ports: crate::PORT_RANGE_DEFAULT,
        advertise_host: None,
    };
    let agent = tokio::spawn(crate::run(config, std::future::pending()));
    let mut peer = Peer::accept(&leader).await?;
    peer.hello().await?;
    peer.send(Down::Error(pb::LinkError {
        message: "executor 9 is unknown to this cluster".into(),
        code: pb::LinkErrorCode::UnknownExecutor.into(),
    }))
    .await?;
    let error = within("agent exit", agent).await??.expect_err("fatal");
    assert!(format!("{error:#}").contains("executor 9 is unknown to this cluster"), "{error:#}");
    Ok(())
}

/// An executor killed after starting an attempt, restarted on the same data, is sent that
/// attempt again (its Started report never committed): it must refuse it, not run it twice.
#[tokio::test]
async fn a_restarted_agent_never_starts_an_attempt_twice() -> anyhow::Result<()> {
    let ca = ClusterCa::generate("protocol")?;
    let (leader, leader_addr) = server(&ca)?;
    let data_dir = tempfile::tempdir()?;
    let work_dir = tempfile::tempdir()?;
    let (key_pem, csr_pem) = colony_quic::new_key_and_csr()?;
    let creds = crate::Credentials {
        executor_id: colony_core::ExecutorId(4),
        key_pem,
        cert_pem: ca.sign_executor_csr(&csr_pem, 4)?,
        ca_pem: ca.cert_pem().to_owned(),
    };
    crate::identity::store(data_dir.path(), &creds)?;
    let config = ExecutorConfig {
        servers: vec![leader_addr.to_string()],
        token: None,
        data_dir: data_dir.path().to_owned(),
        name: "crashy".to_owned(),
        capacity: Resources { cpu_millis: 2000, ..Resources::default() },
        labels: Default::default(),
        capabilities: Default::default(),
        metrics_listen: None,
        work_dir: Some(work_dir.path().to_owned()),
        run_as: None,
        require_limits: false,
        cgroups: true,
        task_pids_max: crate::TASK_PIDS_MAX_DEFAULT,
        ports: crate::PORT_RANGE_DEFAULT,
        advertise_host: None,
    };
    let echo = pb::task_spec::Run::Builtin(pb::BuiltinRun {
        handler: "echo".into(),
        input: "once".into(),
    });

    // First life: the attempt starts; the agent is then stopped without a word (as kill -9 would).
    let first = tokio::spawn(crate::run(config.clone(), std::future::pending()));
    let mut peer = Peer::accept(&leader).await?;
    peer.hello().await?;
    peer.send(Down::Welcome(pb::Welcome { heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS })).await?;
    peer.send(assign(1, 10, echo.clone())).await?;
    let started = peer.next_report().await?;
    assert!(matches!(started.status, Some(pb::status_report::Status::Started(_))));
    first.abort();
    let _ = first.await;

    // Second life: the same assignment is refused as failed; a new one runs.
    let second = tokio::spawn(crate::run(config, std::future::pending()));
    let mut peer = Peer::accept(&leader).await?;
    peer.hello().await?;
    peer.send(Down::Welcome(pb::Welcome { heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS })).await?;
    peer.send(assign(1, 10, echo.clone())).await?;
    let mut refused = peer.next_report().await?;
    if matches!(refused.status, Some(pb::status_report::Status::Started(_))) {
        refused = peer.next_report().await?;
    }
    let Some(pb::status_report::Status::Finished(result)) = &refused.status else {
        bail!("expected Finished, got {refused:?}")
    };
    assert_eq!(
        (refused.task_id, refused.fencing_token, result.outcome),
        (1, 10, pb::AttemptOutcome::Failed as i32)
    );
    assert!(result.message.contains("restarted") && result.stdout_tail.is_empty(), "{result:?}");
    peer.send(assign(2, 20, echo)).await?;
    let mut reports = Vec::new();
    while reports.len() < 2 {
        let report = peer.next_report().await?;
        if report.task_id == 2 {
            reports.push(report);
        }
    }
    let Some(pb::status_report::Status::Finished(result)) = &reports[1].status else {
        bail!("expected Finished")
    };
    assert_eq!(
        (result.outcome, result.stdout_tail.as_str()),
        (pb::AttemptOutcome::Succeeded as i32, "once")
    );
    second.abort();
    Ok(())
}

#[tokio::test]
async fn simulated_executor_holds_then_succeeds() -> anyhow::Result<()> {
    let ca = ClusterCa::generate("protocol")?;
    let token = Token::generate(&ca);
    let (leader, leader_addr) = server(&ca)?;
    let servers = vec![leader_addr.to_string()];
    let joining = tokio::spawn({
        let (servers, token) = (servers.clone(), token.to_string());
        async move { crate::sim::join(&servers, &token, "sim").await }
    });
    let mut peer = Peer::accept(&leader).await?;
    let Up::Join(join) = peer.next().await? else { bail!("expected Join") };
    let cert_pem = ca.sign_executor_csr(&join.csr_pem, 77)?;
    peer.send(Down::JoinAccepted(pb::JoinAccepted {
        executor_id: 77,
        cert_pem,
        ca_pem: ca.cert_pem().to_owned(),
    }))
    .await?;
    let creds = within("join", joining).await???;
    assert_eq!(creds.executor_id, colony_core::ExecutorId(77));

    let endpoint = colony_quic::client_endpoint()?;
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let hold = Duration::from_millis(200);
    let capacity = Resources { cpu_millis: 1000, ..Resources::default() };
    let sim = tokio::spawn(crate::sim::SimExecutor::run(
        endpoint,
        servers,
        creds,
        capacity,
        Default::default(),
        crate::sim::fixed(hold, 0),
        events_tx,
    ));
    let mut peer = Peer::accept(&leader).await?;
    let hello = peer.hello().await?;
    assert_eq!((hello.executor_id, hello.capacity.map(|c| c.cpu_millis)), (77, Some(1000)));
    peer.send(Down::Welcome(pb::Welcome { heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS })).await?;
    let sent = std::time::Instant::now();
    peer.send(assign(
        4,
        40,
        pb::task_spec::Run::Builtin(pb::BuiltinRun { handler: "sleep".into(), input: "1h".into() }),
    ))
    .await?;
    let Some(crate::sim::SimEvent::Assigned { task_id, at, .. }) =
        within("event", events.recv()).await?
    else {
        bail!("events closed")
    };
    assert_eq!(task_id, colony_core::TaskId(4));
    assert!(at >= sent);
    let started = peer.next_report().await?;
    assert!(matches!(started.status, Some(pb::status_report::Status::Started(_))));
    let finished = peer.next_report().await?;
    assert!(at.elapsed() >= hold);
    let Some(pb::status_report::Status::Finished(result)) = finished.status else {
        bail!("expected Finished")
    };
    assert_eq!(result.outcome, pb::AttemptOutcome::Succeeded as i32);
    sim.abort();
    Ok(())
}
