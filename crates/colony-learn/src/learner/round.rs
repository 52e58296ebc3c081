//! One training round: fetch the current model, train and evaluate against it on the training
//! thread, and publish the new model when it wins.

use std::sync::Arc;

use anyhow::Context as _;
use colony_client::Client;
use colony_proto::pb;
use tracing::{info, warn};

use super::training::TrainingThread;
use crate::decide::Verdict;
use crate::example::Example;
use crate::metrics::Metrics;
use colony_model::features::SCHEMA;
use colony_model::{encode_weights, ModelError, Predictor};

/// What a round needs besides its examples.
#[derive(Clone)]
pub(super) struct RoundContext {
    pub(super) client: Client,
    pub(super) training: TrainingThread,
    pub(super) metrics: Arc<Metrics>,
}

/// How a round that ran to the end finished.
#[derive(Debug)]
pub(super) enum RoundReport {
    Published { version: u64 },
    Kept { verdict: Verdict },
}

/// The current model, when there is one this learner can evaluate.
async fn current_model(client: &Client) -> anyhow::Result<Option<(u64, Predictor)>> {
    let list = client
        .call("ListModels", |mut client| async move {
            client.list_models(pb::ListModelsRequest {}).await
        })
        .await
        .context("listing the models")?;
    let Some(version) = list.current else {
        return Ok(None);
    };
    let reply = client
        .call("GetModel", |mut client| async move {
            client.get_model(pb::GetModelRequest { version }).await
        })
        .await
        .with_context(|| format!("fetching model {version}"))?;
    let Some(model) = reply.model else {
        warn!(
            version,
            "GetModel returned no model; the new model is compared with the baseline only"
        );
        return Ok(None);
    };
    match Predictor::from_model(&model.feature_schema, &model.weights) {
        Ok(predictor) => Ok(Some((version, predictor))),
        Err(ModelError::Schema { schema }) => {
            info!(version, %schema, "the current model uses another feature schema; it is not compared");
            Ok(None)
        }
        Err(error) => {
            warn!(version, error = %error, "the current model cannot be loaded; it is not compared");
            Ok(None)
        }
    }
}

/// Fetches the current model, trains against it, and publishes the new model if it wins.
pub(super) async fn round(
    context: RoundContext,
    examples: Vec<Example>,
) -> anyhow::Result<RoundReport> {
    let current = current_model(&context.client).await?;
    let current_version = current.as_ref().map(|(version, _)| *version);
    let (decision, elapsed) =
        context.training.train(examples, current.map(|(_, predictor)| predictor)).await?;
    let evaluation = &decision.evaluation;
    context.metrics.trained(elapsed, evaluation);
    info!(
        verdict = decision.verdict.as_str(),
        holdout_mse = evaluation.holdout_mse,
        baseline_mse = evaluation.baseline_mse,
        previous_mse = ?evaluation.previous_mse,
        current_version = ?current_version,
        train_rows = evaluation.train_rows,
        holdout_rows = evaluation.holdout_rows,
        seconds = elapsed.as_secs_f64(),
        device = %context.training.device,
        "trained a model"
    );
    if decision.verdict != Verdict::Publish {
        return Ok(RoundReport::Kept { verdict: decision.verdict });
    }
    let weights = encode_weights(decision.model.mlp());
    let request = pb::PublishModelRequest {
        model: Some(pb::Model {
            version: 0,
            created_unix_ms: colony_process::unix_ms(),
            device: context.training.device.clone(),
            feature_schema: SCHEMA.to_owned(),
            weights_bytes: weights.len() as u64,
            weights,
            metrics: Some(pb::ModelMetrics {
                holdout_mse: evaluation.holdout_mse,
                baseline_mse: evaluation.baseline_mse,
                previous_mse: evaluation.previous_mse,
                train_rows: evaluation.train_rows as u64,
                holdout_rows: evaluation.holdout_rows as u64,
            }),
            current: false,
        }),
    };
    let published = context
        .client
        .call("PublishModel", |mut client| {
            let request = request.clone();
            async move { client.publish_model(request).await }
        })
        .await
        .context("publishing the model")?;
    Ok(RoundReport::Published { version: published.version })
}
