//! The operator API. Any server answers: writes and linearizable reads run on the leader (a
//! follower forwards them once), stale reads and cluster status run where they arrive. Every RPC
//! goes through `route::serve`, the one place for routing, deadlines and (with the security
//! issue) authentication and authorization; the handlers (`*_here`) only answer.

mod cluster;
mod models;
mod route;
mod tasks;

use crate::node::Node;
use colony_core::{Command, Outcome};
use colony_proto::pb::admin_server::Admin;
use colony_proto::pb::{self, ReadConsistency};
use openraft::{BasicNode, RaftMetrics};
use route::{Rpc, Serve};
use std::sync::Arc;
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

    async fn watch_finished_tasks(
        &self,
        request: Request<pb::WatchFinishedTasksRequest>,
    ) -> Result<Response<Self::WatchFinishedTasksStream>, Status> {
        let rpc = Rpc::new("WatchFinishedTasks", Serve::Here);
        self.serve_here(rpc, request, |caller, r| self.watch_finished_tasks_here(caller, r)).await
    }

    async fn publish_model(
        &self,
        request: Request<pb::PublishModelRequest>,
    ) -> Result<Response<pb::PublishModelResponse>, Status> {
        let rpc = Rpc::new("PublishModel", Serve::Leader);
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
        let rpc = Rpc::new("ListModels", Serve::Read { stale: false });
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
        let rpc = Rpc::new("GetModel", Serve::Read { stale: false });
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
        let rpc = Rpc::new("RollbackModel", Serve::Leader);
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
        let rpc = Rpc::new("SubmitTask", Serve::Leader);
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
        let rpc =
            Rpc::new("GetTask", Serve::Read { stale: self.stale(&request.get_ref().consistency) });
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
        let rpc = Rpc::new("CancelTask", Serve::Leader);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.cancel_task(r).await },
            |caller, r| self.cancel_task_here(caller, r),
        )
        .await
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let rpc = Rpc::new("ClusterStatus", Serve::Here);
        self.serve_here(rpc, request, |caller, r| self.cluster_status_here(caller, r)).await
    }

    async fn state_digest(
        &self,
        request: Request<pb::StateDigestRequest>,
    ) -> Result<Response<pb::StateDigestResponse>, Status> {
        let rpc = Rpc::new("StateDigest", Serve::Here);
        self.serve_here(rpc, request, |caller, r| self.state_digest_here(caller, r)).await
    }

    async fn cluster_info(
        &self,
        request: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        let rpc = Rpc::new("ClusterInfo", Serve::Here);
        self.serve_here(rpc, request, |caller, r| self.cluster_info_here(caller, r)).await
    }

    async fn join_cluster(
        &self,
        request: Request<pb::JoinClusterRequest>,
    ) -> Result<Response<pb::JoinClusterResponse>, Status> {
        let rpc = Rpc {
            deadline_max: route::JOIN_DEADLINE_MAX,
            ..Rpc::new("JoinCluster", Serve::Leader)
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
        let rpc = Rpc::new("RemoveNode", Serve::Leader);
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
        let rpc = Rpc::new("CreateJoinToken", Serve::Leader);
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
        let rpc = Rpc::new("DrainExecutor", Serve::Leader);
        self.serve(
            rpc,
            request,
            |mut c, r| async move { c.drain_executor(r).await },
            |caller, r| self.drain_executor_here(caller, r),
        )
        .await
    }
}
