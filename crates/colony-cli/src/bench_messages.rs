//! `colony bench messages`: durable messages published and consumed, on Colony or on NATS
//! JetStream, so that the two can be measured side by side on one machine.
//!
//! Each `--publishers` value is a phase. A phase starts from an empty topic (Colony) or stream
//! (JetStream: `--nats-replicas` replicas, file storage, and, like a Colony topic, refusing new
//! messages when full), runs that many publishers in a closed loop, each sending its next message
//! when the last is acknowledged (Colony: its answer, given once the message is committed on a
//! majority, from a Publish call or, with `--calls batched`, the default, from the PublishBatch
//! call its connection's `colony_client::Publisher` gathered it into; JetStream: the publish
//! ack), then drains what the phase stored:
//! `--drainers` consumers sharing one consumer name each take a batch and acknowledge all of it
//! before asking for the next (Colony: a Receive and an Ack, both committed through Raft;
//! JetStream: a durable pull consumer with explicit acks, each one a double ack, which waits for
//! the server to confirm it). Neither side is given idempotency keys or message ids, so neither
//! does deduplication work.

use crate::bench::{machine, Live, Machine};
use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::stream::{DiscardPolicy, StorageType};
use async_nats::jetstream::ErrorCode;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use colony_client::{lazy_channel, Channel, Client, ClientConfig, ClientError, PublisherConfig};
use colony_proto::pb;
use colony_proto::pb::admin_client::AdminClient;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressFinish, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};

/// A publish, receive or ack not answered within this long counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Latencies above this (in microseconds) are recorded as this.
const LATENCY_MAX_US: u64 = 3_600_000_000;
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// How long one receive (Colony) or fetch (JetStream) waits for messages.
const DRAIN_WAIT: Duration = Duration::from_millis(500);
/// A drain ends when nothing was acknowledged for this long: the messages still missing are
/// reported as missing.
const DRAIN_IDLE_MAX: Duration = Duration::from_secs(5);
/// Deliveries not acknowledged within this go out again: far longer than one batch takes.
const ACK_DEADLINE: Duration = Duration::from_secs(60);
/// After a failure a publisher or drainer waits this long before its next call, so a server that
/// refuses at once is not asked again in a busy loop.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Bounds of the benchmark's topic and stream: room for every message a phase publishes on one
/// machine; past them a publish is refused (and counted), never silently dropped.
const TOPIC_MESSAGES_MAX: u64 = 10_000_000;
const TOPIC_BYTES_MAX: u64 = 1 << 30;
/// The consumer name the drainers share.
const CONSUMER: &str = "bench-drain";
/// How long a new JetStream stream may take to elect its leader.
const STREAM_LEADER_WAIT: Duration = Duration::from_secs(10);
/// Error messages are kept, one per error code, up to this length.
const ERROR_EXAMPLE_CHARS_MAX: usize = 300;

/// Which system the messages go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The Colony cluster at `--endpoint`, with `--token`'s credentials.
    Colony,
    /// The NATS JetStream cluster at `--nats-url`.
    Nats,
}

/// How Colony's publishers make their calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Calls {
    /// Through a `colony_client::Publisher` per connection, which gathers the publishes waiting
    /// on it into PublishBatch calls (each message still answered on its own once committed), as
    /// a NATS client's publishes share its connection's writes.
    Batched,
    /// One Publish call per message.
    Single,
}

/// Where Colony's publishers and drainers send their calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SendTo {
    /// Every connection to the leader (found with ClusterStatus at start): a write costs one
    /// hop, as a producer that writes to its partition's leader.
    Leader,
    /// Connections spread over every endpoint: a write that reaches a follower is forwarded to
    /// the leader, a second gRPC hop.
    Any,
}

#[derive(Debug, Args)]
pub struct MessagesBenchArgs {
    /// Concurrent publishers, comma-separated: one phase per value.
    #[arg(
        long,
        default_value = "1,500",
        value_delimiter = ',',
        value_parser = clap::value_parser!(u64).range(1..=100_000)
    )]
    publishers: Vec<u64>,
    /// How long each phase publishes and measures, after the warmup.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Publishes in this first stretch of a phase are sent but not measured.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Payload bytes of each message (random bytes; Colony takes at most 64 KiB).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    size: u64,
    /// Connections to each endpoint (HTTP/2 for Colony, NATS connections for NATS); publishers
    /// and drainers are spread over them round-robin.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    connections: u64,
    /// Colony: the same number of connections (per endpoint given) all to the leader, or spread
    /// over the endpoints.
    #[arg(long, value_enum, default_value_t = SendTo::Leader)]
    send_to: SendTo,
    /// Colony: publishes gathered into batch calls per connection, or one call each.
    #[arg(long, value_enum, default_value_t = Calls::Batched)]
    calls: Calls,
    /// Colony with `--calls batched`: PublishBatch calls in flight per connection.
    #[arg(long, default_value_t = PublisherConfig::default().calls_in_flight_max as u64, value_parser = clap::value_parser!(u64).range(1..=64))]
    calls_in_flight: u64,
    /// The topic (Colony), or the subject with `/` as `.` (NATS). It is deleted and created
    /// again for each phase and deleted at the end: name one that holds nothing you need.
    #[arg(long, default_value = "bench/messages")]
    topic: String,
    /// Colony: the topic's namespace.
    #[arg(long, default_value = "bench")]
    namespace: String,
    /// The system to measure.
    #[arg(long, value_enum, default_value_t = Target::Colony)]
    target: Target,
    /// NATS servers, comma-separated, for `--target nats`.
    #[arg(long, value_delimiter = ',', default_value = "nats://127.0.0.1:4222")]
    nats_url: Vec<String>,
    /// NATS: the stream's replicas (a Colony topic is on every voter).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=5))]
    nats_replicas: u64,
    /// Concurrent consumers draining what a phase published; they share one consumer name.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    drainers: u64,
    /// Messages a drainer takes at once (Colony's receive hands out at most 1000).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    batch: u64,
}

/// One phase's clock: when measuring starts and when publishing stops.
#[derive(Clone, Copy)]
struct Clock {
    measure_from: Instant,
    end: Instant,
}

/// A failed call: a short code to count it under and what the server or client said.
#[derive(Debug)]
struct Failure {
    code: String,
    message: String,
}

impl Failure {
    fn new(code: impl Into<String>, message: impl std::fmt::Display) -> Failure {
        Failure { code: code.into(), message: message.to_string() }
    }

    /// A gRPC status, its code prefixed by the call (`receive:`) when not a publish.
    fn status(call: &str, status: &tonic::Status) -> Failure {
        Failure::new(format!("{call}{:?}", status.code()), colony_client::status_message(status))
    }

    fn timeout(call: &str) -> Failure {
        let waited = humantime::format_duration(REQUEST_TIMEOUT);
        Failure::new(format!("{call}ClientTimeout"), format!("no answer within {waited}"))
    }
}

/// Failures counted by code, each code with the first message seen.
#[derive(Debug, Default, Serialize)]
struct Errors {
    count: u64,
    by_code: BTreeMap<String, u64>,
    examples: BTreeMap<String, String>,
}

impl Errors {
    fn add(&mut self, failure: Failure) {
        self.count += 1;
        *self.by_code.entry(failure.code.clone()).or_insert(0) += 1;
        self.examples
            .entry(failure.code)
            .or_insert_with(|| failure.message.chars().take(ERROR_EXAMPLE_CHARS_MAX).collect());
    }

    fn merge(&mut self, other: Errors) {
        self.count += other.count;
        for (code, n) in other.by_code {
            *self.by_code.entry(code).or_insert(0) += n;
        }
        for (code, message) in other.examples {
            self.examples.entry(code).or_insert(message);
        }
    }

    /// `3 (Unavailable 2, ClientTimeout 1)`, or `0`.
    fn summary(&self) -> String {
        if self.count == 0 {
            return "0".to_owned();
        }
        let by_code: Vec<String> =
            self.by_code.iter().map(|(code, n)| format!("{code} {n}")).collect();
        format!("{} ({})", self.count, by_code.join(", "))
    }
}

#[derive(Debug, Serialize)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct DrainReport {
    /// What the topic or stream held when the drain began.
    stored: u64,
    acked: u64,
    /// Stored and not acknowledged when the drain gave up (nothing acknowledged for 5 s).
    missing: u64,
    /// From the drain's start to its last acknowledgement.
    seconds: f64,
    msgs_per_second: f64,
    errors: Errors,
}

#[derive(Debug, Serialize)]
struct PhaseReport {
    publishers: u64,
    /// Acknowledged publishes sent in the measured stretch.
    published_ok: u64,
    /// Acknowledged publishes in the whole phase (warmup included).
    published_ok_total: u64,
    msgs_per_second: f64,
    /// Milliseconds; null when nothing succeeded.
    latency_ms: Option<Latency>,
    /// Failed publishes in the whole phase (warmup included).
    errors: Errors,
    drain: DrainReport,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    target: Target,
    endpoints: Vec<String>,
    /// NATS: the stream's replicas; null for Colony (every voter).
    nats_replicas: Option<u64>,
    payload_bytes: u64,
    connections_per_endpoint: u64,
    /// Colony: where the publishers' and drainers' connections went; null for NATS.
    send_to: Option<SendTo>,
    /// Colony with `leader`: the leader's address at the start.
    leader: Option<String>,
    /// Colony: how publishes were called; null for NATS.
    calls: Option<Calls>,
    warmup_s: f64,
    duration_s: f64,
    drainers: u64,
    batch: u64,
    phases: Vec<PhaseReport>,
    /// Deleting the topic or stream at the end failed.
    cleanup_error: Option<String>,
}

/// Where the messages go: the connections a run holds, shared round-robin.
enum Backend {
    Colony {
        /// For topic administration: fails over between the servers.
        admin: Client,
        channels: Vec<Channel>,
        /// With `--calls batched`, one per channel.
        batchers: Vec<colony_client::Publisher>,
        /// With `--send-to leader`, where `channels` go.
        leader: Option<String>,
        namespace: String,
        topic: String,
    },
    Nats {
        /// One JetStream context per connection.
        contexts: Vec<jetstream::Context>,
        stream: String,
        subject: async_nats::Subject,
        replicas: usize,
    },
}

/// One publisher's connection and what it sends.
enum Publisher {
    Colony { client: AdminClient<Channel>, request: pb::PublishRequest },
    ColonyBatched { publisher: colony_client::Publisher, request: pb::PublishRequest },
    Nats { context: jetstream::Context, subject: async_nats::Subject, payload: Bytes },
}

/// One drainer's connection and what it asks for.
// A JetStream consumer carries its whole configuration (a kilobyte); a phase makes a handful of
// drainers and moves each once, so the size does not matter.
#[allow(clippy::large_enum_variant)]
enum Drainer {
    Colony { client: AdminClient<Channel>, namespace: String, topic: String, batch: u32 },
    Nats { consumer: PullConsumer, batch: usize },
}

/// What one drained batch came to.
#[derive(Default)]
struct DrainStep {
    acked: u64,
    failures: Vec<Failure>,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn index(i: u64, len: usize) -> usize {
    usize::try_from(i).unwrap_or(0) % len.max(1)
}

/// A JetStream stream name for a topic: letters, digits, `-` and `_`, the rest as `_`.
fn stream_name(topic: &str) -> String {
    topic.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

/// A NATS subject for a topic: its path segments as subject tokens.
fn subject_name(topic: &str) -> String {
    topic.replace('/', ".")
}

impl Backend {
    async fn connect(args: &MessagesBenchArgs, global: &GlobalArgs) -> Result<Backend> {
        match args.target {
            Target::Colony => {
                if global.endpoint.is_empty() {
                    bail!("no endpoint given (--endpoint or COLONY_ENDPOINT)");
                }
                let auth = global.auth()?;
                let config = ClientConfig::new(global.timeout);
                // One channel per endpoint for topic administration (fails over between them).
                let mut named = Vec::new();
                for addr in &global.endpoint {
                    named.push((addr.clone(), lazy_channel(addr, &config, &auth)?));
                }
                let admin = Client::from_channels(named.clone(), config.clone())?;
                let leader = match args.send_to {
                    SendTo::Any => None,
                    SendTo::Leader => Some(leader_address(&admin).await?),
                };
                // The same number of connections either way: round after round over the
                // endpoints (consecutive publishers land on different servers), or all to the
                // leader.
                let mut channels = Vec::new();
                for _ in 0..args.connections {
                    for (addr, channel) in &named {
                        channels.push(match &leader {
                            Some(leader) => lazy_channel(leader, &config, &auth)?,
                            None if channels.len() < named.len() => channel.clone(),
                            None => lazy_channel(addr, &config, &auth)?,
                        });
                    }
                }
                let batchers = match args.calls {
                    Calls::Batched => channels
                        .iter()
                        .map(|channel| {
                            colony_client::Publisher::spawn(
                                AdminClient::new(channel.clone()),
                                PublisherConfig {
                                    calls_in_flight_max: args.calls_in_flight as usize,
                                    ..PublisherConfig::default()
                                },
                            )
                        })
                        .collect(),
                    Calls::Single => Vec::new(),
                };
                Ok(Backend::Colony {
                    admin,
                    channels,
                    batchers,
                    leader,
                    namespace: args.namespace.clone(),
                    topic: args.topic.clone(),
                })
            }
            Target::Nats => {
                if args.nats_url.is_empty() {
                    bail!("no NATS server given (--nats-url)");
                }
                let mut contexts = Vec::new();
                for _ in 0..args.connections {
                    for url in &args.nats_url {
                        let client = async_nats::ConnectOptions::new()
                            .name("colony-bench")
                            .connection_timeout(REQUEST_TIMEOUT)
                            .connect(url.as_str())
                            .await
                            .with_context(|| format!("cannot connect to NATS at {url}"))?;
                        let mut context = jetstream::new(client);
                        context.set_timeout(REQUEST_TIMEOUT);
                        contexts.push(context);
                    }
                }
                Ok(Backend::Nats {
                    contexts,
                    stream: stream_name(&args.topic),
                    subject: async_nats::Subject::from(subject_name(&args.topic)),
                    replicas: usize::try_from(args.nats_replicas).unwrap_or(3),
                })
            }
        }
    }

    /// Deletes the topic or stream if it exists.
    async fn remove(&self) -> Result<()> {
        match self {
            Backend::Colony { admin, namespace, topic, .. } => {
                let request =
                    pb::DeleteTopicRequest { namespace: namespace.clone(), topic: topic.clone() };
                let deleted = admin
                    .call("delete topic", |mut c| {
                        let request = request.clone();
                        async move { c.delete_topic(request).await }
                    })
                    .await;
                match deleted {
                    Ok(_) => Ok(()),
                    Err(ClientError::Answered { status, .. })
                        if status.code() == tonic::Code::NotFound =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(e).with_context(|| format!("cannot delete topic {topic}")),
                }
            }
            Backend::Nats { contexts, stream, .. } => {
                let context = contexts.first().ok_or_else(|| anyhow!("no NATS connection"))?;
                match context.delete_stream(stream).await {
                    Ok(_) => Ok(()),
                    Err(e) => match e.kind() {
                        jetstream::context::DeleteStreamErrorKind::JetStream(js)
                            if js.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                        {
                            Ok(())
                        }
                        _ => Err(e).with_context(|| format!("cannot delete stream {stream}")),
                    },
                }
            }
        }
    }

    /// An empty topic or stream for a phase.
    async fn reset(&self) -> Result<()> {
        self.remove().await?;
        match self {
            Backend::Colony { admin, namespace, topic, .. } => {
                let request = pb::CreateTopicRequest {
                    namespace: namespace.clone(),
                    topic: topic.clone(),
                    policy: Some(pb::TopicPolicy {
                        max_messages: TOPIC_MESSAGES_MAX,
                        max_bytes: TOPIC_BYTES_MAX,
                        when_full: "reject".to_owned(),
                        ack_deadline_ms: millis(ACK_DEADLINE),
                        ..Default::default()
                    }),
                };
                admin
                    .call("create topic", |mut c| {
                        let request = request.clone();
                        async move { c.create_topic(request).await }
                    })
                    .await
                    .with_context(|| format!("cannot create topic {topic}"))?;
                Ok(())
            }
            Backend::Nats { contexts, stream, subject, replicas } => {
                let context = contexts.first().ok_or_else(|| anyhow!("no NATS connection"))?;
                let config = jetstream::stream::Config {
                    name: stream.clone(),
                    subjects: vec![subject.to_string()],
                    storage: StorageType::File,
                    num_replicas: *replicas,
                    max_messages: i64::try_from(TOPIC_MESSAGES_MAX).unwrap_or(i64::MAX),
                    max_bytes: i64::try_from(TOPIC_BYTES_MAX).unwrap_or(i64::MAX),
                    discard: DiscardPolicy::New,
                    ..Default::default()
                };
                let created = context
                    .create_stream(config)
                    .await
                    .with_context(|| format!("cannot create stream {stream}"))?;
                // Publishes before the stream's replicas elect a leader would only time out.
                let until = Instant::now() + STREAM_LEADER_WAIT;
                loop {
                    let info = created
                        .get_info()
                        .await
                        .with_context(|| format!("cannot read stream {stream}"))?;
                    // A server outside a cluster reports no cluster: its stream is ready.
                    if info.cluster.as_ref().is_none_or(|c| c.leader.is_some()) {
                        return Ok(());
                    }
                    if Instant::now() >= until {
                        bail!("stream {stream} has no leader after {STREAM_LEADER_WAIT:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn publisher(&self, i: u64, payload: &Bytes) -> Publisher {
        match self {
            Backend::Colony { channels, batchers, namespace, topic, .. } => {
                let request = pb::PublishRequest {
                    namespace: namespace.clone(),
                    topic: topic.clone(),
                    payload: payload.to_vec(),
                    ..Default::default()
                };
                match batchers.is_empty() {
                    true => Publisher::Colony {
                        client: AdminClient::new(channels[index(i, channels.len())].clone()),
                        request,
                    },
                    false => Publisher::ColonyBatched {
                        publisher: batchers[index(i, batchers.len())].clone(),
                        request,
                    },
                }
            }
            Backend::Nats { contexts, subject, .. } => Publisher::Nats {
                context: contexts[index(i, contexts.len())].clone(),
                subject: subject.clone(),
                payload: payload.clone(),
            },
        }
    }

    /// The messages the topic or stream holds.
    async fn stored(&self) -> Result<u64> {
        match self {
            Backend::Colony { admin, namespace, topic, .. } => {
                let mut after = (String::new(), String::new());
                loop {
                    let request = pb::ListTopicsRequest {
                        namespace: namespace.clone(),
                        after_namespace: after.0.clone(),
                        after_name: after.1.clone(),
                        page_size: 1000,
                        consistency: None,
                    };
                    let page = admin
                        .call("list topics", |mut c| {
                            let request = request.clone();
                            async move { c.list_topics(request).await }
                        })
                        .await
                        .context("cannot list topics")?;
                    if let Some(info) = page.topics.iter().find(|t| &t.name == topic) {
                        return Ok(info.messages);
                    }
                    if page.next_after_name.is_empty() || page.topics.is_empty() {
                        bail!("topic {topic} is not in namespace {namespace}");
                    }
                    after = (page.next_after_namespace, page.next_after_name);
                }
            }
            Backend::Nats { contexts, stream, .. } => {
                let context = contexts.first().ok_or_else(|| anyhow!("no NATS connection"))?;
                let info = context
                    .get_stream(stream)
                    .await
                    .with_context(|| format!("cannot find stream {stream}"))?
                    .get_info()
                    .await
                    .with_context(|| format!("cannot read stream {stream}"))?;
                Ok(info.state.messages)
            }
        }
    }

    /// `count` drainers sharing one consumer name (on JetStream, a durable pull consumer with
    /// explicit acks, created here).
    async fn drainers(&self, count: u64, batch: u64) -> Result<Vec<Drainer>> {
        let mut drainers = Vec::new();
        match self {
            Backend::Colony { channels, namespace, topic, .. } => {
                for i in 0..count {
                    drainers.push(Drainer::Colony {
                        client: AdminClient::new(channels[index(i, channels.len())].clone()),
                        namespace: namespace.clone(),
                        topic: topic.clone(),
                        batch: u32::try_from(batch).unwrap_or(u32::MAX),
                    });
                }
            }
            Backend::Nats { contexts, stream, .. } => {
                let context = contexts.first().ok_or_else(|| anyhow!("no NATS connection"))?;
                let config = pull::Config {
                    durable_name: Some(CONSUMER.to_owned()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: ACK_DEADLINE,
                    // Each drainer acknowledges its batch before asking for the next.
                    max_ack_pending: i64::try_from(count * batch).unwrap_or(i64::MAX),
                    ..Default::default()
                };
                context
                    .get_stream(stream)
                    .await
                    .with_context(|| format!("cannot find stream {stream}"))?
                    .create_consumer(config)
                    .await
                    .with_context(|| format!("cannot create consumer {CONSUMER}"))?;
                for i in 0..count {
                    let context = &contexts[index(i, contexts.len())];
                    let consumer: PullConsumer = context
                        .get_stream(stream)
                        .await
                        .with_context(|| format!("cannot find stream {stream}"))?
                        .get_consumer(CONSUMER)
                        .await
                        .map_err(|e| anyhow!("cannot find consumer {CONSUMER}: {e}"))?;
                    drainers.push(Drainer::Nats {
                        consumer,
                        batch: usize::try_from(batch).unwrap_or(usize::MAX),
                    });
                }
            }
        }
        Ok(drainers)
    }
}

/// A Colony publish's answer, or the time it ran out of.
fn colony_answer<T>(
    answered: Result<Result<T, tonic::Status>, tokio::time::error::Elapsed>,
) -> Result<(), Failure> {
    match answered {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(Failure::status("", &status)),
        Err(_) => Err(Failure::timeout("")),
    }
}

impl Publisher {
    /// Publishes one message and waits for its acknowledgement.
    async fn publish(&mut self) -> Result<(), Failure> {
        match self {
            Publisher::Colony { client, request } => {
                colony_answer(timeout(REQUEST_TIMEOUT, client.publish(request.clone())).await)
            }
            Publisher::ColonyBatched { publisher, request } => {
                colony_answer(timeout(REQUEST_TIMEOUT, publisher.publish(request.clone())).await)
            }
            Publisher::Nats { context, subject, payload } => {
                let publish =
                    async { context.publish(subject.clone(), payload.clone()).await?.await };
                match timeout(REQUEST_TIMEOUT, publish).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(Failure::new(format!("{:?}", e.kind()), &e)),
                    Err(_) => Err(Failure::timeout("")),
                }
            }
        }
    }
}

impl Drainer {
    /// Takes one batch and acknowledges all of it.
    async fn drain_batch(&mut self) -> DrainStep {
        let mut step = DrainStep::default();
        match self {
            Drainer::Colony { client, namespace, topic, batch } => {
                let receive = pb::ReceiveRequest {
                    namespace: namespace.clone(),
                    topic: topic.clone(),
                    consumer: CONSUMER.to_owned(),
                    max: *batch,
                    ack_deadline_ms: millis(ACK_DEADLINE),
                    wait_ms: millis(DRAIN_WAIT),
                };
                let deliveries =
                    match timeout(REQUEST_TIMEOUT + DRAIN_WAIT, client.receive(receive)).await {
                        Ok(Ok(response)) => response.into_inner().deliveries,
                        Ok(Err(status)) => {
                            step.failures.push(Failure::status("receive:", &status));
                            return step;
                        }
                        Err(_) => {
                            step.failures.push(Failure::timeout("receive:"));
                            return step;
                        }
                    };
                let mut refs = Vec::with_capacity(deliveries.len());
                for d in &deliveries {
                    match &d.message {
                        Some(m) => refs.push(pb::DeliveryRef { seq: m.seq, delivery: d.delivery }),
                        None => step.failures.push(Failure::new(
                            "receive:NoMessage",
                            "a delivery without its message",
                        )),
                    }
                }
                if refs.is_empty() {
                    return step;
                }
                let ack = pb::AckRequest {
                    namespace: namespace.clone(),
                    topic: topic.clone(),
                    consumer: CONSUMER.to_owned(),
                    deliveries: refs,
                };
                match timeout(REQUEST_TIMEOUT, client.ack(ack)).await {
                    Ok(Ok(response)) => {
                        let response = response.into_inner();
                        step.acked = response.acked.len() as u64;
                        for refused in response.refused {
                            step.failures.push(Failure::new("ack:Refused", refused.reason));
                        }
                    }
                    Ok(Err(status)) => step.failures.push(Failure::status("ack:", &status)),
                    Err(_) => step.failures.push(Failure::timeout("ack:")),
                }
            }
            Drainer::Nats { consumer, batch } => {
                let fetched = match consumer
                    .batch()
                    .max_messages(*batch)
                    .expires(DRAIN_WAIT)
                    .messages()
                    .await
                {
                    Ok(fetched) => fetched,
                    Err(e) => {
                        step.failures.push(Failure::new(format!("fetch:{:?}", e.kind()), &e));
                        return step;
                    }
                };
                let items = match timeout(REQUEST_TIMEOUT + DRAIN_WAIT, fetched.collect::<Vec<_>>())
                    .await
                {
                    Ok(items) => items,
                    Err(_) => {
                        step.failures.push(Failure::timeout("fetch:"));
                        return step;
                    }
                };
                let mut messages = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Ok(message) => messages.push(message),
                        Err(e) => step.failures.push(Failure::new("fetch:Message", &e)),
                    }
                }
                // Every ack of the batch in flight at once, each waiting for the server's reply.
                let acks = futures::future::join_all(messages.iter().map(|m| m.double_ack()));
                match timeout(REQUEST_TIMEOUT, acks).await {
                    Ok(results) => {
                        for result in results {
                            match result {
                                Ok(()) => step.acked += 1,
                                Err(e) => step.failures.push(Failure::new("ack:Failed", &e)),
                            }
                        }
                    }
                    Err(_) => {
                        for _ in &messages {
                            step.failures.push(Failure::timeout("ack:"));
                        }
                    }
                }
            }
        }
        step
    }
}

/// The leader's address, as the servers' membership names it.
async fn leader_address(admin: &Client) -> Result<String> {
    let status = admin
        .call("cluster status", |mut c| async move {
            c.cluster_status(pb::ClusterStatusRequest {}).await
        })
        .await?;
    let leader = status.leader_id.ok_or_else(|| anyhow!("the cluster has no leader yet"))?;
    status
        .members
        .iter()
        .find(|m| m.id == leader)
        .map(|m| m.addr.clone())
        .ok_or_else(|| anyhow!("leader {leader} is not among the members"))
}

fn check_args(args: &MessagesBenchArgs) -> Result<()> {
    if args.duration.is_zero() {
        bail!("--duration must be greater than zero");
    }
    if args.publishers.is_empty() {
        bail!("--publishers needs at least one count");
    }
    if args.topic.is_empty() {
        bail!("--topic must not be empty");
    }
    Ok(())
}

pub async fn run(args: MessagesBenchArgs, global: &GlobalArgs) -> Result<()> {
    check_args(&args)?;
    let backend = Backend::connect(&args, global).await?;
    let mut phases = Vec::new();
    for &publishers in &args.publishers {
        phases.push(run_phase(&backend, publishers, &args).await?);
    }
    let cleanup_error = backend.remove().await.err().map(|e| format!("{e:#}"));
    let report = Report {
        machine: machine(),
        target: args.target,
        endpoints: match args.target {
            Target::Colony => global.endpoint.clone(),
            Target::Nats => args.nats_url.clone(),
        },
        nats_replicas: (args.target == Target::Nats).then_some(args.nats_replicas),
        payload_bytes: args.size,
        connections_per_endpoint: args.connections,
        send_to: (args.target == Target::Colony).then_some(args.send_to),
        leader: match &backend {
            Backend::Colony { leader, .. } => leader.clone(),
            Backend::Nats { .. } => None,
        },
        calls: (args.target == Target::Colony).then_some(args.calls),
        warmup_s: args.warmup.as_secs_f64(),
        duration_s: args.duration.as_secs_f64(),
        drainers: args.drainers,
        batch: args.batch,
        phases,
        cleanup_error,
    };
    match global.output {
        OutputFormat::Table => print_report(&report),
        OutputFormat::Json => output::print_json(&report),
    }
}

async fn run_phase(
    backend: &Backend,
    publishers: u64,
    args: &MessagesBenchArgs,
) -> Result<PhaseReport> {
    backend.reset().await?;
    let payload: Bytes = (0..args.size).map(|_| rand::random::<u8>()).collect::<Vec<u8>>().into();
    let clients: Vec<Publisher> = (0..publishers).map(|i| backend.publisher(i, &payload)).collect();
    let published = publish_phase(clients, args).await?;
    let stored = backend.stored().await?;
    let drainers = backend.drainers(args.drainers, args.batch).await?;
    let drain = drain_phase(drainers, stored).await?;
    let latency_us = published.latency_us;
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(PhaseReport {
        publishers,
        published_ok: published.measured_ok,
        published_ok_total: published.total_ok,
        msgs_per_second: published.measured_ok as f64 / args.duration.as_secs_f64(),
        latency_ms: (!latency_us.is_empty()).then(|| Latency {
            p50: ms(latency_us.value_at_quantile(0.50)),
            p90: ms(latency_us.value_at_quantile(0.90)),
            p99: ms(latency_us.value_at_quantile(0.99)),
            p999: ms(latency_us.value_at_quantile(0.999)),
            max: ms(latency_us.max()),
        }),
        errors: published.errors,
        drain,
    })
}

/// What one publisher, or all of a phase's, measured.
struct Published {
    latency_us: Histogram<u64>,
    /// Acknowledged publishes sent in the measured stretch.
    measured_ok: u64,
    /// Acknowledged publishes, warmup included.
    total_ok: u64,
    errors: Errors,
}

fn histogram() -> Result<Histogram<u64>> {
    Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_US, 3)
        .map_err(|e| anyhow!("cannot make a histogram: {e}"))
}

fn progress_style() -> Result<ProgressStyle> {
    Ok(ProgressStyle::with_template("{spinner} [{bar:30}] {elapsed:>4} {msg}")
        .context("bad progress template")?
        .progress_chars("=> "))
}

async fn publish_phase(clients: Vec<Publisher>, args: &MessagesBenchArgs) -> Result<Published> {
    let publishers = clients.len();
    let start = Instant::now();
    let clock =
        Clock { measure_from: start + args.warmup, end: start + args.warmup + args.duration };
    let live = Arc::new(Live::default());
    let template = histogram()?;
    let mut tasks = JoinSet::new();
    for client in clients {
        tasks.spawn(run_publisher(client, clock, Arc::clone(&live), template.clone()));
    }

    let total_ms = millis(args.warmup + args.duration);
    let bar = ProgressBar::new(total_ms)
        .with_style(progress_style()?)
        .with_finish(ProgressFinish::AndClear);
    let mut results = Vec::new();
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    let mut last = (Instant::now(), 0u64);
    while !tasks.is_empty() {
        tokio::select! {
            joined = tasks.join_next() => {
                if let Some(joined) = joined {
                    results.push(joined.context("a publisher failed")?);
                }
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                let ok = live.ok.load(Ordering::Relaxed);
                let rate = (ok - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
                last = (now, ok);
                let phase = if now < clock.measure_from { "warming up" } else if now < clock.end { "measuring" } else { "finishing" };
                bar.set_position(millis(now.duration_since(start)));
                bar.set_message(format!("{publishers} publishers, {phase}: {ok} ok, {} errors, {rate:.0}/s", live.errors.load(Ordering::Relaxed)));
            }
        }
    }
    bar.finish_and_clear();

    let mut total =
        Published { latency_us: template, measured_ok: 0, total_ok: 0, errors: Errors::default() };
    for result in results {
        total
            .latency_us
            .add(&result.latency_us)
            .map_err(|e| anyhow!("cannot merge histograms: {e}"))?;
        total.measured_ok += result.measured_ok;
        total.total_ok += result.total_ok;
        total.errors.merge(result.errors);
    }
    Ok(total)
}

/// One publisher: a closed loop until the clock's end.
async fn run_publisher(
    mut publisher: Publisher,
    clock: Clock,
    live: Arc<Live>,
    mut latency_us: Histogram<u64>,
) -> Published {
    let mut measured_ok = 0;
    let mut total_ok = 0;
    let mut errors = Errors::default();
    loop {
        let sent = Instant::now();
        if sent >= clock.end {
            break;
        }
        match publisher.publish().await {
            Ok(()) => {
                live.ok.fetch_add(1, Ordering::Relaxed);
                total_ok += 1;
                if sent >= clock.measure_from {
                    measured_ok += 1;
                    let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                    latency_us.saturating_record(micros.clamp(1, LATENCY_MAX_US));
                }
            }
            Err(failure) => {
                live.errors.fetch_add(1, Ordering::Relaxed);
                errors.add(failure);
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    Published { latency_us, measured_ok, total_ok, errors }
}

/// Counters the drainers share.
#[derive(Default)]
struct DrainLive {
    acked: AtomicU64,
    errors: AtomicU64,
    /// Milliseconds from the drain's start to its latest acknowledgement.
    last_ack_ms: AtomicU64,
}

async fn drain_phase(drainers: Vec<Drainer>, stored: u64) -> Result<DrainReport> {
    let start = Instant::now();
    let live = Arc::new(DrainLive::default());
    let mut tasks = JoinSet::new();
    for drainer in drainers {
        tasks.spawn(run_drainer(drainer, stored, start, Arc::clone(&live)));
    }
    let bar = ProgressBar::new(stored)
        .with_style(progress_style()?)
        .with_finish(ProgressFinish::AndClear);
    let mut errors = Errors::default();
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    while !tasks.is_empty() {
        tokio::select! {
            joined = tasks.join_next() => {
                if let Some(joined) = joined {
                    errors.merge(joined.context("a drainer failed")?);
                }
            }
            _ = ticker.tick() => {
                let acked = live.acked.load(Ordering::Relaxed);
                let rate = acked as f64 / start.elapsed().as_secs_f64().max(1e-3);
                bar.set_position(acked);
                bar.set_message(format!("draining: {acked}/{stored} acked, {} errors, {rate:.0}/s", live.errors.load(Ordering::Relaxed)));
            }
        }
    }
    bar.finish_and_clear();
    let acked = live.acked.load(Ordering::Relaxed);
    let seconds = live.last_ack_ms.load(Ordering::Relaxed) as f64 / 1000.0;
    Ok(DrainReport {
        stored,
        acked,
        missing: stored.saturating_sub(acked),
        seconds,
        msgs_per_second: if seconds > 0.0 { acked as f64 / seconds } else { 0.0 },
        errors,
    })
}

/// One drainer: batches until everything stored is acknowledged or nothing was for a while.
async fn run_drainer(
    mut drainer: Drainer,
    stored: u64,
    start: Instant,
    live: Arc<DrainLive>,
) -> Errors {
    let mut errors = Errors::default();
    loop {
        if live.acked.load(Ordering::Relaxed) >= stored {
            break;
        }
        let last_ack = start + Duration::from_millis(live.last_ack_ms.load(Ordering::Relaxed));
        if last_ack.elapsed() > DRAIN_IDLE_MAX {
            break;
        }
        let step = drainer.drain_batch().await;
        if step.acked > 0 {
            live.acked.fetch_add(step.acked, Ordering::Relaxed);
            live.last_ack_ms.fetch_max(millis(start.elapsed()), Ordering::Relaxed);
        }
        if !step.failures.is_empty() {
            live.errors.fetch_add(step.failures.len() as u64, Ordering::Relaxed);
            for failure in step.failures {
                errors.add(failure);
            }
            tokio::time::sleep(ERROR_PAUSE).await;
        }
    }
    errors
}

fn print_report(r: &Report) -> Result<()> {
    let target = match (r.target, r.nats_replicas) {
        (Target::Nats, Some(replicas)) => {
            format!("NATS JetStream, file storage, replicas: {replicas}")
        }
        _ => "Colony".to_owned(),
    };
    let fields = [
        (
            "machine",
            format!("{} ({} cores), {}", r.machine.cpu_model, r.machine.cores, r.machine.hostname),
        ),
        ("target", target),
        ("endpoints", r.endpoints.join(", ")),
        ("payload", format!("{} bytes", r.payload_bytes)),
        (
            "connections",
            match (&r.send_to, &r.leader) {
                (Some(SendTo::Leader), Some(leader)) => format!(
                    "{} per endpoint, all to the leader {leader}",
                    r.connections_per_endpoint
                ),
                _ => format!("{} per endpoint", r.connections_per_endpoint),
            },
        ),
        (
            "publish calls",
            match r.calls {
                Some(Calls::Batched) => {
                    "gathered into PublishBatch calls per connection, each message answered once committed".to_owned()
                }
                Some(Calls::Single) => "one Publish call per message".to_owned(),
                None => "NATS client publishes, each acknowledged".to_owned(),
            },
        ),
        ("duration", format!("{}s after {}s warmup, per phase", r.duration_s, r.warmup_s)),
        ("drain", format!("{} drainers, batches of {}, one consumer name", r.drainers, r.batch)),
    ];
    output::print_fields(&fields)?;
    output::out("")?;
    let mut table = output::table([
        "PUBLISHERS",
        "MSGS/S",
        "P50 MS",
        "P90 MS",
        "P99 MS",
        "MAX MS",
        "ERRORS",
        "DRAINED",
        "DRAIN MSGS/S",
        "DRAIN ERRORS",
    ]);
    for p in &r.phases {
        let latency = |pick: fn(&Latency) -> f64| {
            p.latency_ms.as_ref().map_or_else(|| "-".to_owned(), |l| format!("{:.3}", pick(l)))
        };
        table.add_row(vec![
            p.publishers.to_string(),
            format!("{:.1}", p.msgs_per_second),
            latency(|l| l.p50),
            latency(|l| l.p90),
            latency(|l| l.p99),
            latency(|l| l.max),
            p.errors.count.to_string(),
            format!("{}/{}", p.drain.acked, p.drain.stored),
            format!("{:.1}", p.drain.msgs_per_second),
            p.drain.errors.count.to_string(),
        ]);
    }
    output::print_table(table)?;
    for p in &r.phases {
        for (what, errors) in [("publish", &p.errors), ("drain", &p.drain.errors)] {
            if errors.count == 0 {
                continue;
            }
            output::out("")?;
            output::out(format!(
                "{what} errors at {} publishers: {}",
                p.publishers,
                errors.summary()
            ))?;
            for (code, example) in &errors.examples {
                output::out(format!("  {code}: {example}"))?;
            }
        }
    }
    if let Some(error) = &r.cleanup_error {
        output::out("")?;
        output::out(format!("cleanup failed: {error}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        args: MessagesBenchArgs,
    }

    fn parse(argv: &[&str]) -> Result<MessagesBenchArgs> {
        let harness =
            Harness::try_parse_from(std::iter::once("messages").chain(argv.iter().copied()))?;
        check_args(&harness.args)?;
        Ok(harness.args)
    }

    #[test]
    fn defaults() {
        let args = match parse(&[]) {
            Ok(args) => args,
            Err(e) => panic!("{e:#}"),
        };
        assert_eq!(args.publishers, vec![1, 500]);
        assert_eq!(args.duration, Duration::from_secs(10));
        assert_eq!(args.warmup, Duration::from_secs(1));
        assert_eq!(args.size, 128);
        assert_eq!(args.target, Target::Colony);
        assert_eq!(args.nats_url, vec!["nats://127.0.0.1:4222".to_owned()]);
        assert_eq!(args.batch, 500);
    }

    #[test]
    fn lists() {
        let args = match parse(&[
            "--publishers",
            "1,16,500",
            "--target",
            "nats",
            "--nats-url",
            "nats://127.0.0.1:4222,nats://127.0.0.1:4223",
        ]) {
            Ok(args) => args,
            Err(e) => panic!("{e:#}"),
        };
        assert_eq!(args.publishers, vec![1, 16, 500]);
        assert_eq!(args.target, Target::Nats);
        assert_eq!(args.nats_url.len(), 2);
    }

    #[test]
    fn bad_arguments() {
        assert!(parse(&["--publishers", "0"]).is_err());
        assert!(parse(&["--publishers", "1,0"]).is_err());
        assert!(parse(&["--duration", "0s"]).is_err());
        assert!(parse(&["--size", "0"]).is_err());
        assert!(parse(&["--size", "65537"]).is_err());
        assert!(parse(&["--batch", "1001"]).is_err());
        assert!(parse(&["--connections", "0"]).is_err());
        assert!(parse(&["--target", "kafka"]).is_err());
        assert!(parse(&["--topic", ""]).is_err());
    }

    #[test]
    fn nats_names_from_a_topic() {
        assert_eq!(stream_name("bench/messages"), "bench_messages");
        assert_eq!(stream_name("a.b:c-d"), "a_b_c-d");
        assert_eq!(subject_name("bench/messages"), "bench.messages");
    }

    #[test]
    fn errors_count_by_code_and_keep_the_first_message() {
        let mut errors = Errors::default();
        errors.add(Failure::new("Unavailable", "first"));
        errors.add(Failure::new("Unavailable", "second"));
        let mut other = Errors::default();
        other.add(Failure::new("ClientTimeout", "late"));
        errors.merge(other);
        assert_eq!(errors.count, 3);
        assert_eq!(errors.by_code.get("Unavailable"), Some(&2));
        assert_eq!(errors.examples.get("Unavailable").map(String::as_str), Some("first"));
        assert_eq!(errors.summary(), "3 (ClientTimeout 1, Unavailable 2)");
        assert_eq!(Errors::default().summary(), "0");
    }
}
