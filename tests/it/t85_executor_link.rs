//! The executor link refuses what no honest executor sends: a raw QUIC client with real
//! credentials sends garbage, an oversized frame, a report for a task it does not hold and a
//! Hello for another executor; each gets a clear answer or a dropped connection, the servers
//! keep running, and nothing in the cluster changes.

use colony_proto::pb;
use colony_tests::Cluster;
use std::time::Duration;

const STEP: Duration = Duration::from_secs(10);

struct Raw {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

async fn connect(
    endpoint: &quinn::Endpoint,
    leader: &str,
    creds: &colony_executor::Credentials,
) -> anyhow::Result<Raw> {
    let config = colony_quic::mutual_client_config(&creds.ca_pem, &creds.cert_pem, &creds.key_pem)?;
    let addr: std::net::SocketAddr = leader.parse()?;
    let connection =
        tokio::time::timeout(STEP, endpoint.connect_with(config, addr, colony_quic::SERVER_NAME)?)
            .await??;
    let (send, recv) = connection.open_bi().await?;
    Ok(Raw { connection, send, recv })
}

fn hello(id: u64) -> pb::ExecutorMessage {
    pb::ExecutorMessage {
        body: Some(pb::executor_message::Body::Hello(pb::Hello {
            executor_id: id,
            name: "raw".into(),
            capacity: Some(pb::Resources {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                gpus: 0,
                custom: Default::default(),
            }),
            ..Default::default()
        })),
    }
}

async fn next(raw: &mut Raw) -> anyhow::Result<Option<pb::ServerMessage>> {
    let read = tokio::time::timeout(
        STEP,
        colony_quic::read_frame(&mut raw.recv, colony_quic::FRAME_BYTES_MAX),
    )
    .await?;
    read.map_err(|e| anyhow::anyhow!("{e} ({:?})", raw.connection.close_reason()))
}

/// Waits for the server to close the connection, returning its reason.
async fn closed(raw: &Raw) -> anyhow::Result<String> {
    let error = tokio::time::timeout(STEP, raw.connection.closed()).await?;
    Ok(error.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_forged_messages_are_refused() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    let token = cluster.join_token().await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let leader_addr = cluster.servers[leader].addr.clone();
    let addrs = cluster.addrs();
    let creds = colony_executor::sim::join(&addrs, &token, "raw").await?;
    let other = colony_executor::sim::join(&addrs, &token, "other").await?;
    let endpoint = colony_quic::client_endpoint()?;
    let before = cluster.executors().await?;

    // Bytes that are not a message: the connection is dropped as the peer's fault.
    let mut raw = connect(&endpoint, &leader_addr, &creds).await?;
    colony_quic::write_frame(&mut raw.send, &hello(creds.executor_id.0)).await?;
    assert!(matches!(
        next(&mut raw).await?.and_then(|m| m.body),
        Some(pb::server_message::Body::Welcome(_))
    ));
    raw.send.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).await?;
    let why = closed(&raw).await?;
    assert!(why.contains("malformed"), "{why}");

    // A length prefix over the limit: dropped without reading (or allocating) the body.
    let mut raw = connect(&endpoint, &leader_addr, &creds).await?;
    colony_quic::write_frame(&mut raw.send, &hello(creds.executor_id.0)).await?;
    next(&mut raw).await?;
    raw.send.write_all(&(64u32 << 20).to_be_bytes()).await?;
    let why = closed(&raw).await?;
    assert!(why.contains("malformed") && why.contains("limit") || why.contains("large"), "{why}");

    // A report for a task this executor does not hold: a clear refusal, the session stays.
    let mut raw = connect(&endpoint, &leader_addr, &creds).await?;
    colony_quic::write_frame(&mut raw.send, &hello(creds.executor_id.0)).await?;
    next(&mut raw).await?;
    let report = pb::ExecutorMessage {
        body: Some(pb::executor_message::Body::Report(pb::StatusReport {
            report_id: 7,
            task_id: 424_242,
            fencing_token: 1,
            status: Some(pb::status_report::Status::Started(pb::Started {})),
            traceparent: String::new(),
        })),
    };
    colony_quic::write_frame(&mut raw.send, &report).await?;
    let ack = loop {
        match next(&mut raw).await?.and_then(|m| m.body) {
            Some(pb::server_message::Body::ReportAck(ack)) => break ack,
            Some(_) => continue,
            None => anyhow::bail!("the connection closed instead of acknowledging"),
        }
    };
    assert_eq!(ack.report_id, 7);
    assert!(ack.error.contains("task 424242 does not exist"), "{}", ack.error);
    raw.connection.close(0u32.into(), b"done");

    // A Hello naming another executor with this executor's certificate: refused.
    let mut raw = connect(&endpoint, &leader_addr, &creds).await?;
    colony_quic::write_frame(&mut raw.send, &hello(other.executor_id.0)).await?;
    let why = closed(&raw).await?;
    assert!(why.contains("certificate"), "{why}");

    // An id the cluster never admitted.
    let mut raw = connect(&endpoint, &leader_addr, &creds).await?;
    colony_quic::write_frame(&mut raw.send, &hello(9999)).await?;
    let answer = next(&mut raw).await?.and_then(|m| m.body);
    assert!(
        matches!(&answer, Some(pb::server_message::Body::Error(e)) if e.code() == pb::LinkErrorCode::UnknownExecutor && e.message.contains("unknown")),
        "{answer:?}"
    );

    for server in cluster.servers.iter_mut() {
        assert!(server.is_running(), "server {} must survive bad executor input", server.id);
    }
    let after = cluster.executors().await?;
    let ids =
        |list: &[pb::Executor]| list.iter().map(|e| (e.id, e.name.clone())).collect::<Vec<_>>();
    assert_eq!(ids(&before), ids(&after), "bad messages admitted or removed nobody");
    assert!(after.iter().all(|e| e.tasks.is_empty()), "bad messages assigned nothing");
    Ok(())
}
