//! The MLP regressor's weights: shape, validation and the forward pass (inference only).
//!
//! Hidden layers use ReLU and the output layer is linear, so one model predicts several targets
//! at once (typically log-runtime and log-peak-memory). Weights are row-major, `inputs x outputs`
//! per layer, and serialize with serde for the model registry. Initialisation and training live in
//! `colony-learn`, whose CPU backend computes the forward pass in the same order of operations as
//! [`Mlp::predict`] here, so a model predicts bit for bit what the CPU trainer computed.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The most layers a model may have, hidden and output together.
pub const LAYERS_MAX: usize = 16;
/// The widest a layer's input or output may be.
pub const LAYER_WIDTH_MAX: usize = 4096;

/// One fully connected layer: y = x·w + b.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Layer {
    pub inputs: usize,
    pub outputs: usize,
    /// `inputs x outputs`, row-major.
    pub w: Vec<f32>,
    /// One bias per output.
    pub b: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mlp {
    pub layers: Vec<Layer>,
}

#[derive(Debug, Error, PartialEq)]
pub enum MlpError {
    #[error("a model needs at least one layer")]
    NoLayers,
    #[error("{layers} layers exceed the limit of {max}")]
    TooManyLayers { layers: usize, max: usize },
    #[error("layer {layer}: width {width} is outside 1..={max}")]
    Width { layer: usize, width: usize, max: usize },
    #[error("layer {layer}: {what} holds {actual} values, expected {expected}")]
    Shape { layer: usize, what: &'static str, expected: usize, actual: usize },
    #[error(
        "layer {layer} takes {inputs} inputs but the layer before it gives {previous_outputs}"
    )]
    Chain { layer: usize, inputs: usize, previous_outputs: usize },
    #[error("layer {layer}: {what}[{index}] is {value}, not a finite number")]
    NonFinite { layer: usize, what: &'static str, index: usize, value: f32 },
    #[error("the input holds {actual} values, expected {rows} rows of {inputs}")]
    Input { rows: usize, inputs: usize, actual: usize },
}

impl Mlp {
    /// The number of features a prediction takes. Zero for a model with no layers.
    pub fn inputs(&self) -> usize {
        self.layers.first().map_or(0, |layer| layer.inputs)
    }

    /// The number of values a prediction gives. Zero for a model with no layers.
    pub fn outputs(&self) -> usize {
        self.layers.last().map_or(0, |layer| layer.outputs)
    }

    /// Weights and biases together.
    pub fn parameter_count(&self) -> usize {
        self.layers.iter().map(|layer| layer.w.len() + layer.b.len()).sum()
    }

    /// Checks the model's shape against its limits and every parameter for NaN and infinity.
    /// A model from the registry or from training is validated before it is used.
    pub fn validate(&self) -> Result<(), MlpError> {
        if self.layers.is_empty() {
            return Err(MlpError::NoLayers);
        }
        if self.layers.len() > LAYERS_MAX {
            return Err(MlpError::TooManyLayers { layers: self.layers.len(), max: LAYERS_MAX });
        }
        let mut previous_outputs = None;
        for (index, layer) in self.layers.iter().enumerate() {
            for width in [layer.inputs, layer.outputs] {
                if !(1..=LAYER_WIDTH_MAX).contains(&width) {
                    return Err(MlpError::Width { layer: index, width, max: LAYER_WIDTH_MAX });
                }
            }
            if let Some(previous_outputs) = previous_outputs {
                if layer.inputs != previous_outputs {
                    return Err(MlpError::Chain {
                        layer: index,
                        inputs: layer.inputs,
                        previous_outputs,
                    });
                }
            }
            previous_outputs = Some(layer.outputs);
            // Both widths are at most LAYER_WIDTH_MAX, so the product cannot overflow.
            let expected_w = layer.inputs * layer.outputs;
            if layer.w.len() != expected_w {
                return Err(MlpError::Shape {
                    layer: index,
                    what: "w",
                    expected: expected_w,
                    actual: layer.w.len(),
                });
            }
            if layer.b.len() != layer.outputs {
                return Err(MlpError::Shape {
                    layer: index,
                    what: "b",
                    expected: layer.outputs,
                    actual: layer.b.len(),
                });
            }
            for (what, values) in [("w", &layer.w), ("b", &layer.b)] {
                if let Some((position, &value)) =
                    values.iter().enumerate().find(|(_, value)| !value.is_finite())
                {
                    return Err(MlpError::NonFinite { layer: index, what, index: position, value });
                }
            }
        }
        Ok(())
    }

    /// Predicts `rows` samples given row-major in `x` (`rows x inputs`); returns `rows x outputs`.
    /// Validates the model and the input's length first, so a corrupt model never predicts.
    pub fn predict(&self, x: &[f32], rows: usize) -> Result<Vec<f32>, MlpError> {
        self.validate()?;
        let expected = rows.checked_mul(self.inputs()).ok_or(MlpError::Input {
            rows,
            inputs: self.inputs(),
            actual: x.len(),
        })?;
        if x.len() != expected {
            return Err(MlpError::Input { rows, inputs: self.inputs(), actual: x.len() });
        }
        Ok(self.forward(x, rows))
    }

    /// The forward pass over `rows` samples of a validated model with an input of the right
    /// length. Each output starts from zero and accumulates its products in ascending input
    /// order, then adds the bias, then (on hidden layers) takes the ReLU as `max(0)`, which maps
    /// NaN to 0: the order and the operations of `colony-learn`'s CPU `gemm_ab` and its epilogue.
    pub(crate) fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let last = self.layers.len() - 1;
        let mut activation = x.to_vec();
        for (index, layer) in self.layers.iter().enumerate() {
            let mut next = vec![0.0_f32; rows * layer.outputs];
            for (row, out) in next.chunks_exact_mut(layer.outputs).enumerate() {
                let inputs = &activation[row * layer.inputs..(row + 1) * layer.inputs];
                for (&input, w_row) in inputs.iter().zip(layer.w.chunks_exact(layer.outputs)) {
                    for (sum, &w) in out.iter_mut().zip(w_row) {
                        *sum += input * w;
                    }
                }
                for (value, &b) in out.iter_mut().zip(&layer.b) {
                    *value += b;
                    if index != last {
                        *value = value.max(0.0);
                    }
                }
            }
            activation = next;
        }
        activation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fixtures;

    fn small() -> Mlp {
        fixtures::mlp(3, &[4], 2)
    }

    #[test]
    fn validate_rejects_non_finite_weights_and_bad_shapes() -> Result<(), MlpError> {
        let good = small();
        good.validate()?;

        let mut nan = good.clone();
        nan.layers[1].w[3] = f32::NAN;
        assert!(matches!(
            nan.validate(),
            Err(MlpError::NonFinite { layer: 1, what: "w", index: 3, .. })
        ));
        let mut inf = good.clone();
        inf.layers[0].b[2] = f32::NEG_INFINITY;
        assert!(matches!(
            inf.validate(),
            Err(MlpError::NonFinite { layer: 0, what: "b", index: 2, .. })
        ));
        let mut short_w = good.clone();
        short_w.layers[0].w.pop();
        assert_eq!(
            short_w.validate(),
            Err(MlpError::Shape { layer: 0, what: "w", expected: 12, actual: 11 })
        );
        let mut long_b = good.clone();
        long_b.layers[1].b.push(0.0);
        assert_eq!(
            long_b.validate(),
            Err(MlpError::Shape { layer: 1, what: "b", expected: 2, actual: 3 })
        );
        let mut broken_chain = good.clone();
        broken_chain.layers[1] = Layer { inputs: 5, outputs: 2, w: vec![0.0; 10], b: vec![0.0; 2] };
        assert_eq!(
            broken_chain.validate(),
            Err(MlpError::Chain { layer: 1, inputs: 5, previous_outputs: 4 })
        );
        assert_eq!(Mlp { layers: vec![] }.validate(), Err(MlpError::NoLayers));
        // predict validates first, so a corrupt model never predicts.
        assert!(matches!(nan.predict(&[0.0; 3], 1), Err(MlpError::NonFinite { .. })));
        Ok(())
    }

    #[test]
    fn serde_round_trip_is_exact() -> Result<(), Box<dyn std::error::Error>> {
        let mlp = fixtures::mlp(5, &[7, 3], 2);
        let json = serde_json::to_string(&mlp)?;
        let back: Mlp = serde_json::from_str(&json)?;
        assert_eq!(back, mlp);
        let bits = |m: &Mlp| -> Vec<u32> {
            m.layers.iter().flat_map(|l| l.w.iter().chain(&l.b)).map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&back), bits(&mlp));
        Ok(())
    }

    /// The registry stores this encoding; this frozen text must keep decoding to the same model.
    #[test]
    fn frozen_json_still_decodes() -> Result<(), Box<dyn std::error::Error>> {
        const FROZEN: &str = r#"{"layers":[{"inputs":2,"outputs":2,"w":[1.0,-1.0,0.5,2.0],"b":[0.0,-3.0]},{"inputs":2,"outputs":1,"w":[1.0,0.25],"b":[0.125]}]}"#;
        let mlp: Mlp = serde_json::from_str(FROZEN)?;
        mlp.validate()?;
        assert_eq!(serde_json::to_string(&mlp)?, FROZEN);
        // x = (2, 1): hidden = ReLU(2·1 + 1·0.5, 2·(-1) + 1·2 - 3) = (2.5, 0); out = 2.5 + 0.125.
        assert_eq!(mlp.predict(&[2.0, 1.0], 1)?, vec![2.625]);
        Ok(())
    }

    #[test]
    fn predict_checks_its_input() -> Result<(), MlpError> {
        let mlp = small();
        assert_eq!(mlp.predict(&[0.0; 6], 2)?.len(), 4);
        assert_eq!(
            mlp.predict(&[0.0; 5], 2),
            Err(MlpError::Input { rows: 2, inputs: 3, actual: 5 })
        );
        Ok(())
    }
}
