//! How the learner runs: its servers, data directory, device, metrics address and when to train.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::decide::{DecideError, TrainConfig};
use crate::device::Device;

/// How the learner runs. [`LearnerConfig::new`] fills in the defaults.
#[derive(Clone, Debug)]
pub struct LearnerConfig {
    /// Admin endpoints, `HOST:PORT`; any server answers any request.
    pub servers: Vec<String>,
    /// A learner join token, needed the first time only: the learner enrolls with it and keeps
    /// the certificate it is issued in `data_dir`.
    pub token: Option<String>,
    /// Where the cursor and the example log live.
    pub data_dir: PathBuf,
    pub device: Device,
    /// Serves `/metrics`, `/healthz` and `/readyz` here when set.
    pub metrics_listen: Option<SocketAddr>,
    /// Retrain once this many new examples arrived (default 200).
    pub retrain_every_examples: usize,
    /// Or once this long passed since the last round with at least one new example (default 30s).
    pub retrain_interval: Duration,
    /// Never train on fewer examples (default 100).
    pub min_examples: usize,
    /// Model shape, steps, optimiser, holdout fraction (0.2), publishing margin and seed.
    pub train: TrainConfig,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("no server given")]
    NoServers,
    #[error("server {addr:?} is not HOST:PORT")]
    Server { addr: String },
    #[error("retrain_every_examples must be at least 1")]
    RetrainEvery,
    #[error("retrain_interval must be longer than zero")]
    RetrainInterval,
    #[error("min_examples {min} is outside 2..={max}")]
    MinExamples { min: usize, max: usize },
    #[error("the training settings are invalid")]
    Train(#[from] DecideError),
}

impl LearnerConfig {
    pub fn new(servers: Vec<String>, token: Option<String>, data_dir: PathBuf) -> Self {
        Self {
            servers,
            token,
            data_dir,
            device: Device::Auto,
            metrics_listen: None,
            retrain_every_examples: 200,
            retrain_interval: Duration::from_secs(30),
            min_examples: 100,
            train: TrainConfig::default(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.servers.is_empty() {
            return Err(ConfigError::NoServers);
        }
        for addr in &self.servers {
            if colony_client::parse_endpoint(addr).is_err() {
                return Err(ConfigError::Server { addr: addr.clone() });
            }
        }
        if self.retrain_every_examples == 0 {
            return Err(ConfigError::RetrainEvery);
        }
        if self.retrain_interval.is_zero() {
            return Err(ConfigError::RetrainInterval);
        }
        // A split needs a row on each side.
        if !(2..=crate::example::EXAMPLES_MAX).contains(&self.min_examples) {
            return Err(ConfigError::MinExamples {
                min: self.min_examples,
                max: crate::example::EXAMPLES_MAX,
            });
        }
        self.train.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let config = LearnerConfig::new(
            vec!["127.0.0.1:7101".to_owned()],
            None,
            PathBuf::from("/tmp/learner"),
        );
        assert!(config.validate().is_ok());
        assert_eq!(config.retrain_every_examples, 200);
        assert_eq!(config.retrain_interval, Duration::from_secs(30));
        assert_eq!(config.min_examples, 100);
        assert_eq!(config.train.hidden, vec![32, 32]);
        assert_eq!(config.train.holdout_fraction, 0.2);
        let bad = [
            LearnerConfig { servers: vec![], ..config.clone() },
            LearnerConfig { servers: vec!["http://host:1".to_owned()], ..config.clone() },
            LearnerConfig { retrain_every_examples: 0, ..config.clone() },
            LearnerConfig { retrain_interval: Duration::ZERO, ..config.clone() },
            LearnerConfig { min_examples: 1, ..config.clone() },
            LearnerConfig {
                train: TrainConfig { holdout_fraction: 1.5, ..TrainConfig::default() },
                ..config.clone()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
    }
}
