//! Attacks on a real cluster, one class at a time: each is refused with a clear status, changes
//! nothing, and leaves the servers up with flat memory.

use colony_client::{Auth, Channel};
use colony_proto::pb::admin_client::AdminClient;
use colony_proto::pb::raft_client::RaftClient;
use colony_proto::pb::{self, RaftMessage};
use colony_tests::{client_with, task_spec, wait_for, Cluster};
use std::time::Duration;
use tonic::Code;

fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Result<(), Code> {
    result.map(|_| ()).map_err(|status| status.code())
}

/// Every admin RPC once, with an empty request: what each answered.
async fn every_rpc(c: &mut AdminClient<Channel>) -> Vec<(&'static str, Result<(), Code>)> {
    vec![
        ("SubmitTask", code(c.submit_task(pb::SubmitTaskRequest::default()).await)),
        ("GetTask", code(c.get_task(pb::GetTaskRequest::default()).await)),
        ("ListTasks", code(c.list_tasks(pb::ListTasksRequest::default()).await)),
        ("CancelTask", code(c.cancel_task(pb::CancelTaskRequest::default()).await)),
        ("ClusterStatus", code(c.cluster_status(pb::ClusterStatusRequest {}).await)),
        ("StateDigest", code(c.state_digest(pb::StateDigestRequest {}).await)),
        ("ClusterInfo", code(c.cluster_info(pb::ClusterInfoRequest {}).await)),
        ("JoinCluster", code(c.join_cluster(pb::JoinClusterRequest::default()).await)),
        ("RemoveNode", code(c.remove_node(pb::RemoveNodeRequest::default()).await)),
        ("CreateJoinToken", code(c.create_join_token(pb::CreateJoinTokenRequest::default()).await)),
        ("ListExecutors", code(c.list_executors(pb::ListExecutorsRequest::default()).await)),
        ("DrainExecutor", code(c.drain_executor(pb::DrainExecutorRequest::default()).await)),
        ("UndrainExecutor", code(c.undrain_executor(pb::UndrainExecutorRequest::default()).await)),
        (
            "WatchFinishedTasks",
            code(c.watch_finished_tasks(pb::WatchFinishedTasksRequest::default()).await),
        ),
        ("PublishModel", code(c.publish_model(pb::PublishModelRequest::default()).await)),
        ("ListModels", code(c.list_models(pb::ListModelsRequest {}).await)),
        ("GetModel", code(c.get_model(pb::GetModelRequest::default()).await)),
        ("RollbackModel", code(c.rollback_model(pb::RollbackModelRequest::default()).await)),
        ("CreateAclToken", code(c.create_acl_token(pb::CreateAclTokenRequest::default()).await)),
        ("ListAclTokens", code(c.list_acl_tokens(pb::ListAclTokensRequest {}).await)),
        ("RevokeAclToken", code(c.revoke_acl_token(pb::RevokeAclTokenRequest::default()).await)),
        ("ClusterCa", code(c.cluster_ca(pb::ClusterCaRequest {}).await)),
        ("BootstrapAcl", code(c.bootstrap_acl(pb::BootstrapAclRequest {}).await)),
        ("Enroll", code(c.enroll(pb::EnrollRequest::default()).await)),
    ]
}

async fn create_token(
    admin: &mut AdminClient<Channel>,
    role: &str,
    namespaces: &[&str],
    ttl_ms: u64,
) -> anyhow::Result<(String, String)> {
    let created = admin
        .create_acl_token(pb::CreateAclTokenRequest {
            role: role.to_owned(),
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
            ttl_ms,
            description: "t95".to_owned(),
        })
        .await?
        .into_inner();
    Ok((created.token.unwrap_or_default().accessor, created.secret))
}

async fn rss(cluster: &Cluster, index: usize) -> anyhow::Result<u64> {
    Ok(cluster.servers[index].status().await?.rss_bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_class_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    let addrs = cluster.addrs();
    let admin_auth = cluster.auth()?.clone();
    let mut admin = client_with(&addrs[0], &admin_auth)?;
    let ca = cluster.token.parse::<colony_quic::Token>()?.ca_fingerprint;
    let digest_before = admin.state_digest(pb::StateDigestRequest {}).await?.into_inner();

    // 1. Anonymous: every RPC but the two that carry their own proof says UNAUTHENTICATED.
    let mut anonymous = client_with(&addrs[1], &Auth::pinned(ca))?;
    for (rpc, answer) in every_rpc(&mut anonymous).await {
        let expected = match rpc {
            "BootstrapAcl" => Code::FailedPrecondition,
            _ => Code::Unauthenticated,
        };
        assert_eq!(answer, Err(expected), "anonymous {rpc}");
    }
    // A garbage token, and one for another cluster, are refused the same way.
    for garbage in [
        "not-a-token".to_owned(),
        colony_quic::Token::generate_for([9; 32]).to_string(),
        format!("{}.{}", cluster.token.rsplit_once('.').map_or("", |(h, _)| h), "00".repeat(32)),
    ] {
        let forged = match Auth::token(&garbage) {
            Ok(auth) => auth,
            // Not even a token's shape: send it raw, as another client would.
            Err(_) => {
                let mut request = tonic::Request::new(pb::ListTasksRequest::default());
                request
                    .metadata_mut()
                    .insert("authorization", format!("Bearer {garbage}").parse()?);
                let refused = anonymous.list_tasks(request).await.expect_err("garbage token");
                assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
                continue;
            }
        };
        let mut c = client_with(&addrs[0], &forged.with_server_name("colony-server")?)?;
        // A token for another CA fails the handshake; a forged secret is UNAUTHENTICATED.
        let answer = c.list_tasks(pb::ListTasksRequest::default()).await;
        match answer {
            Err(status) if status.code() == Code::Unauthenticated => {}
            Err(status) if colony_client::tls_failure(&status).is_some() => {}
            other => panic!("{garbage}: {other:?}"),
        }
    }

    // 2. Tokens without the permission, in another namespace, expired, revoked.
    let (_, reader) = create_token(&mut admin, "reader", &[], 0).await?;
    let mut as_reader = client_with(&addrs[2], &Auth::token(&reader)?)?;
    let refused = as_reader
        .submit_task(pb::SubmitTaskRequest { spec: Some(task_spec("r", None)) })
        .await
        .expect_err("a reader cannot submit");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    for (rpc, answer) in every_rpc(&mut as_reader).await {
        if matches!(
            rpc,
            "CreateAclToken"
                | "RevokeAclToken"
                | "RemoveNode"
                | "CreateJoinToken"
                | "RollbackModel"
                | "PublishModel"
                | "DrainExecutor"
                | "UndrainExecutor"
                | "JoinCluster"
                | "WatchFinishedTasks"
        ) {
            assert_eq!(answer, Err(Code::PermissionDenied), "reader {rpc}");
        }
    }
    let (accessor, submitter) = create_token(&mut admin, "submitter", &["research"], 0).await?;
    let mut as_submitter = client_with(&addrs[1], &Auth::token(&submitter)?)?;
    let refused = as_submitter
        .submit_task(pb::SubmitTaskRequest { spec: Some(task_spec("elsewhere", None)) })
        .await
        .expect_err("default is not research");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    let mut secret_spec = pb::TaskSpec { namespace: "research".into(), ..task_spec("mine", None) };
    if let Some(pb::task_spec::Run::Process(p)) = secret_spec.run.as_mut() {
        p.env.insert("API_KEY".into(), "hunter2".into());
    }
    let mine = as_submitter
        .submit_task(pb::SubmitTaskRequest { spec: Some(secret_spec) })
        .await?
        .into_inner()
        .task
        .unwrap_or_default();
    let env = |task: Option<pb::Task>| match task.and_then(|t| t.spec).and_then(|s| s.run) {
        Some(pb::task_spec::Run::Process(p)) => p.env.get("API_KEY").cloned(),
        _ => None,
    };
    let as_reader_sees =
        as_reader.get_task(pb::GetTaskRequest { id: mine.id, consistency: None }).await?;
    assert_eq!(env(as_reader_sees.into_inner().task).as_deref(), Some("<redacted>"));
    let as_admin_sees =
        admin.get_task(pb::GetTaskRequest { id: mine.id, consistency: None }).await?;
    assert_eq!(env(as_admin_sees.into_inner().task).as_deref(), Some("hunter2"));

    let (_, short) = create_token(&mut admin, "reader", &[], 1_500).await?;
    let mut as_short = client_with(&addrs[0], &Auth::token(&short)?)?;
    as_short.list_tasks(pb::ListTasksRequest::default()).await?;
    let expired = wait_for("the short token to expire", Duration::from_secs(10), || {
        let mut as_short = as_short.clone();
        async move { Ok(as_short.list_tasks(pb::ListTasksRequest::default()).await.err()) }
    })
    .await?;
    assert_eq!(expired.code(), Code::Unauthenticated, "{expired}");
    assert!(expired.message().contains("expired"), "{expired}");

    // Revocation reaches every server within a second (each reads its own applied state).
    let stale = Some(pb::ReadConsistency { stale: true });
    for addr in &addrs {
        let mut c = client_with(addr, &Auth::token(&submitter)?)?;
        c.get_task(pb::GetTaskRequest { id: mine.id, consistency: stale }).await?;
    }
    admin.revoke_acl_token(pb::RevokeAclTokenRequest { accessor: accessor.clone() }).await?;
    let clients: Vec<AdminClient<Channel>> = addrs
        .iter()
        .map(|addr| client_with(addr, &Auth::token(&submitter)?))
        .collect::<anyhow::Result<_>>()?;
    wait_for("every server to refuse the revoked token", Duration::from_secs(1), || {
        let clients = clients.clone();
        async move {
            for mut c in clients {
                let answer =
                    c.get_task(pb::GetTaskRequest { id: mine.id, consistency: stale }).await;
                if answer.as_ref().err().map(tonic::Status::code) != Some(Code::Unauthenticated) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        }
    })
    .await?;

    // 3. Raft from anything but a server certificate: refused in the handshake (no certificate,
    // a learner's), or, on the callers' side of the port, UNAUTHENTICATED.
    let message = || RaftMessage { cluster_id: String::new(), payload: vec![1] };
    let mut raft_anonymous = RaftClient::new(
        Auth::pinned(ca).with_server_name("colony-raft")?.channel(endpoint(&addrs[0])?),
    );
    let refused = raft_anonymous.vote(message()).await.expect_err("no certificate");
    assert!(refused_in_handshake(&refused), "handshake refusal expected: {refused:?}");
    let learner_token = cluster.join_token_of("learner").await?;
    let learner = enroll(&addrs, &learner_token, 0, "").await?;
    let learner_auth = Auth::certificate(&learner.0, &learner.1, "colony-raft")?;
    let mut raft_learner = RaftClient::new(learner_auth.channel(endpoint(&addrs[0])?));
    let refused = raft_learner.vote(message()).await.expect_err("a learner's certificate");
    assert!(refused_in_handshake(&refused), "handshake refusal expected: {refused:?}");
    let mut raft_with_token = RaftClient::new(admin_auth.channel(endpoint(&addrs[0])?));
    let refused = raft_with_token.vote(message()).await.expect_err("a token is not a server");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");

    // 4. A forged length prefix from a (real) server certificate: refused, and the server's
    // memory stays flat.
    let rss_before = rss(&cluster, 0).await?;
    let server_token = cluster.join_token_of("server").await?;
    let server = enroll(&addrs, &server_token, 99, "127.0.0.1:1").await?;
    let server_auth = Auth::certificate(&server.0, &server.1, "colony-raft")?;
    let mut raft_server = RaftClient::new(server_auth.channel(endpoint(&addrs[0])?));
    let cluster_id = admin.cluster_info(pb::ClusterInfoRequest {}).await?.into_inner().cluster_id;
    let mut forged = vec![1u8, 253];
    forged.extend_from_slice(&(1u64 << 50).to_le_bytes());
    for _ in 0..3 {
        let request = RaftMessage { cluster_id: cluster_id.clone(), payload: forged.clone() };
        let refused = raft_server.append_entries(request).await.expect_err("forged length");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");
        let request = RaftMessage { cluster_id: cluster_id.clone(), payload: forged.clone() };
        let refused = raft_server.install_snapshot(request).await.expect_err("forged length");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");
    }

    // 4b. TimeoutNow (the stopping leader's "stand for election now"): garbage is refused, and a
    // well-formed vote that is not the current leader's is answered `false` and starts no election.
    let before = admin.cluster_status(pb::ClusterStatusRequest {}).await?.into_inner();
    for payload in [vec![], vec![1u8], vec![1, 253, 255, 255], vec![9, 1, 1, 1]] {
        let request = RaftMessage { cluster_id: cluster_id.clone(), payload };
        let refused = raft_server.timeout_now(request).await.expect_err("garbage TimeoutNow");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");
    }
    // [wire version 1][bincode varints: term 99, node 7][committed: true]: a vote of a leader
    // that does not exist.
    let stranger_vote = RaftMessage { cluster_id: cluster_id.clone(), payload: vec![1, 99, 7, 1] };
    let answer = raft_server.timeout_now(stranger_vote).await?.into_inner();
    assert_eq!(answer.payload, vec![1, 0], "a stranger's TimeoutNow must be answered false");
    let after = admin.cluster_status(pb::ClusterStatusRequest {}).await?.into_inner();
    assert_eq!(
        (after.term, after.leader_id),
        (before.term, before.leader_id),
        "a stranger's TimeoutNow must not start an election"
    );

    // 5. Thousands of concurrent calls on one connection: served or refused, never a crash.
    let (_, many) = create_token(&mut admin, "reader", &[], 0).await?;
    let one = client_with(&addrs[0], &Auth::token(&many)?)?;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..3000 {
        let mut c = one.clone();
        calls.spawn(async move {
            c.get_task(pb::GetTaskRequest { id: mine.id, consistency: None }).await.is_ok()
        });
    }
    let mut served = 0;
    while let Some(ok) = calls.join_next().await {
        served += usize::from(ok?);
    }
    assert!(served > 0, "a busy connection still gets answers");
    let rss_after = rss(&cluster, 0).await?;
    assert!(
        rss_after < rss_before + (200 << 20),
        "memory grew from {rss_before} to {rss_after} bytes"
    );

    // Nothing refused changed the state: only the one accepted submission did (and the tokens).
    let tasks = admin.list_tasks(pb::ListTasksRequest::default()).await?.into_inner().tasks;
    assert_eq!(tasks.iter().map(|t| t.id).collect::<Vec<_>>(), vec![mine.id]);
    assert!(digest_before.applied_index > 0);

    // The audit trail names the refusals, by accessor, never by secret.
    // Each request is recorded by the server that served it (the leader, for a forwarded one).
    let mut trail = String::new();
    for server in &cluster.servers {
        trail += &std::fs::read_to_string(server.data_dir.join("audit/audit.jsonl"))?;
    }
    assert!(trail.lines().any(|l| l.contains("\"denied\"") && l.contains(&accessor)), "{trail}");
    for secret in [&cluster.token, &reader, &submitter] {
        let hex = secret.rsplit_once('.').map_or("", |(_, s)| s);
        assert!(!trail.contains(hex), "a secret reached the audit trail");
    }

    // 8. Read your token: one created on the leader is accepted at once by every follower, even
    // by a call a follower answers itself, before the follower would have applied it alone.
    // The followers' connections are open before the token exists, so the call follows the
    // creation's answer as closely as a client can.
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    let mut on_leader = client_with(&addrs[leader], &admin_auth)?;
    let mut followers = Vec::new();
    for (i, addr) in addrs.iter().enumerate().filter(|(i, _)| *i != leader) {
        let mut follower = client_with(addr, &Auth::pinned(ca))?;
        // Any answer, a refusal included, leaves the connection open.
        let _ = follower.cluster_ca(pb::ClusterCaRequest {}).await;
        followers.push((i, follower));
    }
    for round in 0..20 {
        let (_, secret) = create_token(&mut on_leader, "reader", &[], 0).await?;
        for (i, follower) in &mut followers {
            let mut request = tonic::Request::new(pb::ClusterStatusRequest {});
            request.metadata_mut().insert("authorization", format!("Bearer {secret}").parse()?);
            let answer = follower.cluster_status(request).await;
            assert!(answer.is_ok(), "round {round}: server {i} refused a new token: {answer:?}");
        }
    }
    for server in &cluster.servers {
        server.status().await?;
    }
    Ok(())
}

/// Whether a call failed on the connection rather than with a server's answer: with TLS 1.3
/// the client finishes its side first, so the server's refusal of its certificate arrives as an
/// alert (a TLS error) or as the connection closing under the first request.
fn refused_in_handshake(status: &tonic::Status) -> bool {
    colony_client::tls_failure(status).is_some()
        || (matches!(status.code(), Code::Unknown | Code::Unavailable | Code::Cancelled)
            && std::error::Error::source(status).is_some())
}

fn endpoint(addr: &str) -> anyhow::Result<tonic::transport::Endpoint> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2)))
}

/// Enrolls a key with a join token: `(CA PEM, certificate and key)`.
async fn enroll(
    addrs: &[String],
    token: &str,
    node_id: u64,
    addr: &str,
) -> anyhow::Result<(String, colony_quic::CertifiedKey)> {
    let parsed: colony_quic::Token = token.parse()?;
    let (key_pem, csr_pem) = colony_quic::new_key_and_csr()?;
    let mut c = client_with(&addrs[0], &Auth::pinned(parsed.ca_fingerprint))?;
    let enrolled = c
        .enroll(pb::EnrollRequest {
            token: token.to_owned(),
            csr_pem,
            node_id,
            addr: addr.to_owned(),
        })
        .await?
        .into_inner();
    Ok((enrolled.ca_pem, colony_quic::CertifiedKey { cert_pem: enrolled.cert_pem, key_pem }))
}
