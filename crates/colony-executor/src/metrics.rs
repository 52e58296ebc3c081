//! An executor's Prometheus metrics, and the HTTP endpoint serving them beside `/healthz` (alive)
//! and `/readyz` (connected to the leader and welcomed).

use crate::attempt::Outcome;
use colony_core::Resources;
use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::time::Duration;

/// The resource types exported as `resource_type` label values, in the units of their names.
const RESOURCE_TYPES: [&str; 3] = ["cpu_millis", "memory_bytes", "gpus"];
const OUTCOMES: [Outcome; 5] =
    [Outcome::Succeeded, Outcome::Failed, Outcome::TimedOut, Outcome::OomKilled, Outcome::Killed];

/// Every metric an executor exports. Names start with `colony_`; no label carries a task id.
pub(crate) struct Metrics {
    registry: Registry,
    connected: IntGauge,
    pub running_tasks: IntGauge,
    attempts: IntCounterVec,
    allocated: IntGaugeVec,
    pub reconnects: IntCounter,
    pub quic_errors: IntCounter,
    pub heartbeats: IntCounter,
    pub reports_pending: IntGauge,
    utilization: GaugeVec,
    system_health: IntGaugeVec,
    communication_seconds: HistogramVec,
    /// From an attempt's start (its assignment accepted) to its process running.
    pub attempt_start_seconds: prometheus::Histogram,
    capacity: [u64; 3],
}

fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> Result<C, prometheus::Error> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

/// Resources as `RESOURCE_TYPES` orders them.
fn amounts(r: &Resources) -> [u64; 3] {
    [r.cpu_millis, r.memory_bytes, u64::from(r.gpus)]
}

impl Metrics {
    pub(crate) fn new(capacity: &Resources) -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        colony_process::trace::register(&registry)?;
        let gauge = |name: &str, help: &str| register(&registry, IntGauge::new(name, help)?);
        let counter = |name: &str, help: &str| register(&registry, IntCounter::new(name, help)?);
        let by_resource = |name: &str, help: &str| {
            register(&registry, IntGaugeVec::new(Opts::new(name, help), &["resource_type"])?)
        };
        let metrics = Metrics {
            connected: gauge(
                "colony_executor_connected",
                "1 while connected to the leader and welcomed.",
            )?,
            running_tasks: gauge("colony_executor_running_tasks", "Attempts running now.")?,
            attempts: register(
                &registry,
                IntCounterVec::new(
                    Opts::new("colony_executor_attempts_total", "Attempts ended, by outcome."),
                    &["outcome"],
                )?,
            )?,
            allocated: by_resource(
                "colony_executor_allocated",
                "Resources requested by the running attempts.",
            )?,
            reconnects: counter(
                "colony_executor_reconnects_total",
                "Sessions with a leader established after the first.",
            )?,
            quic_errors: counter(
                "colony_executor_quic_errors_total",
                "Failed connection attempts, lost connections and malformed server messages.",
            )?,
            heartbeats: counter("colony_executor_heartbeats_total", "Heartbeats sent.")?,
            reports_pending: gauge(
                "colony_executor_reports_pending",
                "Status reports not yet acknowledged by the leader.",
            )?,
            utilization: register(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "colony_resource_utilization",
                        "Allocated share of capacity, 0 to 1.",
                    ),
                    &["resource_type", "agent"],
                )?,
            )?,
            system_health: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new("colony_system_health", "1 for the component's current status."),
                    &["component", "status"],
                )?,
            )?,
            communication_seconds: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "colony_agent_communication_seconds",
                        "Round-trip time of messages between agents.",
                    )
                    .buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 0.5, 1.0,
                    ]),
                    &["source", "destination"],
                )?,
            )?,
            attempt_start_seconds: register(
                &registry,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "colony_executor_attempt_start_seconds",
                        "From an accepted assignment to its process running: working directory, control group, user switch and spawn.",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015,
                        0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
                    ]),
                )?,
            )?,
            capacity: amounts(capacity),
            registry,
        };
        let capacity_gauge = by_resource_on(
            &metrics.registry,
            "colony_executor_capacity",
            "Resources this executor offers.",
        )?;
        for (resource, amount) in RESOURCE_TYPES.iter().zip(metrics.capacity) {
            capacity_gauge.with_label_values(&[resource]).set(saturating_i64(amount));
        }
        // Every label value exists from the start, so rates and alerts see zeros, not gaps.
        for outcome in OUTCOMES {
            metrics.attempts.with_label_values(&[outcome.label()]);
        }
        metrics.communication_seconds.with_label_values(&["executor", "leader"]);
        metrics.set_allocated(&Resources::default());
        metrics.set_connected(false);
        Ok(metrics)
    }

    /// Says, per cgroup controller limits need, whether attempts are held to it here (1) or not
    /// (0: the host lacks it and `--require-limits=false` let the executor start anyway).
    pub(crate) fn set_limits_enforced(
        &self,
        enforced: &[(&str, bool)],
    ) -> Result<(), prometheus::Error> {
        let gauge = register(
            &self.registry,
            IntGaugeVec::new(
                Opts::new(
                    "colony_executor_limits_enforced",
                    "1 when attempts' limits are enforced through this cgroup controller.",
                ),
                &["controller"],
            )?,
        )?;
        for (controller, on) in enforced {
            gauge.with_label_values(&[controller]).set(i64::from(*on));
        }
        Ok(())
    }

    /// Adds the process collector (CPU, memory, file descriptors of this process); only an
    /// executor that serves its metrics pays for it.
    pub(crate) fn add_process_collector(&self) -> Result<(), prometheus::Error> {
        self.registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        self.connected.set(i64::from(connected));
        self.system_health.with_label_values(&["executor", "healthy"]).set(i64::from(connected));
        self.system_health.with_label_values(&["executor", "degraded"]).set(i64::from(!connected));
    }

    pub(crate) fn attempt_ended(&self, outcome: Outcome) {
        self.attempts.with_label_values(&[outcome.label()]).inc();
    }

    /// Sets the allocation gauges to `allocated`, the sum over running attempts' requests.
    pub(crate) fn set_allocated(&self, allocated: &Resources) {
        for ((resource, amount), capacity) in
            RESOURCE_TYPES.iter().zip(amounts(allocated)).zip(self.capacity)
        {
            self.allocated.with_label_values(&[resource]).set(saturating_i64(amount));
            let share =
                if capacity == 0 { 0.0 } else { (amount as f64 / capacity as f64).clamp(0.0, 1.0) };
            self.utilization.with_label_values(&[resource, "executor"]).set(share);
        }
    }

    /// Records a report's round trip, from sending it to its acknowledgement.
    pub(crate) fn observe_report_round_trip(&self, elapsed: Duration) {
        self.communication_seconds
            .with_label_values(&["executor", "leader"])
            .observe(elapsed.as_secs_f64());
    }
}

/// Ready while connected to the leader and welcomed.
impl colony_process::Probe for Metrics {
    fn metrics_text(&self) -> Result<String, String> {
        colony_process::encode(&self.registry)
    }

    fn ready(&self) -> Result<(), String> {
        if self.connected.get() == 1 {
            Ok(())
        } else {
            Err("not ready: not connected to a leader\n".to_owned())
        }
    }
}

fn by_resource_on(
    registry: &Registry,
    name: &str,
    help: &str,
) -> Result<IntGaugeVec, prometheus::Error> {
    register(registry, IntGaugeVec::new(Opts::new(name, help), &["resource_type"])?)
}

fn saturating_i64(amount: u64) -> i64 {
    i64::try_from(amount).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_process::Probe as _;

    #[test]
    fn exposition_has_the_contract_names() {
        let capacity =
            Resources { cpu_millis: 4000, memory_bytes: 8 << 30, gpus: 0, ..Resources::default() };
        let metrics = Metrics::new(&capacity).expect("metrics");
        metrics.set_allocated(&Resources {
            cpu_millis: 1000,
            memory_bytes: 2 << 30,
            gpus: 0,
            ..Resources::default()
        });
        metrics.set_connected(true);
        metrics.attempt_ended(Outcome::TimedOut);
        metrics.observe_report_round_trip(Duration::from_millis(3));
        let text = metrics.metrics_text().expect("render");
        assert_eq!(metrics.ready(), Ok(()));
        for line in [
            "colony_executor_connected 1",
            "colony_executor_capacity{resource_type=\"cpu_millis\"} 4000",
            "colony_executor_allocated{resource_type=\"memory_bytes\"} 2147483648",
            "colony_resource_utilization{agent=\"executor\",resource_type=\"cpu_millis\"} 0.25",
            "colony_resource_utilization{agent=\"executor\",resource_type=\"gpus\"} 0",
            "colony_executor_attempts_total{outcome=\"timed_out\"} 1",
            "colony_executor_attempts_total{outcome=\"killed\"} 0",
            "colony_system_health{component=\"executor\",status=\"healthy\"} 1",
            "colony_system_health{component=\"executor\",status=\"degraded\"} 0",
            "colony_agent_communication_seconds_count{destination=\"leader\",source=\"executor\"} 1",
            "colony_executor_reports_pending 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
