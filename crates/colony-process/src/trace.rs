//! OpenTelemetry traces exported over OTLP/gRPC, when a process is given `--otlp-endpoint`.
//!
//! Spans are made with the OpenTelemetry API through the global tracer ([`tracer`]); a process
//! that never called [`init`] makes none ([`enabled`] is false and callers skip the work). A
//! finished span goes into a bounded queue ([`SPAN_QUEUE_MAX`]); one task exports the queue in
//! batches every [`EXPORT_INTERVAL`] or [`EXPORT_BATCH_MAX`] spans. Nothing here ever blocks the
//! process or grows without bound: with the endpoint down, an export fails after
//! [`EXPORT_TIMEOUT`] and its spans are dropped, and so is a span that finds the queue full, each
//! counted in `colony_trace_spans_dropped_total{reason}`.
//!
//! The trace context crosses processes as a W3C `traceparent` string ([`traceparent`],
//! [`parent`]), in gRPC metadata and in the executor protocol's messages.

use opentelemetry::trace::TraceState;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, Span, SpanData, SpanExporter as _, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::mpsc;

/// Finished spans waiting for export; past this, new ones are dropped (and counted).
pub const SPAN_QUEUE_MAX: usize = 8192;
/// The most spans one export carries.
pub const EXPORT_BATCH_MAX: usize = 512;
/// How often the queue is exported when it holds fewer than a batch.
pub const EXPORT_INTERVAL: Duration = Duration::from_millis(500);
/// An export not answered in this long failed; its spans are dropped.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

static ENABLED: AtomicBool = AtomicBool::new(false);
static COUNTERS: OnceLock<Counters> = OnceLock::new();
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// How a process exports its spans.
#[derive(Clone, Debug)]
pub struct TraceConfig {
    /// The OTLP/gRPC receiver, `http://HOST:PORT` (a collector beside the process, usually).
    pub endpoint: String,
    /// The share of new traces recorded, in [0, 1]; a trace started elsewhere keeps the choice
    /// its `traceparent` carries.
    pub sample_ratio: f64,
    /// `service.name`: `colony-server`, `colony-executor`.
    pub service: &'static str,
    /// `service.instance.id`: which server or executor.
    pub instance: String,
}

impl TraceConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(format!(
                "--trace-sample-ratio must be within 0 and 1, not {}",
                self.sample_ratio
            ));
        }
        match self.endpoint.split_once("://") {
            Some(("http", rest)) if !rest.is_empty() => Ok(()),
            Some(("https", _)) => Err(format!(
                "--otlp-endpoint {}: only http:// is supported; run a collector beside the process and let it forward over TLS",
                self.endpoint
            )),
            _ => Err(format!(
                "--otlp-endpoint must look like http://HOST:PORT, not {:?}",
                self.endpoint
            )),
        }
    }
}

#[derive(Clone)]
struct Counters {
    exported: IntCounter,
    dropped: IntCounterVec,
}

fn counters() -> &'static Counters {
    COUNTERS.get_or_init(|| Counters {
        exported: IntCounter::new(
            "colony_trace_spans_exported_total",
            "Spans the OTLP receiver accepted.",
        )
        .unwrap_or_else(|e| unreachable!("a fixed, valid metric name: {e}")),
        dropped: IntCounterVec::new(
            Opts::new(
                "colony_trace_spans_dropped_total",
                "Spans dropped: the export queue was full (queue_full) or the receiver failed or did not answer in time (export_failed).",
            ),
            &["reason"],
        )
        .unwrap_or_else(|e| unreachable!("a fixed, valid metric name: {e}")),
    })
}

/// Adds the export counters to a process's metrics.
pub fn register(registry: &Registry) -> Result<(), prometheus::Error> {
    let counters = counters();
    registry.register(Box::new(counters.exported.clone()))?;
    registry.register(Box::new(counters.dropped.clone()))?;
    for reason in ["queue_full", "export_failed"] {
        counters.dropped.with_label_values(&[reason]);
    }
    Ok(())
}

/// Whether spans are recorded in this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The tracer spans are made with.
pub fn tracer() -> opentelemetry::global::BoxedTracer {
    opentelemetry::global::tracer("colony")
}

/// Starts exporting spans; call once, inside the tokio runtime. The receiver need not be up: its
/// absence costs dropped spans, never the process.
pub fn init(config: &TraceConfig) -> Result<(), String> {
    config.validate()?;
    let resource = Resource::builder()
        .with_service_name(config.service)
        .with_attribute(KeyValue::new("service.instance.id", config.instance.clone()))
        .build();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("--otlp-endpoint {}: {e}", config.endpoint))?;
    // The processor below hands spans over without their resource: the exporter adds it.
    exporter.set_resource(&resource);
    let (queue, spans) = mpsc::channel(SPAN_QUEUE_MAX);
    tokio::spawn(export(exporter, spans));
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Queue { queue })
        .with_sampler(sampler)
        .with_resource(resource)
        .build();
    if PROVIDER.set(provider.clone()).is_err() {
        return Err("traces are already being exported".to_owned());
    }
    opentelemetry::global::set_tracer_provider(provider);
    ENABLED.store(true, Ordering::Relaxed);
    Ok(())
}

/// The span processor: finished spans into the bounded queue.
#[derive(Debug)]
struct Queue {
    queue: mpsc::Sender<SpanData>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.try_send(span).is_err() {
            counters().dropped.with_label_values(&["queue_full"]).inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown(&self) -> OTelSdkResult {
        Err(OTelSdkError::InternalFailure("spans are exported until the process exits".to_owned()))
    }
}

/// Exports the queue in batches until every sender is gone.
async fn export(exporter: opentelemetry_otlp::SpanExporter, mut spans: mpsc::Receiver<SpanData>) {
    let mut batch = Vec::with_capacity(EXPORT_BATCH_MAX);
    let mut tick = tokio::time::interval(EXPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let room = EXPORT_BATCH_MAX - batch.len();
        tokio::select! {
            received = spans.recv_many(&mut batch, room) => {
                if received == 0 {
                    send(&exporter, &mut batch).await;
                    return;
                }
                if batch.len() < EXPORT_BATCH_MAX {
                    continue;
                }
            }
            _ = tick.tick() => {
                if batch.is_empty() {
                    continue;
                }
            }
        }
        send(&exporter, &mut batch).await;
    }
}

/// Exports `batch` (emptying it), counting what was accepted and what was dropped.
async fn send(exporter: &opentelemetry_otlp::SpanExporter, batch: &mut Vec<SpanData>) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::take(batch);
    let count = spans.len() as u64;
    let counters = counters();
    match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(spans)).await {
        Ok(Ok(())) => counters.exported.inc_by(count),
        Ok(Err(_)) | Err(_) => counters.dropped.with_label_values(&["export_failed"]).inc_by(count),
    }
}

/// `context` as a W3C `traceparent`.
pub fn traceparent(context: &SpanContext) -> String {
    format!("00-{}-{}-{:02x}", context.trace_id(), context.span_id(), context.trace_flags().to_u8())
}

/// The longest `traceparent` taken from outside (version 00 is exactly 55 characters).
pub const TRACEPARENT_LEN: usize = 55;

/// A remote parent from a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`); `None` for anything
/// else, including all-zero ids.
pub fn parse_traceparent(text: &str) -> Option<SpanContext> {
    if text.len() != TRACEPARENT_LEN {
        return None;
    }
    let mut parts = text.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !(hex(trace) && hex(span) && hex(flags)) {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace == TraceId::INVALID || span == SpanId::INVALID {
        return None;
    }
    Some(SpanContext::new(trace, span, TraceFlags::new(flags & 1), true, TraceState::NONE))
}

/// The parent context for a span whose parent is `context` (local or from another process).
pub fn parent(context: &SpanContext) -> Context {
    Context::new().with_remote_span_context(context.clone())
}

/// The parent context a `traceparent` names, or none (a new trace) when it is absent or malformed.
pub fn parent_from(traceparent: &str) -> Context {
    parse_traceparent(traceparent).map_or_else(Context::new, |context| parent(&context))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = parse_traceparent(text).expect("valid");
        assert!(context.is_sampled() && context.is_remote());
        assert_eq!(traceparent(&context), text);
    }

    #[test]
    fn malformed_traceparents_start_new_traces() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00+4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?} refused");
            assert!(!parent_from(bad).span().span_context().is_valid(), "{bad:?}: a new trace");
        }
    }

    #[test]
    fn only_plain_http_endpoints_and_ratios_within_bounds_are_taken() {
        let config = |endpoint: &str, sample_ratio| TraceConfig {
            endpoint: endpoint.to_owned(),
            sample_ratio,
            service: "colony-test",
            instance: "1".to_owned(),
        };
        assert!(config("http://127.0.0.1:4317", 0.1).validate().is_ok());
        assert!(config("https://collector:4317", 0.1).validate().is_err());
        assert!(config("127.0.0.1:4317", 0.1).validate().is_err());
        assert!(config("http://", 0.1).validate().is_err());
        assert!(config("http://127.0.0.1:4317", 1.5).validate().is_err());
        assert!(config("http://127.0.0.1:4317", -0.1).validate().is_err());
        assert!(config("http://127.0.0.1:4317", f64::NAN).validate().is_err());
    }
}
