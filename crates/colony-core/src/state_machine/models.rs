//! The model registry: publishing a model (making it current) and rolling back to a kept one.

use super::{check_text, StateMachine};
use super::{CommandError, Outcome};
use crate::ids::ModelVersion;
use crate::model::{ModelMetrics, ModelRecord};

impl StateMachine {
    pub(super) fn publish_model(
        &mut self,
        device: &str,
        feature_schema: &str,
        weights: &[u8],
        metrics: &ModelMetrics,
    ) -> Result<Outcome, CommandError> {
        check_text("device", device, self.limits.name_bytes_max)?;
        check_text("feature schema", feature_schema, self.limits.name_bytes_max)?;
        if weights.is_empty() || weights.len() > self.limits.model_weights_bytes_max {
            return Err(CommandError::TooLong {
                what: "model weights".to_owned(),
                len: weights.len(),
                max: self.limits.model_weights_bytes_max,
            });
        }
        metrics.validate().map_err(CommandError::InvalidModel)?;
        let version = ModelVersion(self.next_model_version);
        self.next_model_version += 1;
        let record = ModelRecord {
            version,
            created_unix_ms: self.now_unix_ms,
            device: device.to_owned(),
            feature_schema: feature_schema.to_owned(),
            weights: weights.to_vec(),
            metrics: metrics.clone(),
        };
        self.models.insert(version, record);
        self.current_model = Some(version);
        while self.models.len() > self.limits.models_kept_max {
            let oldest = self.models.keys().copied().find(|v| Some(*v) != self.current_model);
            match oldest {
                Some(oldest) => self.models.remove(&oldest),
                None => break,
            };
        }
        Ok(Outcome::ModelPublished { version })
    }

    pub(super) fn rollback_model(
        &mut self,
        version: ModelVersion,
    ) -> Result<Outcome, CommandError> {
        if !self.models.contains_key(&version) {
            return Err(CommandError::UnknownModel(version));
        }
        self.current_model = Some(version);
        Ok(Outcome::ModelRolledBack { version })
    }
}
