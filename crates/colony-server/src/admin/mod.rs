//! The operator API. Any server answers: writes and linearizable reads run on the leader (a
//! follower forwards them once), stale reads and cluster status run where they arrive. Every RPC
//! goes through `route::serve`, the one place for authentication (`auth`), authorization (each
//! RPC names the permission it needs), routing, deadlines and the audit line; the handlers
//! (`*_here`) only answer, checking a task's namespace where the request names one.

mod acl;
mod agents;
mod auth;
mod cluster;
mod messages;
mod models;
mod route;
mod targets;
mod tasks;
mod workflows;

use crate::node::Node;
use colony_core::{Command, Outcome, Permission};
use colony_proto::pb::admin_server::Admin;
use colony_proto::pb::{self, ReadConsistency};
use openraft::{BasicNode, RaftMetrics};
use route::{Rpc, Serve};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> AdminService {
        AdminService { node }
    }

    async fn propose(&self, command: Command) -> Result<Outcome, Status> {
        self.node.propose(command).await.map_err(route::propose_failed)
    }

    fn raft_metrics(&self) -> RaftMetrics<u64, BasicNode> {
        self.node.raft().metrics().borrow().clone()
    }

    /// Whether a read may be served from this server's applied state: when the client asked for
    /// a stale read, or always under `--unsafe-stale-reads`.
    fn stale(&self, consistency: &Option<ReadConsistency>) -> bool {
        self.node.config().unsafe_stale_reads || consistency.as_ref().is_some_and(|c| c.stale)
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    type WatchFinishedTasksStream = tasks::FinishedTaskStream;
    type SaveSnapshotStream = cluster::SnapshotStream;

    async fn run_agent(
        &self,
        request: Request<pb::RunAgentRequest>,
    ) -> Result<Response<pb::RunAgentResponse>, Status> {
        let rpc = Rpc::new("RunAgent", Serve::Leader, Permission::TaskSubmit);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.run_agent(r).await },
            |caller, r| self.run_agent_here(caller, r),
        )
        .await
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        let rpc = Rpc::new(
            "GetAgent",
            Serve::Read { stale: self.stale(&request.get_ref().consistency) },
            Permission::TaskRead,
        );
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.get_agent(r).await },
            |caller, r| self.get_agent_here(caller, r),
        )
        .await
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let rpc = Rpc::new(
            "ListAgents",
            Serve::Read { stale: self.stale(&request.get_ref().consistency) },
            Permission::TaskRead,
        );
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.list_agents(r).await },
            |caller, r| self.list_agents_here(caller, r),
        )
        .await
    }

    async fn scale_agent(
        &self,
        request: Request<pb::ScaleAgentRequest>,
    ) -> Result<Response<pb::ScaleAgentResponse>, Status> {
        let rpc = Rpc::new("ScaleAgent", Serve::Leader, Permission::TaskSubmit);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.scale_agent(r).await },
            |caller, r| self.scale_agent_here(caller, r),
        )
        .await
    }

    async fn stop_agent(
        &self,
        request: Request<pb::StopAgentRequest>,
    ) -> Result<Response<pb::StopAgentResponse>, Status> {
        let rpc = Rpc::new("StopAgent", Serve::Leader, Permission::TaskCancel);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.stop_agent(r).await },
            |caller, r| self.stop_agent_here(caller, r),
        )
        .await
    }

    async fn resolve_agent(
        &self,
        request: Request<pb::ResolveAgentRequest>,
    ) -> Result<Response<pb::ResolveAgentResponse>, Status> {
        let rpc = Rpc::new(
            "ResolveAgent",
            Serve::Read { stale: self.stale(&request.get_ref().consistency) },
            Permission::TaskRead,
        );
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.resolve_agent(r).await },
            |caller, r| self.resolve_agent_here(caller, r),
        )
        .await
    }

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let rpc = Rpc::new("Publish", Serve::Leader, Permission::TaskSubmit);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.publish(r).await },
            |caller, r| self.publish_here(caller, r),
        )
        .await
    }

    async fn publish_batch(
        &self,
        request: Request<pb::PublishBatchRequest>,
    ) -> Result<Response<pb::PublishBatchResponse>, Status> {
        let rpc = Rpc::new("PublishBatch", Serve::Leader, Permission::TaskSubmit);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.publish_batch(r).await },
            |caller, r| self.publish_batch_here(caller, r),
        )
        .await
    }

    async fn receive(
        &self,
        request: Request<pb::ReceiveRequest>,
    ) -> Result<Response<pb::ReceiveResponse>, Status> {
        // Waits up to its own bound for a message or an answer, then needs time to write.
        let rpc = Rpc {
            deadline_max: Duration::from_millis(messages::RECEIVE_WAIT_MS_MAX)
                + Duration::from_secs(15),
            ..Rpc::new("Receive", Serve::Leader, Permission::TaskSubmit)
        };
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.receive(r).await },
            |caller, r| self.receive_here(caller, r),
        )
        .await
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let rpc = Rpc::new("Ack", Serve::Leader, Permission::TaskSubmit);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.ack(r).await },
            |caller, r| self.ack_here(caller, r),
        )
        .await
    }

    async fn request(
        &self,
        request: Request<pb::RequestRequest>,
    ) -> Result<Response<pb::RequestResponse>, Status> {
        // Waits up to its own bound for a message or an answer, then needs time to write.
        let rpc = Rpc {
            deadline_max: Duration::from_millis(messages::REQUEST_TIMEOUT_MS_MAX)
                + Duration::from_secs(15),
            ..Rpc::new("Request", Serve::Leader, Permission::TaskSubmit)
        };
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.request(r).await },
            |caller, r| self.request_here(caller, r),
        )
        .await
    }

    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let rpc = Rpc::new("CreateTopic", Serve::Leader, Permission::TaskSubmit);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.create_topic(r).await },
            |caller, r| self.create_topic_here(caller, r),
        )
        .await
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let rpc = Rpc::new("DeleteTopic", Serve::Leader, Permission::TaskCancel);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.delete_topic(r).await },
            |caller, r| self.delete_topic_here(caller, r),
        )
        .await
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let rpc = Rpc::new(
            "ListTopics",
            Serve::Read { stale: self.stale(&request.get_ref().consistency) },
            Permission::TaskRead,
        );
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.list_topics(r).await },
            |caller, r| self.list_topics_here(caller, r),
        )
        .await
    }

    async fn save_snapshot(
        &self,
        request: Request<pb::SaveSnapshotRequest>,
    ) -> Result<Response<Self::SaveSnapshotStream>, Status> {
        let rpc = Rpc::new("SaveSnapshot", Serve::Here, Permission::Backup);
        self.serve_here(rpc, request, |_, _| self.save_snapshot_here()).await
    }

    async fn watch_finished_tasks(
        &self,
        request: Request<pb::WatchFinishedTasksRequest>,
    ) -> Result<Response<Self::WatchFinishedTasksStream>, Status> {
        let rpc = Rpc::new("WatchFinishedTasks", Serve::Here, Permission::FeedRead);
        self.serve_here(rpc, request, |caller, r| self.watch_finished_tasks_here(caller, r)).await
    }

    async fn publish_model(
        &self,
        request: Request<pb::PublishModelRequest>,
    ) -> Result<Response<pb::PublishModelResponse>, Status> {
        let rpc = Rpc::new("PublishModel", Serve::Leader, Permission::ModelPublish);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.publish_model(r).await },
            |caller, r| self.publish_model_here(caller, r),
        )
        .await
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let rpc = Rpc::new("ListModels", Serve::Read { stale: false }, Permission::ClusterRead);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.list_models(r).await },
            |caller, r| self.list_models_here(caller, r),
        )
        .await
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::GetModelResponse>, Status> {
        let rpc = Rpc::new("GetModel", Serve::Read { stale: false }, Permission::ClusterRead);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.get_model(r).await },
            |caller, r| self.get_model_here(caller, r),
        )
        .await
    }

    async fn rollback_model(
        &self,
        request: Request<pb::RollbackModelRequest>,
    ) -> Result<Response<pb::RollbackModelResponse>, Status> {
        let rpc = Rpc::new("RollbackModel", Serve::Leader, Permission::ModelRollback);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.rollback_model(r).await },
            |caller, r| self.rollback_model_here(caller, r),
        )
        .await
    }

    async fn submit_task(
        &self,
        request: Request<pb::SubmitTaskRequest>,
    ) -> Result<Response<pb::SubmitTaskResponse>, Status> {
        let rpc = Rpc::new("SubmitTask", Serve::Leader, Permission::TaskSubmit);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.submit_task(r).await },
            |caller, r| self.submit_task_here(caller, r),
        )
        .await
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        let rpc = Rpc::new(
            "GetTask",
            Serve::Read { stale: self.stale(&request.get_ref().consistency) },
            Permission::TaskRead,
        );
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.get_task(r).await },
            |caller, r| self.get_task_here(caller, r),
        )
        .await
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let rpc = Rpc::new(
            "ListTasks",
            Serve::Read { stale: self.stale(&request.get_ref().consistency) },
            Permission::TaskRead,
        );
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.list_tasks(r).await },
            |caller, r| self.list_tasks_here(caller, r),
        )
        .await
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        let rpc = Rpc::new("CancelTask", Serve::Leader, Permission::TaskCancel);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.cancel_task(r).await },
            |caller, r| self.cancel_task_here(caller, r),
        )
        .await
    }

    async fn submit_workflow(
        &self,
        request: Request<pb::SubmitWorkflowRequest>,
    ) -> Result<Response<pb::SubmitWorkflowResponse>, Status> {
        let rpc = Rpc::new("SubmitWorkflow", Serve::Leader, Permission::TaskSubmit);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.submit_workflow(r).await },
            |caller, r| self.submit_workflow_here(caller, r),
        )
        .await
    }

    async fn get_workflow(
        &self,
        request: Request<pb::GetWorkflowRequest>,
    ) -> Result<Response<pb::GetWorkflowResponse>, Status> {
        let rpc = Rpc::new(
            "GetWorkflow",
            Serve::Read { stale: self.stale(&request.get_ref().consistency) },
            Permission::TaskRead,
        );
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.get_workflow(r).await },
            |caller, r| self.get_workflow_here(caller, r),
        )
        .await
    }

    async fn list_workflows(
        &self,
        request: Request<pb::ListWorkflowsRequest>,
    ) -> Result<Response<pb::ListWorkflowsResponse>, Status> {
        let rpc = Rpc::new(
            "ListWorkflows",
            Serve::Read { stale: self.stale(&request.get_ref().consistency) },
            Permission::TaskRead,
        );
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.list_workflows(r).await },
            |caller, r| self.list_workflows_here(caller, r),
        )
        .await
    }

    async fn cancel_workflow(
        &self,
        request: Request<pb::CancelWorkflowRequest>,
    ) -> Result<Response<pb::CancelWorkflowResponse>, Status> {
        let rpc = Rpc::new("CancelWorkflow", Serve::Leader, Permission::TaskCancel);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.cancel_workflow(r).await },
            |caller, r| self.cancel_workflow_here(caller, r),
        )
        .await
    }

    async fn retry_workflow(
        &self,
        request: Request<pb::RetryWorkflowRequest>,
    ) -> Result<Response<pb::RetryWorkflowResponse>, Status> {
        let rpc = Rpc::new("RetryWorkflow", Serve::Leader, Permission::TaskSubmit);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.retry_workflow(r).await },
            |caller, r| self.retry_workflow_here(caller, r),
        )
        .await
    }

    async fn get_task_output(
        &self,
        request: Request<pb::GetTaskOutputRequest>,
    ) -> Result<Response<pb::GetTaskOutputResponse>, Status> {
        let rpc = Rpc::new(
            "GetTaskOutput",
            Serve::Read { stale: self.stale(&request.get_ref().consistency) },
            Permission::TaskRead,
        );
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.get_task_output(r).await },
            |caller, r| self.get_task_output_here(caller, r),
        )
        .await
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let rpc = Rpc::new("ClusterStatus", Serve::Here, Permission::Status);
        self.serve_here(rpc, request, |caller, r| self.cluster_status_here(caller, r)).await
    }

    async fn state_digest(
        &self,
        request: Request<pb::StateDigestRequest>,
    ) -> Result<Response<pb::StateDigestResponse>, Status> {
        let rpc = Rpc::new("StateDigest", Serve::Here, Permission::ClusterRead);
        self.serve_here(rpc, request, |caller, r| self.state_digest_here(caller, r)).await
    }

    async fn cluster_info(
        &self,
        request: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        let rpc = Rpc::new("ClusterInfo", Serve::Here, Permission::Status);
        self.serve_here(rpc, request, |caller, r| self.cluster_info_here(caller, r)).await
    }

    async fn join_cluster(
        &self,
        request: Request<pb::JoinClusterRequest>,
    ) -> Result<Response<pb::JoinClusterResponse>, Status> {
        let rpc = Rpc {
            deadline_max: route::JOIN_DEADLINE_MAX,
            ..Rpc::new("JoinCluster", Serve::Leader, Permission::JoinCluster)
        };
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.join_cluster(r).await },
            |caller, r| self.join_cluster_here(caller, r),
        )
        .await
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let rpc = Rpc::new("RemoveNode", Serve::Leader, Permission::ClusterWrite);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.remove_node(r).await },
            |caller, r| self.remove_node_here(caller, r),
        )
        .await
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let rpc = Rpc::new("CreateJoinToken", Serve::Leader, Permission::ClusterWrite);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.create_join_token(r).await },
            |caller, r| self.create_join_token_here(caller, r),
        )
        .await
    }

    async fn list_executors(
        &self,
        request: Request<pb::ListExecutorsRequest>,
    ) -> Result<Response<pb::ListExecutorsResponse>, Status> {
        let rpc = Rpc::new(
            "ListExecutors",
            Serve::Read { stale: self.stale(&request.get_ref().consistency) },
            Permission::ClusterRead,
        );
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.list_executors(r).await },
            |caller, r| self.list_executors_here(caller, r),
        )
        .await
    }

    async fn drain_executor(
        &self,
        request: Request<pb::DrainExecutorRequest>,
    ) -> Result<Response<pb::DrainExecutorResponse>, Status> {
        let rpc = Rpc::new("DrainExecutor", Serve::Leader, Permission::ClusterWrite);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.drain_executor(r).await },
            |caller, r| self.drain_executor_here(caller, r),
        )
        .await
    }

    async fn undrain_executor(
        &self,
        request: Request<pb::UndrainExecutorRequest>,
    ) -> Result<Response<pb::UndrainExecutorResponse>, Status> {
        let rpc = Rpc::new("UndrainExecutor", Serve::Leader, Permission::ClusterWrite);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.undrain_executor(r).await },
            |caller, r| self.undrain_executor_here(caller, r),
        )
        .await
    }

    async fn bootstrap_acl(
        &self,
        request: Request<pb::BootstrapAclRequest>,
    ) -> Result<Response<pb::BootstrapAclResponse>, Status> {
        let rpc = Rpc::anonymous("BootstrapAcl", Serve::Leader);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.bootstrap_acl(r).await },
            |caller, r| self.bootstrap_acl_here(caller, r),
        )
        .await
    }

    async fn create_acl_token(
        &self,
        request: Request<pb::CreateAclTokenRequest>,
    ) -> Result<Response<pb::CreateAclTokenResponse>, Status> {
        let rpc = Rpc::new("CreateAclToken", Serve::Leader, Permission::AclManage);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.create_acl_token(r).await },
            |caller, r| self.create_acl_token_here(caller, r),
        )
        .await
    }

    async fn list_acl_tokens(
        &self,
        request: Request<pb::ListAclTokensRequest>,
    ) -> Result<Response<pb::ListAclTokensResponse>, Status> {
        let rpc = Rpc::new("ListAclTokens", Serve::Read { stale: false }, Permission::AclManage);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.list_acl_tokens(r).await },
            |caller, r| self.list_acl_tokens_here(caller, r),
        )
        .await
    }

    async fn revoke_acl_token(
        &self,
        request: Request<pb::RevokeAclTokenRequest>,
    ) -> Result<Response<pb::RevokeAclTokenResponse>, Status> {
        let rpc = Rpc::new("RevokeAclToken", Serve::Leader, Permission::AclManage);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.revoke_acl_token(r).await },
            |caller, r| self.revoke_acl_token_here(caller, r),
        )
        .await
    }

    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let rpc = Rpc::anonymous("Enroll", Serve::Leader);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.enroll(r).await },
            |caller, r| self.enroll_here(caller, r),
        )
        .await
    }

    async fn cluster_ca(
        &self,
        request: Request<pb::ClusterCaRequest>,
    ) -> Result<Response<pb::ClusterCaResponse>, Status> {
        let rpc = Rpc::new("ClusterCa", Serve::Here, Permission::Status);
        self.serve_here(rpc, request, |caller, r| self.cluster_ca_here(caller, r)).await
    }
}
