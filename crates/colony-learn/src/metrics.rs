//! The learner's Prometheus metrics, and the HTTP endpoint serving them beside `/healthz` (alive)
//! and `/readyz` (following the cluster's feed of finished tasks).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::decide::Evaluation;
use crate::example::Rejected;

/// How a training round ended, as the `outcome` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundOutcome {
    Published,
    Rejected,
    /// Training, fetching the current model or publishing failed; the round is retried later.
    Failed,
}

impl RoundOutcome {
    const ALL: [RoundOutcome; 3] =
        [RoundOutcome::Published, RoundOutcome::Rejected, RoundOutcome::Failed];

    fn label(self) -> &'static str {
        match self {
            RoundOutcome::Published => "published",
            RoundOutcome::Rejected => "rejected",
            RoundOutcome::Failed => "failed",
        }
    }
}

/// Every metric the learner exports. Names start with `colony_`; no label carries a task id.
pub struct Metrics {
    registry: Registry,
    following: AtomicBool,
    examples: IntGauge,
    rejected: IntCounterVec,
    trainings: IntCounterVec,
    training_seconds: Histogram,
    holdout_mse: Gauge,
    baseline_mse: Gauge,
    error_ratio: Gauge,
    published_version: IntGauge,
    watch_reconnects: IntCounter,
    feed_missed: IntCounter,
    system_health: IntGaugeVec,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> Result<C, prometheus::Error> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| register(&registry, Gauge::new(name, help)?);
        let metrics = Metrics {
            following: AtomicBool::new(false),
            examples: register(
                &registry,
                IntGauge::new("colony_learner_examples", "Training examples held.")?,
            )?,
            rejected: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "colony_learner_examples_rejected_total",
                        "Finished tasks that did not become examples, by reason.",
                    ),
                    &["reason"],
                )?,
            )?,
            trainings: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "colony_learner_trainings_total",
                        "Training rounds, by outcome (published, rejected, failed).",
                    ),
                    &["outcome"],
                )?,
            )?,
            training_seconds: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "colony_learner_training_seconds",
                        "Time to train and evaluate one model.",
                    )
                    .buckets(vec![
                        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                    ]),
                )?,
            )?,
            holdout_mse: gauge(
                "colony_learner_holdout_mse",
                "Holdout MSE of the last trained model, in target space (log1p of ms and bytes).",
            )?,
            baseline_mse: gauge(
                "colony_learner_baseline_mse",
                "Holdout MSE of the per-kind mean baseline in the last training round.",
            )?,
            error_ratio: gauge(
                "colony_learner_holdout_error_ratio",
                "Holdout MSE over baseline MSE in the last training round; above 1 the model is worse than the baseline.",
            )?,
            published_version: register(
                &registry,
                IntGauge::new(
                    "colony_learner_published_version",
                    "The model version this learner last published (0: none yet).",
                )?,
            )?,
            watch_reconnects: register(
                &registry,
                IntCounter::new(
                    "colony_learner_watch_reconnects_total",
                    "Times the feed of finished tasks was lost; each is followed by reconnecting.",
                )?,
            )?,
            feed_missed: register(
                &registry,
                IntCounter::new(
                    "colony_learner_feed_missed_total",
                    "Finished-task records retention removed before the learner read them (an upper bound: held tasks count).",
                )?,
            )?,
            system_health: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "colony_system_health",
                        "1 for the component's current status.",
                    ),
                    &["component", "status"],
                )?,
            )?,
            registry,
        };
        // Every label value exists from the start, so rates and alerts see zeros, not gaps.
        for reason in Rejected::REASONS {
            metrics.rejected.with_label_values(&[reason]);
        }
        for outcome in RoundOutcome::ALL {
            metrics.trainings.with_label_values(&[outcome.label()]);
        }
        metrics.set_following(false);
        Ok(metrics)
    }

    /// Whether the feed of finished tasks is open: the learner's readiness and health.
    pub fn set_following(&self, following: bool) {
        self.following.store(following, Ordering::Relaxed);
        self.system_health.with_label_values(&["learner", "healthy"]).set(i64::from(following));
        self.system_health.with_label_values(&["learner", "degraded"]).set(i64::from(!following));
    }

    pub fn watch_reconnected(&self) {
        self.watch_reconnects.inc();
    }

    pub fn feed_missed(&self, records: u64) {
        self.feed_missed.inc_by(records);
    }

    pub fn set_examples(&self, count: usize) {
        self.examples.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn rejected(&self, reason: &Rejected) {
        self.rejected.with_label_values(&[reason.reason()]).inc();
    }

    pub fn trained(&self, elapsed: Duration, evaluation: &Evaluation) {
        self.training_seconds.observe(elapsed.as_secs_f64());
        self.holdout_mse.set(evaluation.holdout_mse);
        self.baseline_mse.set(evaluation.baseline_mse);
        self.error_ratio.set(evaluation.error_ratio());
    }

    pub fn round_ended(&self, outcome: RoundOutcome) {
        self.trainings.with_label_values(&[outcome.label()]).inc();
    }

    pub fn published(&self, version: u64) {
        self.published_version.set(saturating_i64(version));
    }

    /// Adds the process collector (CPU, memory, file descriptors of this process); only a
    /// learner that serves its metrics pays for it.
    pub fn add_process_collector(&self) -> Result<(), prometheus::Error> {
        self.registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
    }
}

/// Ready while following the cluster's feed of finished tasks.
impl colony_process::Probe for Metrics {
    fn metrics_text(&self) -> Result<String, String> {
        colony_process::encode(&self.registry)
    }

    fn ready(&self) -> Result<(), String> {
        if self.following.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("not ready: the feed of finished tasks is not open\n".to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_process::Probe as _;

    #[test]
    fn exposition_has_the_contract_names() -> Result<(), Box<dyn std::error::Error>> {
        let metrics = Metrics::new()?;
        metrics.set_examples(120);
        metrics.rejected(&Rejected::MemoryZero);
        metrics.trained(
            Duration::from_millis(300),
            &Evaluation {
                holdout_mse: 0.5,
                baseline_mse: 2.0,
                previous_mse: None,
                train_rows: 96,
                holdout_rows: 24,
            },
        );
        metrics.round_ended(RoundOutcome::Published);
        metrics.published(7);
        metrics.set_following(true);
        assert!(metrics.ready().is_ok());
        let text = metrics.metrics_text()?;
        for line in [
            "colony_learner_examples 120",
            "colony_learner_examples_rejected_total{reason=\"memory_zero\"} 1",
            "colony_learner_examples_rejected_total{reason=\"not_succeeded\"} 0",
            "colony_learner_trainings_total{outcome=\"published\"} 1",
            "colony_learner_trainings_total{outcome=\"rejected\"} 0",
            "colony_learner_training_seconds_count 1",
            "colony_learner_holdout_mse 0.5",
            "colony_learner_baseline_mse 2",
            "colony_learner_holdout_error_ratio 0.25",
            "colony_learner_published_version 7",
            "colony_learner_watch_reconnects_total 0",
            "colony_system_health{component=\"learner\",status=\"healthy\"} 1",
            "colony_system_health{component=\"learner\",status=\"degraded\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        Ok(())
    }
}
