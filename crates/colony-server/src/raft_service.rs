//! The receiving side of Raft traffic: decodes openraft's messages and hands them to the local node.

use crate::wire;
use colony_proto::pb::raft_server::Raft as RaftRpc;
use colony_proto::pb::RaftMessage;
use colony_store::TypeConfig;
use openraft::Raft;
use tonic::{Request, Response, Status};

pub struct RaftService {
    pub raft: Raft<TypeConfig>,
    pub cluster_id: String,
}

impl RaftService {
    fn open(&self, message: &RaftMessage) -> Result<(), Status> {
        if message.cluster_id != self.cluster_id {
            return Err(Status::failed_precondition(format!(
                "raft message from cluster {:?} refused: this server belongs to cluster {}",
                message.cluster_id, self.cluster_id
            )));
        }
        Ok(())
    }

    fn reply<T: serde::Serialize>(&self, value: &T) -> Result<Response<RaftMessage>, Status> {
        let payload = wire::encode(value).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(RaftMessage { cluster_id: self.cluster_id.clone(), payload }))
    }
}

fn decode<T: serde::de::DeserializeOwned>(message: &RaftMessage) -> Result<T, Status> {
    wire::decode(&message.payload).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let message = request.into_inner();
        self.open(&message)?;
        let result = self.raft.append_entries(decode(&message)?).await;
        self.reply(&result)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let message = request.into_inner();
        self.open(&message)?;
        let result = self.raft.vote(decode(&message)?).await;
        self.reply(&result)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let message = request.into_inner();
        self.open(&message)?;
        let result = self.raft.install_snapshot(decode(&message)?).await;
        self.reply(&result)
    }
}
