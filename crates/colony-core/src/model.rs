//! The model registry's records: versions of the learner's runtime/memory model, as the cluster
//! keeps them. The weights are opaque bytes here; the server decodes and checks them (finite,
//! the right shape, the schema the scheduler speaks) before it proposes a model.

use crate::ids::ModelVersion;
use serde::{Deserialize, Serialize};

/// How a model did on the learner's holdout set, in its target space (log1p of ms and bytes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMetrics {
    pub holdout_mse: f64,
    /// The naive per-kind mean on the same holdout set.
    pub baseline_mse: f64,
    /// The model it replaced, on the same holdout set.
    pub previous_mse: Option<f64>,
    pub train_rows: u64,
    pub holdout_rows: u64,
}

// `validate` refuses NaN before a record is stored, so equality is reflexive for every stored value.
impl Eq for ModelMetrics {}

impl ModelMetrics {
    pub fn validate(&self) -> Result<(), String> {
        let finite = |what: &str, x: f64| {
            if x.is_finite() && x >= 0.0 {
                Ok(())
            } else {
                Err(format!("{what} {x} is not a finite, non-negative number"))
            }
        };
        finite("holdout mse", self.holdout_mse)?;
        finite("baseline mse", self.baseline_mse)?;
        if let Some(previous) = self.previous_mse {
            finite("previous mse", previous)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub version: ModelVersion,
    pub created_unix_ms: u64,
    /// What it was trained on: `cpu` or the GPU's name.
    pub device: String,
    pub feature_schema: String,
    pub weights: Vec<u8>,
    pub metrics: ModelMetrics,
}
