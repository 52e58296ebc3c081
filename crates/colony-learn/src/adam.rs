//! Adam's hyper-parameters and the bias corrections both backends share.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The optimiser's settings. The step count lives with the trainer, which owns the moments.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

#[derive(Debug, Error, PartialEq)]
pub enum AdamError {
    #[error("learning rate {lr} is not a positive finite number")]
    LearningRate { lr: f32 },
    #[error("{which} = {value} is outside [0, 1)")]
    Beta { which: &'static str, value: f32 },
    #[error("eps = {eps} is not a positive finite number")]
    Eps { eps: f32 },
}

impl Default for AdamConfig {
    /// Kingma and Ba's suggested settings, with a learning rate suited to small regressors.
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

impl AdamConfig {
    pub fn validate(&self) -> Result<(), AdamError> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(AdamError::LearningRate { lr: self.lr });
        }
        for (which, value) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return Err(AdamError::Beta { which, value });
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(AdamError::Eps { eps: self.eps });
        }
        Ok(())
    }

    /// `(1 - beta1^step, 1 - beta2^step)` for a step counted from 1, computed in f64 and rounded
    /// once, so the CPU reference and the kernel divide by bit-identical values.
    pub fn bias_corrections(&self, step: u64) -> (f32, f32) {
        // Past 2^53 steps the conversion rounds, but by then both corrections are exactly 1.
        let t = step as f64;
        let correction = |beta: f32| (1.0 - f64::from(beta).powf(t)) as f32;
        (correction(self.beta1), correction(self.beta2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_bad_settings() {
        assert!(AdamConfig::default().validate().is_ok());
        let bad = [
            AdamConfig { lr: 0.0, ..AdamConfig::default() },
            AdamConfig { lr: f32::NAN, ..AdamConfig::default() },
            AdamConfig { beta1: 1.0, ..AdamConfig::default() },
            AdamConfig { beta2: -0.1, ..AdamConfig::default() },
            AdamConfig { eps: 0.0, ..AdamConfig::default() },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?} was accepted");
        }
    }

    #[test]
    fn bias_corrections_approach_one() {
        let adam = AdamConfig::default();
        let (c1, c2) = adam.bias_corrections(1);
        // The betas are f32, so 1 - beta is only close to 0.1 and 0.001.
        assert!((c1 / 0.1 - 1.0).abs() < 1e-6, "{c1}");
        assert!((c2 / 0.001 - 1.0).abs() < 1e-4, "{c2}");
        assert_eq!(adam.bias_corrections(1_000_000), (1.0, 1.0));
    }
}
