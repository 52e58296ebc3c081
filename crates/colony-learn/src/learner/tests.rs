//! The learner against a fake Admin service: following, training, publishing, resuming.

use std::net::SocketAddr;

use tonic::Status;

use super::*;
use crate::device::Device;
use colony_model::features::SCHEMA;
use colony_model::Predictor;

/// With no server reachable the learner stays up, not ready, and stops cleanly on shutdown,
/// leaving its data directory behind.
#[tokio::test]
async fn runs_without_a_cluster_and_shuts_down() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let token = colony_quic::Token::generate_for([7; 32]).to_string();
    let mut config =
        LearnerConfig::new(vec!["127.0.0.1:1".to_owned()], Some(token), dir.path().join("learner"));
    config.device = Device::Cpu;
    run(config, tokio::time::sleep(Duration::from_millis(500))).await?;
    assert!(dir.path().join("learner").join("examples.log").exists());
    Ok(())
}

/// An Admin service with only what the learner calls: a feed of fixed records that ends the
/// first stream after `first_stream_records` (a server going away), then a model registry.
struct FakeAdmin {
    records: Vec<pb::FinishedTask>,
    first_stream_records: usize,
    /// Records up to this sequence number were removed by retention (0: none).
    removed_through: u64,
    state: Arc<std::sync::Mutex<FakeState>>,
    ca: colony_quic::ClusterCa,
    join_token: colony_quic::Token,
}

#[derive(Default)]
struct FakeState {
    watch_after: Vec<u64>,
    models: Vec<pb::Model>,
    /// Who published each model: the role of the client certificate on the connection.
    publishers: Vec<Option<colony_quic::CertRole>>,
    enrollments: usize,
    get_model_calls: usize,
    /// Keeps later streams open, as a live server does.
    open_streams: Vec<mpsc::Sender<Result<pb::FinishedTask, Status>>>,
}

fn fake_state(state: &std::sync::Mutex<FakeState>) -> std::sync::MutexGuard<'_, FakeState> {
    // A test thread that panicked while holding the lock has already failed the test.
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

type Reply<T> = Result<tonic::Response<T>, Status>;

#[tonic::async_trait]
impl pb::admin_server::Admin for FakeAdmin {
    type WatchFinishedTasksStream =
        tonic::codegen::tokio_stream::wrappers::ReceiverStream<Result<pb::FinishedTask, Status>>;
    type SaveSnapshotStream =
        tonic::codegen::tokio_stream::wrappers::ReceiverStream<Result<pb::SnapshotChunk, Status>>;

    async fn save_snapshot(
        &self,
        _: tonic::Request<pb::SaveSnapshotRequest>,
    ) -> Reply<Self::SaveSnapshotStream> {
        Err(Status::unimplemented("fake"))
    }

    async fn watch_finished_tasks(
        &self,
        request: tonic::Request<pb::WatchFinishedTasksRequest>,
    ) -> Reply<Self::WatchFinishedTasksStream> {
        let after_seq = request.into_inner().after_seq;
        if after_seq < self.removed_through {
            let mut trailer = tonic::metadata::MetadataMap::new();
            trailer.insert(colony_proto::RESUME_AFTER_SEQ, self.removed_through.into());
            fake_state(&self.state).watch_after.push(after_seq);
            return Err(Status::with_metadata(tonic::Code::OutOfRange, "removed", trailer));
        }
        let (sender, receiver) = mpsc::channel(self.records.len() + 1);
        let mut state = fake_state(&self.state);
        let first = state.watch_after.is_empty();
        state.watch_after.push(after_seq);
        let mut pending = self.records.iter().filter(|r| r.seq > after_seq);
        let take = if first { self.first_stream_records } else { usize::MAX };
        for record in pending.by_ref().take(take) {
            sender.try_send(Ok(record.clone())).map_err(|e| Status::internal(e.to_string()))?;
        }
        if !first {
            state.open_streams.push(sender);
        }
        Ok(tonic::Response::new(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )))
    }

    async fn publish_model(
        &self,
        request: tonic::Request<pb::PublishModelRequest>,
    ) -> Reply<pb::PublishModelResponse> {
        let publisher =
            request.extensions().get::<colony_client::serve::ConnInfo>().and_then(|c| c.peer);
        let request = request.into_inner();
        let mut state = fake_state(&self.state);
        let version = state.models.len() as u64 + 1;
        let mut model = request.model.ok_or_else(|| Status::invalid_argument("no model"))?;
        model.version = version;
        state.models.push(model);
        state.publishers.push(publisher);
        Ok(tonic::Response::new(pb::PublishModelResponse { version }))
    }

    async fn list_models(
        &self,
        _: tonic::Request<pb::ListModelsRequest>,
    ) -> Reply<pb::ListModelsResponse> {
        let state = fake_state(&self.state);
        Ok(tonic::Response::new(pb::ListModelsResponse {
            models: vec![],
            current: state.models.last().map(|model| model.version),
        }))
    }

    async fn get_model(
        &self,
        request: tonic::Request<pb::GetModelRequest>,
    ) -> Reply<pb::GetModelResponse> {
        let version = request.into_inner().version;
        let mut state = fake_state(&self.state);
        state.get_model_calls += 1;
        let model = state.models.iter().find(|m| m.version == version).cloned();
        Ok(tonic::Response::new(pb::GetModelResponse { model }))
    }

    async fn submit_task(
        &self,
        _: tonic::Request<pb::SubmitTaskRequest>,
    ) -> Reply<pb::SubmitTaskResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn submit_workflow(
        &self,
        _: tonic::Request<pb::SubmitWorkflowRequest>,
    ) -> Reply<pb::SubmitWorkflowResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_workflow(
        &self,
        _: tonic::Request<pb::GetWorkflowRequest>,
    ) -> Reply<pb::GetWorkflowResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_workflows(
        &self,
        _: tonic::Request<pb::ListWorkflowsRequest>,
    ) -> Reply<pb::ListWorkflowsResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn cancel_workflow(
        &self,
        _: tonic::Request<pb::CancelWorkflowRequest>,
    ) -> Reply<pb::CancelWorkflowResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn retry_workflow(
        &self,
        _: tonic::Request<pb::RetryWorkflowRequest>,
    ) -> Reply<pb::RetryWorkflowResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn publish(&self, _: tonic::Request<pb::PublishRequest>) -> Reply<pb::PublishResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn publish_batch(
        &self,
        _: tonic::Request<pb::PublishBatchRequest>,
    ) -> Reply<pb::PublishBatchResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn receive(&self, _: tonic::Request<pb::ReceiveRequest>) -> Reply<pb::ReceiveResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn ack(&self, _: tonic::Request<pb::AckRequest>) -> Reply<pb::AckResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn request(&self, _: tonic::Request<pb::RequestRequest>) -> Reply<pb::RequestResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn create_topic(
        &self,
        _: tonic::Request<pb::CreateTopicRequest>,
    ) -> Reply<pb::CreateTopicResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete_topic(
        &self,
        _: tonic::Request<pb::DeleteTopicRequest>,
    ) -> Reply<pb::DeleteTopicResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_topics(
        &self,
        _: tonic::Request<pb::ListTopicsRequest>,
    ) -> Reply<pb::ListTopicsResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn run_agent(
        &self,
        _: tonic::Request<pb::RunAgentRequest>,
    ) -> Reply<pb::RunAgentResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_agent(
        &self,
        _: tonic::Request<pb::GetAgentRequest>,
    ) -> Reply<pb::GetAgentResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_agents(
        &self,
        _: tonic::Request<pb::ListAgentsRequest>,
    ) -> Reply<pb::ListAgentsResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn scale_agent(
        &self,
        _: tonic::Request<pb::ScaleAgentRequest>,
    ) -> Reply<pb::ScaleAgentResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn stop_agent(
        &self,
        _: tonic::Request<pb::StopAgentRequest>,
    ) -> Reply<pb::StopAgentResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn resolve_agent(
        &self,
        _: tonic::Request<pb::ResolveAgentRequest>,
    ) -> Reply<pb::ResolveAgentResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_task_output(
        &self,
        _: tonic::Request<pb::GetTaskOutputRequest>,
    ) -> Reply<pb::GetTaskOutputResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_task(&self, _: tonic::Request<pb::GetTaskRequest>) -> Reply<pb::GetTaskResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_tasks(
        &self,
        _: tonic::Request<pb::ListTasksRequest>,
    ) -> Reply<pb::ListTasksResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn cancel_task(
        &self,
        _: tonic::Request<pb::CancelTaskRequest>,
    ) -> Reply<pb::CancelTaskResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn cluster_status(
        &self,
        _: tonic::Request<pb::ClusterStatusRequest>,
    ) -> Reply<pb::ClusterStatusResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn state_digest(
        &self,
        _: tonic::Request<pb::StateDigestRequest>,
    ) -> Reply<pb::StateDigestResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn cluster_info(
        &self,
        _: tonic::Request<pb::ClusterInfoRequest>,
    ) -> Reply<pb::ClusterInfoResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn join_cluster(
        &self,
        _: tonic::Request<pb::JoinClusterRequest>,
    ) -> Reply<pb::JoinClusterResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn remove_node(
        &self,
        _: tonic::Request<pb::RemoveNodeRequest>,
    ) -> Reply<pb::RemoveNodeResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn create_join_token(
        &self,
        _: tonic::Request<pb::CreateJoinTokenRequest>,
    ) -> Reply<pb::CreateJoinTokenResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_executors(
        &self,
        _: tonic::Request<pb::ListExecutorsRequest>,
    ) -> Reply<pb::ListExecutorsResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn drain_executor(
        &self,
        _: tonic::Request<pb::DrainExecutorRequest>,
    ) -> Reply<pb::DrainExecutorResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn rollback_model(
        &self,
        _: tonic::Request<pb::RollbackModelRequest>,
    ) -> Reply<pb::RollbackModelResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn enroll(
        &self,
        request: tonic::Request<pb::EnrollRequest>,
    ) -> Reply<pb::EnrollResponse> {
        let request = request.into_inner();
        if request.token != self.join_token.to_string() || request.node_id != 0 {
            return Err(Status::permission_denied("not the learner's join token"));
        }
        let cert_pem = self
            .ca
            .sign_csr(&request.csr_pem, colony_quic::CertRole::Learner(1), &[])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        fake_state(&self.state).enrollments += 1;
        Ok(tonic::Response::new(pb::EnrollResponse {
            cert_pem,
            ca_pem: self.ca.cert_pem().to_owned(),
            cluster_id: "fake".to_owned(),
            members: Default::default(),
        }))
    }
    async fn undrain_executor(
        &self,
        _: tonic::Request<pb::UndrainExecutorRequest>,
    ) -> Reply<pb::UndrainExecutorResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn bootstrap_acl(
        &self,
        _: tonic::Request<pb::BootstrapAclRequest>,
    ) -> Reply<pb::BootstrapAclResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn create_acl_token(
        &self,
        _: tonic::Request<pb::CreateAclTokenRequest>,
    ) -> Reply<pb::CreateAclTokenResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_acl_tokens(
        &self,
        _: tonic::Request<pb::ListAclTokensRequest>,
    ) -> Reply<pb::ListAclTokensResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn revoke_acl_token(
        &self,
        _: tonic::Request<pb::RevokeAclTokenRequest>,
    ) -> Reply<pb::RevokeAclTokenResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn cluster_ca(
        &self,
        _: tonic::Request<pb::ClusterCaRequest>,
    ) -> Reply<pb::ClusterCaResponse> {
        Err(Status::unimplemented("fake"))
    }
}

/// Polls `done` every 50 ms for up to 60 s.
async fn wait_for<F, Fut>(what: &str, mut done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..1200 {
        if done().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(anyhow!("timed out waiting for {what}"))
}

/// A plain HTTP/1.1 GET: the status code and the body, or `None` while nothing listens.
async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: learner\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

async fn metric_line(addr: SocketAddr, line: &str) -> bool {
    http_get(addr, "/metrics").await.is_some_and(|(_, body)| body.lines().any(|l| l == line))
}

/// A port nothing listens on now; the learner binds it a moment later.
fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn start(config: &LearnerConfig) -> (oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let learner = tokio::spawn(run(config.clone(), async move {
        // Either a stop or a dropped sender ends the learner.
        let _ = stopped.await;
    }));
    (stop, learner)
}

/// A `FakeAdmin` served over TLS as a server serves (a server certificate from a CA the join
/// token pins), stopped when dropped.
struct FakeServer {
    state: Arc<std::sync::Mutex<FakeState>>,
    addr: SocketAddr,
    join_token: colony_quic::Token,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl FakeServer {
    async fn start(
        records: Vec<pb::FinishedTask>,
        first_stream_records: usize,
        removed_through: u64,
    ) -> anyhow::Result<FakeServer> {
        let state = Arc::new(std::sync::Mutex::new(FakeState::default()));
        let ca = colony_quic::ClusterCa::generate("fake")?;
        let join_token = colony_quic::Token::generate(&ca);
        let server_cert = ca.issue(colony_quic::CertRole::Server(1), &["127.0.0.1".to_owned()])?;
        let tls = colony_quic::grpc_server_tls(ca.cert_pem(), &server_cert)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let admin = FakeAdmin {
            records,
            first_stream_records,
            removed_through,
            state: state.clone(),
            ca,
            join_token: join_token.clone(),
        };
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::admin_server::AdminServer::new(admin))
                .serve_with_incoming(colony_client::serve::accept(listener, tls)),
        );
        Ok(FakeServer { state, addr, join_token, task })
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The whole agent against a fake server: it follows the feed across a dropped stream,
/// enrolls once, counts failed tasks as rejected, trains, publishes a model that beats the
/// baseline with its certificate, serves its metrics and readiness, and persists its cursor; restarted, it resumes
/// after the cursor, and a round that cannot improve on the current model publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_trains_publishes_and_resumes() -> anyhow::Result<()> {
    let mut records = crate::decide::tests::synthetic_records(600, 7);
    for record in records.iter_mut().step_by(10) {
        if let Some(task) = record.task.as_mut() {
            task.state = pb::TaskState::Failed as i32;
        }
    }
    let accepted = records.len() - records.len().div_ceil(10);
    let last_seq = records.iter().map(|r| r.seq).max().unwrap_or(0);
    let fake = FakeServer::start(records, 250, 0).await?;
    let (state, addr, join_token) = (fake.state.clone(), fake.addr, fake.join_token.clone());
    let dir = tempfile::tempdir()?;
    let metrics_addr = free_addr()?;
    let mut config = LearnerConfig::new(
        vec![addr.to_string()],
        Some(join_token.to_string()),
        dir.path().to_owned(),
    );
    config.device = Device::Cpu;
    config.metrics_listen = Some(metrics_addr);
    config.retrain_interval = Duration::from_millis(300);
    config.train.steps = 400;
    let models = || fake_state(&state).models.clone();

    // First run: everything from the start of the feed.
    let (stop, learner) = start(&config);
    wait_for("readiness", || async {
        http_get(metrics_addr, "/readyz").await.map(|(status, _)| status) == Some(200)
    })
    .await?;
    wait_for("a published model", || async { !models().is_empty() }).await?;
    let cursor = format!("{{\"version\":1,\"after_seq\":{last_seq}}}");
    wait_for("the cursor", || async {
        std::fs::read_to_string(dir.path().join("cursor.json")).is_ok_and(|text| text == cursor)
    })
    .await?;
    for line in [
        "colony_learner_examples_rejected_total{reason=\"not_succeeded\"} 60".to_owned(),
        format!("colony_learner_examples {accepted}"),
        "colony_system_health{component=\"learner\",status=\"healthy\"} 1".to_owned(),
        "colony_learner_watch_reconnects_total 1".to_owned(),
    ] {
        assert!(metric_line(metrics_addr, &line).await, "missing {line}");
    }
    let _ = stop.send(());
    learner.await??;
    {
        let state = fake_state(&state);
        assert_eq!(state.watch_after[..2], [0, 250], "{:?}", state.watch_after);
        let learner = Some(colony_quic::CertRole::Learner(1));
        assert!(state.publishers.iter().all(|p| *p == learner), "{:?}", state.publishers);
        assert_eq!(state.enrollments, 1);
        let model = &state.models[0];
        assert_eq!(model.feature_schema, SCHEMA);
        assert_eq!(model.device, "cpu");
        assert_eq!(model.weights_bytes, model.weights.len() as u64);
        Predictor::from_model(&model.feature_schema, &model.weights)?;
        let metrics = model.metrics.unwrap_or_default();
        assert!(metrics.holdout_mse < metrics.baseline_mse, "{metrics:?}");
        assert_eq!(metrics.previous_mse, None);
        // The first round starts once enough records arrived, never with more than exist.
        assert!(metrics.train_rows + metrics.holdout_rows <= accepted as u64);
    }

    // Second run: resumes after the cursor and trains on the logged examples, all of them.
    let (stop, learner) = start(&config);
    wait_for("the resumed feed", || async {
        fake_state(&state).watch_after.last() == Some(&last_seq)
    })
    .await?;
    wait_for("a round", || async {
        metric_line(metrics_addr, "colony_learner_trainings_total{outcome=\"published\"} 1").await
            || metric_line(metrics_addr, "colony_learner_trainings_total{outcome=\"rejected\"} 1")
                .await
    })
    .await?;
    let _ = stop.send(());
    learner.await??;

    // Third run: the same examples and seed give the same model as the second run's, which
    // either is the current model or lost to it, so it is not published.
    let published = models().len();
    let (stop, learner) = start(&config);
    wait_for("a rejected round", || async {
        metric_line(metrics_addr, "colony_learner_trainings_total{outcome=\"rejected\"} 1").await
    })
    .await?;
    let _ = stop.send(());
    learner.await??;
    assert_eq!(models().len(), published);
    Ok(())
}

/// A learner whose saved cursor fell behind retention is told where to resume: it counts the
/// records it missed, moves its cursor past them and follows on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_behind_retention_resumes_after_the_gap() -> anyhow::Result<()> {
    let records = crate::decide::tests::synthetic_records(100, 3);
    let last_seq = records.iter().map(|r| r.seq).max().unwrap_or(0);
    let fake = FakeServer::start(records, usize::MAX, 40).await?;
    let (state, addr, join_token) = (fake.state.clone(), fake.addr, fake.join_token.clone());
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("cursor.json"), "{\"version\":1,\"after_seq\":5}")?;
    let metrics_addr = free_addr()?;
    let mut config =
        LearnerConfig::new(vec![addr.to_string()], Some(join_token.to_string()), dir.path().into());
    config.device = Device::Cpu;
    config.metrics_listen = Some(metrics_addr);
    let (stop, learner) = start(&config);
    let cursor = format!("{{\"version\":1,\"after_seq\":{last_seq}}}");
    wait_for("the cursor past the gap", || async {
        std::fs::read_to_string(dir.path().join("cursor.json")).is_ok_and(|text| text == cursor)
    })
    .await?;
    for line in ["colony_learner_feed_missed_total 35", "colony_learner_examples 60"] {
        assert!(metric_line(metrics_addr, line).await, "missing {line}");
    }
    let _ = stop.send(());
    learner.await??;
    assert_eq!(fake_state(&state).watch_after[..2], [5, 40]);
    Ok(())
}
