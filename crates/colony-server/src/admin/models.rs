//! The model registry: publish (checked before it is proposed), list, show, roll back.

use super::auth::Caller;
use super::AdminService;
use colony_core::{Command, Outcome};
use colony_proto::convert::{model_metrics_from_proto, model_to_proto};
use colony_proto::pb;
use tonic::Status;

impl AdminService {
    pub(super) async fn publish_model_here(
        &self,
        _caller: Caller,
        request: pb::PublishModelRequest,
    ) -> Result<pb::PublishModelResponse, Status> {
        let model = request.model.ok_or_else(|| Status::invalid_argument("missing model"))?;
        let metrics = model
            .metrics
            .as_ref()
            .map(model_metrics_from_proto)
            .ok_or_else(|| Status::invalid_argument("missing model metrics"))?;
        // The scheduler must be able to use what is published: decode and check it here, so a
        // bad model is refused at the door and never reaches the registry.
        colony_model::Predictor::from_model(&model.feature_schema, &model.weights)
            .map_err(|e| Status::invalid_argument(format!("invalid model: {e}")))?;
        let command = Command::PublishModel {
            device: model.device,
            feature_schema: model.feature_schema,
            weights: model.weights,
            metrics,
        };
        match self.propose(command).await? {
            Outcome::ModelPublished { version } => {
                tracing::info!(%version, "model published");
                Ok(pb::PublishModelResponse { version: version.0 })
            }
            other => Err(Status::internal(format!("publish produced {other:?}"))),
        }
    }

    pub(super) async fn list_models_here(
        &self,
        _caller: Caller,
        _request: pb::ListModelsRequest,
    ) -> Result<pb::ListModelsResponse, Status> {
        let state = self.node.state();
        let current = state.machine.current_model().map(|m| m.version);
        let models = state
            .machine
            .models()
            .map(|m| model_to_proto(m, Some(m.version) == current, false))
            .collect();
        Ok(pb::ListModelsResponse { models, current: current.map(|v| v.0) })
    }

    pub(super) async fn get_model_here(
        &self,
        _caller: Caller,
        request: pb::GetModelRequest,
    ) -> Result<pb::GetModelResponse, Status> {
        let version = colony_core::ModelVersion(request.version);
        let state = self.node.state();
        let model = state
            .machine
            .model(version)
            .ok_or_else(|| Status::not_found(format!("model version {version} does not exist")))?;
        let current = state.machine.current_model().is_some_and(|m| m.version == version);
        Ok(pb::GetModelResponse { model: Some(model_to_proto(model, current, true)) })
    }

    pub(super) async fn rollback_model_here(
        &self,
        _caller: Caller,
        request: pb::RollbackModelRequest,
    ) -> Result<pb::RollbackModelResponse, Status> {
        let version = colony_core::ModelVersion(request.version);
        self.propose(Command::RollbackModel { version }).await?;
        tracing::info!(%version, "model rolled back");
        let state = self.node.state();
        let model = state
            .machine
            .model(version)
            .ok_or_else(|| Status::not_found(format!("model version {version} does not exist")))?;
        Ok(pb::RollbackModelResponse { model: Some(model_to_proto(model, true, false)) })
    }
}
