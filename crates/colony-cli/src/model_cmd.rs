//! `colony model`: the model registry the learner publishes to and the scheduler reads.

use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::{anyhow, Result};
use clap::Subcommand;

use colony_proto::pb;
use serde::Serialize;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Every version kept: when trained, on what device, holdout error against the baseline.
    List,
    /// One version in full (its weights' size, not the weights).
    Show { version: u64 },
    /// Make an older version current again.
    Rollback { version: u64 },
}

/// A model version as scripts read it.
#[derive(Debug, Serialize)]
struct ModelJson {
    version: u64,
    current: bool,
    created_unix_ms: u64,
    device: String,
    feature_schema: String,
    weights_bytes: u64,
    holdout_mse: Option<f64>,
    baseline_mse: Option<f64>,
    previous_mse: Option<f64>,
    train_rows: Option<u64>,
    holdout_rows: Option<u64>,
}

impl From<pb::Model> for ModelJson {
    fn from(m: pb::Model) -> Self {
        let metrics = m.metrics;
        ModelJson {
            version: m.version,
            current: m.current,
            created_unix_ms: m.created_unix_ms,
            device: m.device,
            feature_schema: m.feature_schema,
            weights_bytes: m.weights_bytes,
            holdout_mse: metrics.as_ref().map(|x| x.holdout_mse),
            baseline_mse: metrics.as_ref().map(|x| x.baseline_mse),
            previous_mse: metrics.as_ref().and_then(|x| x.previous_mse),
            train_rows: metrics.as_ref().map(|x| x.train_rows),
            holdout_rows: metrics.as_ref().map(|x| x.holdout_rows),
        }
    }
}

fn mse(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), |x| format!("{x:.4}"))
}

fn print_models(models: &[ModelJson]) -> Result<()> {
    let now = colony_process::unix_ms();
    let mut table = output::table([
        "VERSION",
        "CURRENT",
        "AGE",
        "DEVICE",
        "HOLDOUT MSE",
        "BASELINE MSE",
        "ROWS",
        "WEIGHTS",
    ]);
    for m in models {
        table.add_row(vec![
            m.version.to_string(),
            if m.current { "*" } else { "" }.to_owned(),
            output::format_age(m.created_unix_ms, now),
            m.device.clone(),
            mse(m.holdout_mse),
            mse(m.baseline_mse),
            m.train_rows.map_or_else(|| "-".to_owned(), |r| r.to_string()),
            format!("{} B", m.weights_bytes),
        ]);
    }
    output::print_table(table)
}

pub async fn run(command: ModelCommand, global: &GlobalArgs) -> Result<()> {
    let client = global.client()?;
    match command {
        ModelCommand::List => {
            let response = client
                .call("list models", |mut c| async move {
                    c.list_models(pb::ListModelsRequest {}).await
                })
                .await?;
            let models: Vec<ModelJson> = response.models.into_iter().map(ModelJson::from).collect();
            match global.output {
                OutputFormat::Table if models.is_empty() => output::out(
                    "no models yet: the learner publishes one once it beats the baseline",
                )?,
                OutputFormat::Table => print_models(&models)?,
                OutputFormat::Json => output::print_json(&models)?,
            }
        }
        ModelCommand::Show { version } => {
            let response = client
                .call("get model", |mut c| async move {
                    c.get_model(pb::GetModelRequest { version }).await
                })
                .await?;
            let model = ModelJson::from(
                response.model.ok_or_else(|| anyhow!("the server's answer has no model"))?,
            );
            match global.output {
                OutputFormat::Table => output::print_fields(&[
                    ("version", model.version.to_string()),
                    ("current", model.current.to_string()),
                    ("device", model.device.clone()),
                    ("feature schema", model.feature_schema.clone()),
                    ("weights", format!("{} bytes", model.weights_bytes)),
                    ("holdout mse", mse(model.holdout_mse)),
                    ("baseline mse", mse(model.baseline_mse)),
                    ("previous mse", mse(model.previous_mse)),
                    (
                        "train/holdout rows",
                        format!(
                            "{}/{}",
                            model.train_rows.unwrap_or(0),
                            model.holdout_rows.unwrap_or(0)
                        ),
                    ),
                ])?,
                OutputFormat::Json => output::print_json(&model)?,
            }
        }
        ModelCommand::Rollback { version } => {
            let response = client
                .call("roll back model", |mut c| async move {
                    c.rollback_model(pb::RollbackModelRequest { version }).await
                })
                .await?;
            let model = ModelJson::from(
                response.model.ok_or_else(|| anyhow!("the server's answer has no model"))?,
            );
            match global.output {
                OutputFormat::Table => output::out(format!("model {} is current", model.version))?,
                OutputFormat::Json => output::print_json(&model)?,
            }
        }
    }
    Ok(())
}
