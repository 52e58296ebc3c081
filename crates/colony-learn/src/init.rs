//! A new model's weights: its shape and a seeded, deterministic initialisation, the starting point
//! of training. The model itself (weights, validation, the forward pass) is `colony-model`'s.

use colony_model::mlp::{Layer, Mlp, MlpError, LAYERS_MAX, LAYER_WIDTH_MAX};
use serde::{Deserialize, Serialize};

/// The shape of a new model and the seed of its initial weights.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlpConfig {
    pub inputs: usize,
    pub hidden: Vec<usize>,
    pub outputs: usize,
    pub seed: u64,
}

/// A model with the given shape, initialised deterministically from `config.seed`: weights
/// uniform in ±sqrt(6 / fan_in) (He, for the ReLU that follows) on hidden layers and
/// ±sqrt(6 / (fan_in + fan_out)) (Glorot) on the linear output layer; biases zero.
pub fn new_mlp(config: &MlpConfig) -> Result<Mlp, MlpError> {
    let widths: Vec<usize> = std::iter::once(config.inputs)
        .chain(config.hidden.iter().copied())
        .chain(std::iter::once(config.outputs))
        .collect();
    let layer_count = widths.len() - 1;
    if layer_count > LAYERS_MAX {
        return Err(MlpError::TooManyLayers { layers: layer_count, max: LAYERS_MAX });
    }
    for (index, &width) in widths.iter().enumerate() {
        if !(1..=LAYER_WIDTH_MAX).contains(&width) {
            // Width i is layer i's input (or the last layer's output).
            let layer = index.min(layer_count - 1);
            return Err(MlpError::Width { layer, width, max: LAYER_WIDTH_MAX });
        }
    }
    let mut rng = SplitMix64::new(config.seed);
    let layers = widths
        .windows(2)
        .enumerate()
        .map(|(index, pair)| {
            let (inputs, outputs) = (pair[0], pair[1]);
            let bound = if index + 1 == layer_count {
                (6.0 / (inputs + outputs) as f64).sqrt()
            } else {
                (6.0 / inputs as f64).sqrt()
            };
            let w = (0..inputs * outputs)
                .map(|_| ((rng.next_unit() * 2.0 - 1.0) * bound) as f32)
                .collect();
            Layer { inputs, outputs, w, b: vec![0.0; outputs] }
        })
        .collect();
    let mlp = Mlp { layers };
    mlp.validate()?;
    Ok(mlp)
}

/// Steele, Lea and Flood's SplitMix64: a fixed, documented generator, so a seed gives the same
/// initial weights on every machine and with every version of every dependency.
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) from the top 53 bits.
    fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MlpConfig {
        MlpConfig { inputs: 3, hidden: vec![4], outputs: 2, seed: 42 }
    }

    #[test]
    fn new_is_deterministic_and_shaped() -> Result<(), MlpError> {
        let mlp = new_mlp(&config())?;
        assert_eq!(mlp, new_mlp(&config())?);
        assert_ne!(mlp, new_mlp(&MlpConfig { seed: 43, ..config() })?);
        assert_eq!((mlp.inputs(), mlp.outputs()), (3, 2));
        assert_eq!(mlp.parameter_count(), 3 * 4 + 4 + 4 * 2 + 2);
        let bound = (6.0_f32 / 3.0).sqrt();
        assert!(mlp.layers[0].w.iter().all(|w| w.abs() <= bound));
        assert!(mlp.layers.iter().all(|layer| layer.b.iter().all(|&b| b == 0.0)));
        Ok(())
    }

    #[test]
    fn new_rejects_bad_shapes() {
        let zero = MlpConfig { hidden: vec![4, 0], ..config() };
        assert_eq!(
            new_mlp(&zero),
            Err(MlpError::Width { layer: 2, width: 0, max: LAYER_WIDTH_MAX })
        );
        let wide = MlpConfig { inputs: LAYER_WIDTH_MAX + 1, ..config() };
        assert!(matches!(new_mlp(&wide), Err(MlpError::Width { layer: 0, .. })));
        let deep = MlpConfig { hidden: vec![2; LAYERS_MAX], ..config() };
        assert!(matches!(new_mlp(&deep), Err(MlpError::TooManyLayers { .. })));
    }
}
