//! Each process attempt's local endpoint: a Unix socket in its working directory
//! (`$COLONY_AGENT_SOCKET`) that speaks the admin gRPC API's messaging and discovery calls
//! (Publish, PublishBatch, Receive, Ack, Request, ListTopics, ResolveAgent) with no credentials
//! of the task's own. The executor makes each call to the servers with its own certificate, naming the attempt
//! (`x-colony-attempt: TASK.TOKEN`): the servers treat it as a submitter in the task's namespace
//! while the attempt is current, and fence what it writes by its token at commit, so a superseded
//! attempt can no longer publish, receive or ack. Every other call is refused here.

use crate::attempt::Attempt;
use crate::sandbox::RunAs;
use colony_client::Client;
use colony_proto::pb;
use colony_proto::pb::admin_server::{Admin, AdminServer};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

/// The socket's name in the attempt's working directory.
pub(crate) const SOCKET_NAME: &str = "colony.sock";
/// The longest path a Unix socket address holds (`sun_path`, with its terminating zero).
const SOCKET_PATH_BYTES_MAX: usize = 107;
/// The largest request a task may send through its socket (a message is at most 64 KiB).
const REQUEST_BYTES_MAX: usize = 1 << 20;
/// Calls one connection may have in flight at once.
const CALLS_PER_CONNECTION_MAX: usize = 32;
/// The header naming the attempt a call is made for (the servers' `auth::ATTEMPT`).
const ATTEMPT_HEADER: &str = "x-colony-attempt";

/// What every attempt's endpoint shares: the executor's client to the servers.
#[derive(Clone)]
pub(crate) struct LocalApi {
    client: Arc<Client>,
}

/// A running endpoint; stops serving (and its socket goes) when dropped.
pub(crate) struct LocalEndpoint {
    pub path: PathBuf,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for LocalEndpoint {
    fn drop(&mut self) {
        self.server.abort();
        // The working directory usually goes with the attempt; a kept one keeps no socket.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl LocalApi {
    pub(crate) fn new(client: Client) -> LocalApi {
        LocalApi { client: Arc::new(client) }
    }

    /// Serves `attempt`'s endpoint in its working directory `dir`, owned by the user the attempt
    /// runs as (and nobody else).
    pub(crate) fn serve(
        &self,
        dir: &Path,
        attempt: &Attempt,
        namespace: &str,
        owner: Option<&RunAs>,
    ) -> io::Result<LocalEndpoint> {
        let path = dir.join(SOCKET_NAME);
        if path.as_os_str().len() > SOCKET_PATH_BYTES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is longer than a Unix socket path may be ({SOCKET_PATH_BYTES_MAX} bytes): use a shorter --work-dir",
                    path.display()
                ),
            ));
        }
        let listener = tokio::net::UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        if let Some(user) = owner {
            nix::unistd::chown(
                &path,
                Some(nix::unistd::Uid::from_raw(user.uid)),
                Some(nix::unistd::Gid::from_raw(user.gid)),
            )
            .map_err(io::Error::from)?;
        }
        let header =
            MetadataValue::try_from(format!("{}.{}", attempt.task_id.0, attempt.fencing_token.0))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let service =
            AttemptAdmin { client: self.client.clone(), header, namespace: namespace.to_owned() };
        let incoming = futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| stream);
            Some((accepted, listener))
        });
        let task = attempt.task_id;
        let server = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .concurrency_limit_per_connection(CALLS_PER_CONNECTION_MAX)
                .add_service(
                    AdminServer::new(service)
                        .max_decoding_message_size(REQUEST_BYTES_MAX)
                        .max_encoding_message_size(REQUEST_BYTES_MAX),
                )
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = served {
                tracing::warn!(%task, error = %e, "the attempt's local endpoint stopped");
            }
        });
        Ok(LocalEndpoint { path, server })
    }
}

/// One attempt's calls, made for it by the executor.
struct AttemptAdmin {
    client: Arc<Client>,
    header: MetadataValue<tonic::metadata::Ascii>,
    /// The task's namespace: what a request naming none is about.
    namespace: String,
}

fn not_here(rpc: &str) -> Status {
    Status::permission_denied(format!(
        "{rpc} is not available through an attempt's local endpoint: it serves Publish, PublishBatch, Receive, Ack, Request, ListTopics and ResolveAgent"
    ))
}

/// A client-side failure as the status the task sees: the server's own answer when it gave one.
fn status(error: colony_client::ClientError) -> Status {
    match error {
        colony_client::ClientError::Answered { status, .. } => *status,
        other => Status::unavailable(other.to_string()),
    }
}

impl AttemptAdmin {
    /// Makes `rpc` for the attempt, with the request's namespace defaulted to the task's.
    async fn forward<Req, Resp, F, Fut>(
        &self,
        what: &str,
        request: Request<Req>,
        rpc: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone + Namespaced,
        F: Fn(pb::admin_client::AdminClient<colony_client::Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        let mut request = request.into_inner();
        request.default_namespace(&self.namespace);
        let answer = self
            .client
            .call(what, |client| {
                let mut call = Request::new(request.clone());
                call.metadata_mut().insert(ATTEMPT_HEADER, self.header.clone());
                rpc(client, call)
            })
            .await
            .map_err(status)?;
        Ok(Response::new(answer))
    }
}

/// A request about one namespace, which the task may leave empty.
trait Namespaced {
    fn default_namespace(&mut self, namespace: &str);
}

macro_rules! namespaced {
    ($($request:ty),* $(,)?) => {$(
        impl Namespaced for $request {
            fn default_namespace(&mut self, namespace: &str) {
                if self.namespace.is_empty() {
                    self.namespace = namespace.to_owned();
                }
            }
        }
    )*};
}

impl Namespaced for pb::PublishBatchRequest {
    fn default_namespace(&mut self, namespace: &str) {
        for message in &mut self.messages {
            message.default_namespace(namespace);
        }
    }
}

namespaced!(
    pb::PublishRequest,
    pb::ReceiveRequest,
    pb::AckRequest,
    pb::RequestRequest,
    pb::ListTopicsRequest,
    pb::ResolveAgentRequest,
);

#[tonic::async_trait]
impl Admin for AttemptAdmin {
    type WatchFinishedTasksStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::FinishedTask, Status>> + Send>>;
    type SaveSnapshotStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::SnapshotChunk, Status>> + Send>>;

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        self.forward("publish", request, |mut c, r| async move { c.publish(r).await }).await
    }

    async fn publish_batch(
        &self,
        request: Request<pb::PublishBatchRequest>,
    ) -> Result<Response<pb::PublishBatchResponse>, Status> {
        self.forward("publish batch", request, |mut c, r| async move { c.publish_batch(r).await })
            .await
    }

    async fn receive(
        &self,
        request: Request<pb::ReceiveRequest>,
    ) -> Result<Response<pb::ReceiveResponse>, Status> {
        self.forward("receive", request, |mut c, r| async move { c.receive(r).await }).await
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.forward("ack", request, |mut c, r| async move { c.ack(r).await }).await
    }

    async fn request(
        &self,
        request: Request<pb::RequestRequest>,
    ) -> Result<Response<pb::RequestResponse>, Status> {
        self.forward("request", request, |mut c, r| async move { c.request(r).await }).await
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        self.forward("list topics", request, |mut c, r| async move { c.list_topics(r).await }).await
    }

    async fn resolve_agent(
        &self,
        request: Request<pb::ResolveAgentRequest>,
    ) -> Result<Response<pb::ResolveAgentResponse>, Status> {
        self.forward("resolve agent", request, |mut c, r| async move { c.resolve_agent(r).await })
            .await
    }

    async fn submit_task(
        &self,
        _: Request<pb::SubmitTaskRequest>,
    ) -> Result<Response<pb::SubmitTaskResponse>, Status> {
        Err(not_here("SubmitTask"))
    }

    async fn get_task(
        &self,
        _: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        Err(not_here("GetTask"))
    }

    async fn list_tasks(
        &self,
        _: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        Err(not_here("ListTasks"))
    }

    async fn cancel_task(
        &self,
        _: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        Err(not_here("CancelTask"))
    }

    async fn cluster_status(
        &self,
        _: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        Err(not_here("ClusterStatus"))
    }

    async fn state_digest(
        &self,
        _: Request<pb::StateDigestRequest>,
    ) -> Result<Response<pb::StateDigestResponse>, Status> {
        Err(not_here("StateDigest"))
    }

    async fn cluster_info(
        &self,
        _: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        Err(not_here("ClusterInfo"))
    }

    async fn join_cluster(
        &self,
        _: Request<pb::JoinClusterRequest>,
    ) -> Result<Response<pb::JoinClusterResponse>, Status> {
        Err(not_here("JoinCluster"))
    }

    async fn remove_node(
        &self,
        _: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        Err(not_here("RemoveNode"))
    }

    async fn create_join_token(
        &self,
        _: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        Err(not_here("CreateJoinToken"))
    }

    async fn list_executors(
        &self,
        _: Request<pb::ListExecutorsRequest>,
    ) -> Result<Response<pb::ListExecutorsResponse>, Status> {
        Err(not_here("ListExecutors"))
    }

    async fn drain_executor(
        &self,
        _: Request<pb::DrainExecutorRequest>,
    ) -> Result<Response<pb::DrainExecutorResponse>, Status> {
        Err(not_here("DrainExecutor"))
    }

    async fn undrain_executor(
        &self,
        _: Request<pb::UndrainExecutorRequest>,
    ) -> Result<Response<pb::UndrainExecutorResponse>, Status> {
        Err(not_here("UndrainExecutor"))
    }

    async fn bootstrap_acl(
        &self,
        _: Request<pb::BootstrapAclRequest>,
    ) -> Result<Response<pb::BootstrapAclResponse>, Status> {
        Err(not_here("BootstrapAcl"))
    }

    async fn create_acl_token(
        &self,
        _: Request<pb::CreateAclTokenRequest>,
    ) -> Result<Response<pb::CreateAclTokenResponse>, Status> {
        Err(not_here("CreateAclToken"))
    }

    async fn list_acl_tokens(
        &self,
        _: Request<pb::ListAclTokensRequest>,
    ) -> Result<Response<pb::ListAclTokensResponse>, Status> {
        Err(not_here("ListAclTokens"))
    }

    async fn revoke_acl_token(
        &self,
        _: Request<pb::RevokeAclTokenRequest>,
    ) -> Result<Response<pb::RevokeAclTokenResponse>, Status> {
        Err(not_here("RevokeAclToken"))
    }

    async fn enroll(
        &self,
        _: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        Err(not_here("Enroll"))
    }

    async fn cluster_ca(
        &self,
        _: Request<pb::ClusterCaRequest>,
    ) -> Result<Response<pb::ClusterCaResponse>, Status> {
        Err(not_here("ClusterCa"))
    }

    async fn save_snapshot(
        &self,
        _: Request<pb::SaveSnapshotRequest>,
    ) -> Result<Response<Self::SaveSnapshotStream>, Status> {
        Err(not_here("SaveSnapshot"))
    }

    async fn watch_finished_tasks(
        &self,
        _: Request<pb::WatchFinishedTasksRequest>,
    ) -> Result<Response<Self::WatchFinishedTasksStream>, Status> {
        Err(not_here("WatchFinishedTasks"))
    }

    async fn publish_model(
        &self,
        _: Request<pb::PublishModelRequest>,
    ) -> Result<Response<pb::PublishModelResponse>, Status> {
        Err(not_here("PublishModel"))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Err(not_here("ListModels"))
    }

    async fn get_model(
        &self,
        _: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::GetModelResponse>, Status> {
        Err(not_here("GetModel"))
    }

    async fn rollback_model(
        &self,
        _: Request<pb::RollbackModelRequest>,
    ) -> Result<Response<pb::RollbackModelResponse>, Status> {
        Err(not_here("RollbackModel"))
    }

    async fn submit_workflow(
        &self,
        _: Request<pb::SubmitWorkflowRequest>,
    ) -> Result<Response<pb::SubmitWorkflowResponse>, Status> {
        Err(not_here("SubmitWorkflow"))
    }

    async fn get_workflow(
        &self,
        _: Request<pb::GetWorkflowRequest>,
    ) -> Result<Response<pb::GetWorkflowResponse>, Status> {
        Err(not_here("GetWorkflow"))
    }

    async fn list_workflows(
        &self,
        _: Request<pb::ListWorkflowsRequest>,
    ) -> Result<Response<pb::ListWorkflowsResponse>, Status> {
        Err(not_here("ListWorkflows"))
    }

    async fn cancel_workflow(
        &self,
        _: Request<pb::CancelWorkflowRequest>,
    ) -> Result<Response<pb::CancelWorkflowResponse>, Status> {
        Err(not_here("CancelWorkflow"))
    }

    async fn retry_workflow(
        &self,
        _: Request<pb::RetryWorkflowRequest>,
    ) -> Result<Response<pb::RetryWorkflowResponse>, Status> {
        Err(not_here("RetryWorkflow"))
    }

    async fn get_task_output(
        &self,
        _: Request<pb::GetTaskOutputRequest>,
    ) -> Result<Response<pb::GetTaskOutputResponse>, Status> {
        Err(not_here("GetTaskOutput"))
    }

    async fn create_topic(
        &self,
        _: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        Err(not_here("CreateTopic"))
    }

    async fn delete_topic(
        &self,
        _: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        Err(not_here("DeleteTopic"))
    }

    async fn run_agent(
        &self,
        _: Request<pb::RunAgentRequest>,
    ) -> Result<Response<pb::RunAgentResponse>, Status> {
        Err(not_here("RunAgent"))
    }

    async fn get_agent(
        &self,
        _: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        Err(not_here("GetAgent"))
    }

    async fn list_agents(
        &self,
        _: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        Err(not_here("ListAgents"))
    }

    async fn scale_agent(
        &self,
        _: Request<pb::ScaleAgentRequest>,
    ) -> Result<Response<pb::ScaleAgentResponse>, Status> {
        Err(not_here("ScaleAgent"))
    }

    async fn stop_agent(
        &self,
        _: Request<pb::StopAgentRequest>,
    ) -> Result<Response<pb::StopAgentResponse>, Status> {
        Err(not_here("StopAgent"))
    }
}
