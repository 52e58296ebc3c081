//! What the scheduler asks: given a task and an executor, how long will it run and how much memory
//! will it use? A [`Predictor`] is a published model, checked once when it is loaded, that answers
//! on the CPU without failing.

use colony_core::{ExecutorSpec, TaskSpec};
use thiserror::Error;

use crate::features::{self, FEATURES, PEAK_MEMORY_BYTES_MAX, RUNTIME_MS_MAX, SCHEMA, TARGETS};
use crate::mlp::{Mlp, MlpError};

/// The largest encoded model accepted. The default shape (43·32 + 32·32 + 32·2 weights) encodes
/// to about 40 KB of JSON, so this leaves room for much wider models while bounding what a
/// registry entry or a decode may cost.
pub const WEIGHTS_BYTES_MAX: usize = 4 << 20;

/// Why a model cannot be used.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("feature schema {schema:?} does not match {SCHEMA}")]
    Schema { schema: String },
    #[error("weights are {bytes} bytes; the limit is {max}")]
    TooLarge { bytes: usize, max: usize },
    #[error("weights are not colony-learn's JSON encoding of an MLP")]
    Decode(#[source] serde_json::Error),
    #[error("weights contain {value} (layer {layer}, {what}[{index}])")]
    NonFinite { layer: usize, what: &'static str, index: usize, value: f32 },
    #[error("the weights do not describe a valid model")]
    Invalid(#[source] MlpError),
    #[error("the model takes {inputs} inputs; schema {SCHEMA} has {FEATURES} features")]
    Inputs { inputs: usize },
    #[error("the model gives {outputs} outputs; expected {TARGETS} (runtime and peak memory)")]
    Outputs { outputs: usize },
}

impl From<MlpError> for ModelError {
    fn from(error: MlpError) -> Self {
        match error {
            MlpError::NonFinite { layer, what, index, value } => {
                ModelError::NonFinite { layer, what, index, value }
            }
            other => ModelError::Invalid(other),
        }
    }
}

/// A predicted run: both at least 1 and at most the limits examples are accepted under.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    pub runtime_ms: f64,
    pub peak_memory_bytes: f64,
}

/// A validated model of the current feature schema.
#[derive(Clone, Debug, PartialEq)]
pub struct Predictor {
    mlp: Mlp,
}

/// The encoding a model's weights travel and are stored in: JSON of [`Mlp`].
pub fn encode_weights(mlp: &Mlp) -> Vec<u8> {
    // Serializing plain structs of integers and floats into memory has no failure path in
    // serde_json (non-finite floats become `null`, which decoding then refuses).
    serde_json::to_vec(mlp).expect("an Mlp always serializes to JSON")
}

/// The target-space range predictions are clamped to, per target.
fn target_bounds() -> [(f32, f32); TARGETS] {
    let bounds = |max: u64| (1.0_f64.ln_1p() as f32, (max as f64).ln_1p() as f32);
    [bounds(RUNTIME_MS_MAX), bounds(PEAK_MEMORY_BYTES_MAX)]
}

impl Predictor {
    /// Loads a model as the registry stores it, refusing anything the scheduler cannot use.
    pub fn from_model(feature_schema: &str, weights: &[u8]) -> Result<Self, ModelError> {
        if feature_schema != SCHEMA {
            return Err(ModelError::Schema { schema: feature_schema.to_owned() });
        }
        if weights.len() > WEIGHTS_BYTES_MAX {
            return Err(ModelError::TooLarge { bytes: weights.len(), max: WEIGHTS_BYTES_MAX });
        }
        let mlp: Mlp = serde_json::from_slice(weights).map_err(ModelError::Decode)?;
        Self::from_mlp(mlp)
    }

    /// Wraps a model of this schema, checking its parameters and its input and output widths.
    pub fn from_mlp(mlp: Mlp) -> Result<Self, ModelError> {
        mlp.validate()?;
        if mlp.inputs() != FEATURES {
            return Err(ModelError::Inputs { inputs: mlp.inputs() });
        }
        if mlp.outputs() != TARGETS {
            return Err(ModelError::Outputs { outputs: mlp.outputs() });
        }
        Ok(Self { mlp })
    }

    pub fn mlp(&self) -> &Mlp {
        &self.mlp
    }

    /// The model's targets for one feature vector, clamped to the accepted ranges.
    ///
    /// This is [`Mlp::predict`]'s forward pass for one row without its checks, so that it cannot
    /// fail: the shapes were checked when the model was loaded.
    pub fn predict_targets(&self, features: &[f32; FEATURES]) -> [f32; TARGETS] {
        let activation = self.mlp.forward(features, 1);
        let mut targets = [0.0_f32; TARGETS];
        for ((target, &value), (low, high)) in
            targets.iter_mut().zip(&activation).zip(target_bounds())
        {
            // Finite weights can still overflow to infinity and then NaN; the high end is the
            // cautious answer for both time and memory.
            *target = if value.is_nan() { high } else { value.clamp(low, high) };
        }
        targets
    }

    /// The predicted runtime and peak memory of `task` on `executor` (`None`: not yet placed).
    pub fn predict(&self, task: &TaskSpec, executor: Option<&ExecutorSpec>) -> Prediction {
        let targets = self.predict_targets(&features::features(task, executor));
        let (runtime_ms, peak_memory_bytes) = features::from_targets(targets);
        Prediction {
            runtime_ms: runtime_ms.clamp(1.0, RUNTIME_MS_MAX as f64),
            peak_memory_bytes: peak_memory_bytes.clamp(1.0, PEAK_MEMORY_BYTES_MAX as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self, executor, process_task};

    fn model(inputs: usize, outputs: usize) -> Mlp {
        fixtures::mlp(inputs, &[8, 8], outputs)
    }

    #[test]
    fn a_good_model_round_trips_and_predicts_like_the_mlp() -> Result<(), Box<dyn std::error::Error>>
    {
        let mlp = model(FEATURES, TARGETS);
        let weights = encode_weights(&mlp);
        let predictor = Predictor::from_model(SCHEMA, &weights)?;
        assert_eq!(predictor.mlp(), &mlp);
        let task = process_task("etl-3", &["--rows", "10"]);
        let exec = executor();
        let x = features::features(&task, Some(&exec));
        let raw = mlp.predict(&x, 1)?;
        let targets = predictor.predict_targets(&x);
        for ((&got, &want), (low, high)) in targets.iter().zip(&raw).zip(target_bounds()) {
            assert_eq!(got, want.clamp(low, high));
        }
        let prediction = predictor.predict(&task, Some(&exec));
        assert!(prediction.runtime_ms >= 1.0 && prediction.runtime_ms <= RUNTIME_MS_MAX as f64);
        assert!(prediction.peak_memory_bytes >= 1.0);
        Ok(())
    }

    #[test]
    fn predictions_are_clamped() -> Result<(), Box<dyn std::error::Error>> {
        let mut mlp = model(FEATURES, TARGETS);
        if let Some(last) = mlp.layers.last_mut() {
            last.b = vec![1000.0, -1000.0];
            last.w.iter_mut().for_each(|w| *w = 0.0);
        }
        let predictor = Predictor::from_mlp(mlp)?;
        let prediction = predictor.predict(&process_task("x", &[]), None);
        assert!((prediction.runtime_ms / RUNTIME_MS_MAX as f64 - 1.0).abs() < 1e-5);
        assert!((prediction.peak_memory_bytes - 1.0).abs() < 1e-6, "{prediction:?}");
        Ok(())
    }

    #[test]
    fn refuses_another_schema() -> Result<(), MlpError> {
        let weights = encode_weights(&model(FEATURES, TARGETS));
        let error = Predictor::from_model("colony-features-v0", &weights);
        assert!(matches!(error, Err(ModelError::Schema { .. })));
        assert_eq!(
            error.map(|_| ()).map_err(|e| e.to_string()),
            Err("feature schema \"colony-features-v0\" does not match colony-features-v1"
                .to_owned())
        );
        Ok(())
    }

    #[test]
    fn refuses_non_finite_weights() -> Result<(), MlpError> {
        let mut mlp = model(FEATURES, TARGETS);
        mlp.layers[1].w[5] = f32::NAN;
        let error = Predictor::from_mlp(mlp.clone());
        assert_eq!(
            error.map(|_| ()).map_err(|e| e.to_string()),
            Err("weights contain NaN (layer 1, w[5])".to_owned())
        );
        // JSON has no NaN: it encodes as null, which does not decode as a weight.
        assert!(matches!(
            Predictor::from_model(SCHEMA, &encode_weights(&mlp)),
            Err(ModelError::Decode(_))
        ));
        // A literal beyond f32's range decodes as infinity and is caught by validation.
        let text = String::from_utf8_lossy(&encode_weights(&model(FEATURES, TARGETS))).replacen(
            "\"b\":[0.0",
            "\"b\":[1e39",
            1,
        );
        assert!(matches!(
            Predictor::from_model(SCHEMA, text.as_bytes()),
            Err(ModelError::NonFinite { layer: 0, what: "b", index: 0, value }) if value.is_infinite()
        ));
        Ok(())
    }

    #[test]
    fn refuses_oversized_weights() {
        let weights = vec![b' '; WEIGHTS_BYTES_MAX + 1];
        let error = Predictor::from_model(SCHEMA, &weights);
        assert_eq!(
            error.map(|_| ()).map_err(|e| e.to_string()),
            Err(format!(
                "weights are {} bytes; the limit is {WEIGHTS_BYTES_MAX}",
                WEIGHTS_BYTES_MAX + 1
            ))
        );
    }

    #[test]
    fn refuses_the_wrong_widths_and_garbage() -> Result<(), MlpError> {
        let narrow = encode_weights(&model(FEATURES - 1, TARGETS));
        assert!(matches!(
            Predictor::from_model(SCHEMA, &narrow),
            Err(ModelError::Inputs { inputs }) if inputs == FEATURES - 1
        ));
        let one_output = encode_weights(&model(FEATURES, 1));
        assert!(matches!(
            Predictor::from_model(SCHEMA, &one_output),
            Err(ModelError::Outputs { outputs: 1 })
        ));
        assert!(matches!(
            Predictor::from_model(SCHEMA, b"{\"layers\":[]}"),
            Err(ModelError::Invalid(MlpError::NoLayers))
        ));
        assert!(matches!(Predictor::from_model(SCHEMA, b"not json"), Err(ModelError::Decode(_))));
        Ok(())
    }
}
