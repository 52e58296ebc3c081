//! Which model version the scheduler should use: none, a stale one ignored, or a new version to
//! decode. Decoding itself (colony-model's `Predictor`) is the shell's; this decides when.

use crate::ids::ModelVersion;
use crate::model::ModelRecord;
use std::time::Duration;

/// What the shell does with its decoded model after `ModelTracker::refresh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelDecision {
    /// The registry has no current model: schedule on declared resources.
    NoModel,
    /// The current model is older than the staleness limit: drop it and schedule on declared
    /// resources. `was_in_use` says whether it was in use until now (worth a log line).
    Stale { version: ModelVersion, was_in_use: bool },
    /// Decode this version and report back with `decoded`.
    Decode(ModelVersion),
    /// Nothing changed: keep what is in use (a version already decoded, or already found bad).
    Keep,
}

/// The version in use, and the last version looked at (decodable or not), so a bad model is
/// decoded and logged once, not every round.
#[derive(Clone, Debug, Default)]
pub struct ModelTracker {
    in_use: Option<ModelVersion>,
    seen: Option<ModelVersion>,
}

impl ModelTracker {
    pub fn refresh(
        &mut self,
        current: Option<&ModelRecord>,
        now_unix_ms: u64,
        stale_after: Duration,
    ) -> ModelDecision {
        let Some(record) = current else {
            self.in_use = None;
            self.seen = None;
            return ModelDecision::NoModel;
        };
        let stale_after_ms = u64::try_from(stale_after.as_millis()).unwrap_or(u64::MAX);
        if now_unix_ms.saturating_sub(record.created_unix_ms) > stale_after_ms {
            let was_in_use = self.in_use.take().is_some();
            return ModelDecision::Stale { version: record.version, was_in_use };
        }
        if self.seen == Some(record.version) {
            return ModelDecision::Keep;
        }
        self.seen = Some(record.version);
        ModelDecision::Decode(record.version)
    }

    /// The shell decoded (or failed to decode) `version`.
    pub fn decoded(&mut self, version: ModelVersion, usable: bool) {
        self.in_use = usable.then_some(version);
    }

    pub fn in_use(&self) -> Option<ModelVersion> {
        self.in_use
    }
}
