//! The learner agent: follows the cluster's feed of finished tasks, keeps them as training
//! examples, retrains when enough new ones arrived, and publishes a model only when it beats both
//! the naive baseline and the current model on the same holdout.
//!
//! Three activities run side by side and meet in one loop, driven by [`Event`]s: the feed task
//! (`follow`) streams `WatchFinishedTasks` and reconnects across the servers with backoff; the
//! training thread owns the device (a CUDA context stays on the thread that made it) and runs
//! [`decide`] on request; a round task fetches the current model, asks the training thread for a
//! decision and publishes. The loop alone owns the examples and the data directory.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context as _};
use colony_model::features::SCHEMA;
use colony_model::{encode_weights, ModelError, Predictor, WEIGHTS_BYTES_MAX};
use colony_proto::pb;
use colony_proto::pb::admin_client::AdminClient;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::{debug, info, warn};

use crate::decide::{decide, DecideError, Decision, TrainConfig, Verdict};
use crate::device::{Device, SelectedBackend};
use crate::example::{example, Example, Examples};
use crate::metrics::{self, Metrics, RoundOutcome};
use crate::store::Store;

/// How long to wait for a TCP connection to one server before trying the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest one unary call (or opening the feed) may take.
const RPC_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Full passes over the server list one unary call makes before the round gives up.
const RPC_SWEEPS_MAX: u32 = 5;
/// HTTP/2 pings on an idle feed, so a silently dead connection is noticed: a quiet cluster sends
/// nothing for a long time, and that must not look like a hung server or vice versa.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Backoff between attempts to (re)open the feed: starts here, doubles, stops growing at max.
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Finished tasks buffered between the feed task and the loop.
const FEED_CHANNEL_CAPACITY: usize = 1024;
/// The most finished tasks handled (and persisted) as one batch.
const BATCH_RECORDS_MAX: usize = 1024;
/// How often the loop checks whether the retrain interval has passed, at most.
const TICK_MAX: Duration = Duration::from_secs(1);
/// Room in a GetModel reply for the model's fields beside its weights.
const MODEL_REPLY_OVERHEAD_BYTES: usize = 64 << 10;

/// How the learner runs. [`LearnerConfig::new`] fills in the defaults.
#[derive(Clone, Debug)]
pub struct LearnerConfig {
    /// Admin endpoints, `HOST:PORT`; any server answers any request.
    pub servers: Vec<String>,
    /// A join token, which publishing a model requires.
    pub token: String,
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
    pub fn new(servers: Vec<String>, token: String, data_dir: PathBuf) -> Self {
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
            let valid = addr.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok()
            });
            if !valid {
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

/// One client per server, tried in turn.
#[derive(Clone)]
struct Servers {
    clients: Vec<(String, AdminClient<Channel>)>,
}

impl Servers {
    fn new(addrs: &[String]) -> anyhow::Result<Self> {
        let clients = addrs
            .iter()
            .map(|addr| {
                let channel = Endpoint::from_shared(format!("http://{addr}"))
                    .with_context(|| format!("invalid server address {addr:?}"))?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true)
                    .tcp_nodelay(true)
                    .connect_lazy();
                let client = AdminClient::new(channel)
                    .max_decoding_message_size(WEIGHTS_BYTES_MAX + MODEL_REPLY_OVERHEAD_BYTES);
                Ok((addr.clone(), client))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { clients })
    }

    /// Runs a unary call against the servers until one answers, moving on after transport
    /// errors, `Unavailable` and timeouts; any other status is the answer.
    async fn call<T, F, Fut>(&self, what: &str, mut rpc: F) -> anyhow::Result<T>
    where
        F: FnMut(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut backoff = BACKOFF_INITIAL;
        let mut last_error = String::new();
        for _ in 0..RPC_SWEEPS_MAX {
            for (addr, client) in &self.clients {
                match tokio::time::timeout(RPC_ATTEMPT_TIMEOUT, rpc(client.clone())).await {
                    Ok(Ok(response)) => return Ok(response.into_inner()),
                    Ok(Err(status)) if is_retriable(&status) => {
                        last_error = format!("{addr}: {}", status.message());
                    }
                    Ok(Err(status)) => {
                        return Err(anyhow!(
                            "{what}: {addr} answered {:?}: {}",
                            status.code(),
                            status.message()
                        ))
                    }
                    Err(_) => {
                        last_error = format!(
                            "{addr}: no answer within {}",
                            humantime::format_duration(RPC_ATTEMPT_TIMEOUT)
                        );
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        Err(anyhow!(
            "{what}: no server answered in {RPC_SWEEPS_MAX} passes (last error: {last_error})"
        ))
    }
}

/// Whether a status means "this server cannot answer now; another one (or a later try) may".
fn is_retriable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        // A status built on this side from an I/O or HTTP/2 failure carries its source; one that
        // a server sent does not.
        Code::Unknown => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

/// What the feed task reports to the loop.
#[derive(Debug)]
enum FeedEvent {
    Opened { server: String, after_seq: u64 },
    Finished(Box<pb::FinishedTask>),
    Lost { server: String, reason: String },
}

/// How following one server ended.
enum Followed {
    Lost(String),
    /// The loop is gone; stop.
    Closed,
}

/// Follows the feed from `after_seq` on, forever, moving to the next server whenever one fails.
async fn follow(servers: Servers, mut after_seq: u64, feed: mpsc::Sender<FeedEvent>) {
    let mut backoff = BACKOFF_INITIAL;
    for (addr, client) in servers.clients.iter().cycle() {
        let reason =
            match follow_one(client.clone(), addr, &mut after_seq, &feed, &mut backoff).await {
                Followed::Lost(reason) => reason,
                Followed::Closed => return,
            };
        let lost = FeedEvent::Lost {
            server: addr.clone(),
            reason,
        };
        if feed.send(lost).await.is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn follow_one(
    mut client: AdminClient<Channel>,
    addr: &str,
    after_seq: &mut u64,
    feed: &mpsc::Sender<FeedEvent>,
    backoff: &mut Duration,
) -> Followed {
    let request = pb::WatchFinishedTasksRequest {
        after_seq: *after_seq,
    };
    let mut stream =
        match tokio::time::timeout(RPC_ATTEMPT_TIMEOUT, client.watch_finished_tasks(request)).await
        {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                return Followed::Lost(format!("{:?}: {}", status.code(), status.message()))
            }
            Err(_) => return Followed::Lost("no answer to WatchFinishedTasks".to_owned()),
        };
    let opened = FeedEvent::Opened {
        server: addr.to_owned(),
        after_seq: *after_seq,
    };
    if feed.send(opened).await.is_err() {
        return Followed::Closed;
    }
    loop {
        match stream.message().await {
            Ok(Some(finished)) => {
                // A server resumes exactly after the cursor, but a duplicate or a step back
                // (a server whose applied state lags) must never be counted twice.
                if finished.seq <= *after_seq {
                    continue;
                }
                *after_seq = finished.seq;
                // A stream that delivers is healthy: the next failure starts backing off anew.
                *backoff = BACKOFF_INITIAL;
                if feed
                    .send(FeedEvent::Finished(Box::new(finished)))
                    .await
                    .is_err()
                {
                    return Followed::Closed;
                }
            }
            Ok(None) => return Followed::Lost("the server ended the stream".to_owned()),
            Err(status) => {
                return Followed::Lost(format!("{:?}: {}", status.code(), status.message()))
            }
        }
    }
}

/// What the training thread answers: the decision and how long training and evaluation took.
type Trained = Result<(Decision, Duration), DecideError>;

struct Job {
    examples: Vec<Example>,
    current: Option<Predictor>,
    reply: oneshot::Sender<Trained>,
}

/// The training thread's inbox, and the device it resolved.
#[derive(Clone)]
struct TrainingThread {
    jobs: mpsc::Sender<Job>,
    device: String,
}

impl TrainingThread {
    /// Starts the thread, which resolves `device` once and keeps it; fails when the operator
    /// named a GPU that cannot be opened.
    async fn start(device: Device, config: TrainConfig) -> anyhow::Result<Self> {
        // One job at a time: a round waits for its decision before the next can start.
        let (jobs, mut inbox) = mpsc::channel::<Job>(1);
        let (ready, resolved) = oneshot::channel();
        std::thread::Builder::new()
            .name("colony-learn-train".to_owned())
            .spawn(move || {
                let backend = match device.resolve() {
                    Ok(backend) => backend,
                    Err(error) => {
                        // The receiver is waiting for exactly this answer.
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                if ready.send(Ok(backend.describe())).is_err() {
                    return;
                }
                while let Some(job) = inbox.blocking_recv() {
                    let started = Instant::now();
                    let current = job.current.as_ref();
                    let decision = match &backend {
                        SelectedBackend::Cpu(cpu) => decide(cpu, &job.examples, current, &config),
                        SelectedBackend::Cuda(cuda) => {
                            decide(cuda.as_ref(), &job.examples, current, &config)
                        }
                    };
                    // A round aborted at shutdown no longer waits for its answer; nothing is lost.
                    let _ = job
                        .reply
                        .send(decision.map(|decision| (decision, started.elapsed())));
                }
            })
            .context("starting the training thread")?;
        let device_description = resolved
            .await
            .context("the training thread stopped before resolving the device")?
            .with_context(|| format!("opening training device {device}"))?;
        Ok(Self {
            jobs,
            device: device_description,
        })
    }

    async fn train(
        &self,
        examples: Vec<Example>,
        current: Option<Predictor>,
    ) -> anyhow::Result<(Decision, Duration)> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                examples,
                current,
                reply,
            })
            .await
            .map_err(|_| anyhow!("the training thread has stopped"))?;
        let (decision, elapsed) = answer
            .await
            .map_err(|_| anyhow!("the training thread dropped the job"))??;
        Ok((decision, elapsed))
    }
}

/// What a round needs besides its examples.
#[derive(Clone)]
struct RoundContext {
    servers: Servers,
    token: String,
    training: TrainingThread,
    metrics: Arc<Metrics>,
}

/// How a round that ran to the end finished.
#[derive(Debug)]
enum RoundReport {
    Published { version: u64 },
    Kept { verdict: Verdict },
}

/// The current model, when there is one this learner can evaluate.
async fn current_model(servers: &Servers) -> anyhow::Result<Option<(u64, Predictor)>> {
    let list = servers
        .call("ListModels", |mut client| async move {
            client.list_models(pb::ListModelsRequest {}).await
        })
        .await?;
    let Some(version) = list.current else {
        return Ok(None);
    };
    let reply = servers
        .call("GetModel", |mut client| async move {
            client.get_model(pb::GetModelRequest { version }).await
        })
        .await?;
    let Some(model) = reply.model else {
        warn!(
            version,
            "GetModel returned no model; the new model is compared with the baseline only"
        );
        return Ok(None);
    };
    match Predictor::from_model(&model.feature_schema, &model.weights) {
        Ok(predictor) => Ok(Some((version, predictor))),
        Err(ModelError::Schema { schema }) => {
            info!(version, %schema, "the current model uses another feature schema; it is not compared");
            Ok(None)
        }
        Err(error) => {
            warn!(version, error = %error, "the current model cannot be loaded; it is not compared");
            Ok(None)
        }
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

async fn round(context: RoundContext, examples: Vec<Example>) -> anyhow::Result<RoundReport> {
    let current = current_model(&context.servers).await?;
    let current_version = current.as_ref().map(|(version, _)| *version);
    let (decision, elapsed) = context
        .training
        .train(examples, current.map(|(_, predictor)| predictor))
        .await?;
    let evaluation = &decision.evaluation;
    context.metrics.trained(elapsed, evaluation);
    info!(
        verdict = decision.verdict.as_str(),
        holdout_mse = evaluation.holdout_mse,
        baseline_mse = evaluation.baseline_mse,
        previous_mse = ?evaluation.previous_mse,
        current_version = ?current_version,
        train_rows = evaluation.train_rows,
        holdout_rows = evaluation.holdout_rows,
        seconds = elapsed.as_secs_f64(),
        device = %context.training.device,
        "trained a model"
    );
    if decision.verdict != Verdict::Publish {
        return Ok(RoundReport::Kept {
            verdict: decision.verdict,
        });
    }
    let weights = encode_weights(decision.model.mlp());
    let request = pb::PublishModelRequest {
        token: context.token.clone(),
        model: Some(pb::Model {
            version: 0,
            created_unix_ms: unix_ms_now(),
            device: context.training.device.clone(),
            feature_schema: SCHEMA.to_owned(),
            weights_bytes: weights.len() as u64,
            weights,
            metrics: Some(pb::ModelMetrics {
                holdout_mse: evaluation.holdout_mse,
                baseline_mse: evaluation.baseline_mse,
                previous_mse: evaluation.previous_mse,
                train_rows: evaluation.train_rows as u64,
                holdout_rows: evaluation.holdout_rows as u64,
            }),
            current: false,
        }),
    };
    let published = context
        .servers
        .call("PublishModel", |mut client| {
            let request = request.clone();
            async move { client.publish_model(request).await }
        })
        .await?;
    Ok(RoundReport::Published {
        version: published.version,
    })
}

/// Everything the loop reacts to.
enum Event {
    Feed(Option<FeedEvent>),
    RoundEnded(Result<anyhow::Result<RoundReport>, tokio::task::JoinError>),
    Tick,
    Shutdown,
}

/// The loop's own state: examples, persistence and when to train next.
struct Learner {
    config: LearnerConfig,
    store: Store,
    examples: Examples,
    metrics: Arc<Metrics>,
    context: RoundContext,
    /// Examples added since the last round started.
    new_examples: usize,
    /// Of those, the ones the running round took, restored if it fails.
    round_examples: usize,
    last_round: Instant,
    /// After a failed round, the next waits for this.
    retry_at: Option<Instant>,
    round: Option<JoinHandle<anyhow::Result<RoundReport>>>,
}

impl Learner {
    /// Turns a batch of finished tasks into examples, persists the accepted ones and then the
    /// cursor past all of them.
    fn handle_batch(&mut self, batch: Vec<pb::FinishedTask>) -> anyhow::Result<()> {
        let Some(last_seq) = batch.iter().map(|finished| finished.seq).max() else {
            return Ok(());
        };
        let mut accepted = Vec::with_capacity(batch.len());
        for finished in batch {
            match example(&finished) {
                Ok(example) => {
                    self.examples.push(example);
                    accepted.push(finished);
                }
                Err(rejected) => {
                    debug!(seq = finished.seq, reason = %rejected, "finished task is not an example");
                    self.metrics.rejected(&rejected);
                }
            }
        }
        // The data directory is small appends and one tiny file, so this stays on the loop.
        self.store.append(&accepted).context("logging examples")?;
        self.store
            .save_cursor(last_seq)
            .context("saving the cursor")?;
        self.new_examples += accepted.len();
        self.metrics.set_examples(self.examples.len());
        Ok(())
    }

    fn round_due(&self, now: Instant) -> bool {
        self.round.is_none()
            && self.examples.len() >= self.config.min_examples
            && self.new_examples > 0
            && self.retry_at.is_none_or(|at| now >= at)
            && (self.new_examples >= self.config.retrain_every_examples
                || now.duration_since(self.last_round) >= self.config.retrain_interval)
    }

    fn maybe_start_round(&mut self) {
        let now = Instant::now();
        if !self.round_due(now) {
            return;
        }
        info!(
            examples = self.examples.len(),
            new = self.new_examples,
            "training a model"
        );
        self.round_examples = self.new_examples;
        self.new_examples = 0;
        self.last_round = now;
        let snapshot: Vec<Example> = self.examples.iter().cloned().collect();
        self.round = Some(tokio::spawn(round(self.context.clone(), snapshot)));
    }

    fn round_ended(&mut self, report: anyhow::Result<RoundReport>) {
        self.round = None;
        match report {
            Ok(RoundReport::Published { version }) => {
                info!(version, "published the model");
                self.metrics.published(version);
                self.metrics.round_ended(RoundOutcome::Published);
                self.retry_at = None;
            }
            Ok(RoundReport::Kept { verdict }) => {
                info!(reason = verdict.as_str(), "kept the current model");
                self.metrics.round_ended(RoundOutcome::Rejected);
                self.retry_at = None;
            }
            Err(error) => {
                warn!(
                    error = format!("{error:#}"),
                    "training round failed; retrying later"
                );
                self.metrics.round_ended(RoundOutcome::Failed);
                self.new_examples += self.round_examples;
                self.retry_at = Some(Instant::now() + self.config.retrain_interval);
            }
        }
        self.round_examples = 0;
    }
}

/// Runs the learner until `shutdown` completes or a fatal error (the data directory fails, the
/// requested device cannot be opened).
pub async fn run(config: LearnerConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    config.validate()?;
    let (store, recovered) = Store::open(&config.data_dir)
        .with_context(|| format!("opening the data directory {}", config.data_dir.display()))?;
    if recovered.torn_bytes > 0 {
        warn!(
            bytes = recovered.torn_bytes,
            "cut a torn record off the end of the example log"
        );
    }
    let mut examples = Examples::default();
    for record in &recovered.records {
        // Logged records were accepted once; one the current checks refuse is simply left out.
        if let Ok(example) = example(record) {
            examples.push(example);
        }
    }
    let after_seq = recovered.after_seq.max(examples.last_seq().unwrap_or(0));
    let recovered_examples = examples.len();
    info!(
        examples = examples.len(),
        after_seq, "recovered the learner's data"
    );

    let metrics = Arc::new(Metrics::new().context("creating metrics")?);
    metrics.set_examples(examples.len());
    let metrics_task = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics listener on {addr}"))?;
            info!(%addr, "serving metrics");
            Some(metrics::serve(listener, metrics.clone()).context("serving metrics")?)
        }
        None => None,
    };

    let training = TrainingThread::start(config.device, config.train.clone()).await?;
    info!(requested = %config.device, device = %training.device, "training device resolved");

    let servers = Servers::new(&config.servers)?;
    let (feed_sender, mut feed) = mpsc::channel(FEED_CHANNEL_CAPACITY);
    let feed_task = tokio::spawn(follow(servers.clone(), after_seq, feed_sender));

    let tick_period = config.retrain_interval.min(TICK_MAX);
    let mut learner = Learner {
        context: RoundContext {
            servers,
            token: config.token.clone(),
            training,
            metrics: metrics.clone(),
        },
        config,
        store,
        examples,
        metrics,
        // Recovered examples count as new, so a restarted learner trains on them soon.
        new_examples: recovered_examples,
        round_examples: 0,
        last_round: Instant::now(),
        retry_at: None,
        round: None,
    };
    let mut tick = tokio::time::interval(tick_period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);

    let result = loop {
        let event = tokio::select! {
            () = &mut shutdown => Event::Shutdown,
            event = feed.recv() => Event::Feed(event),
            report = async {
                match learner.round.as_mut() {
                    Some(round) => round.await,
                    None => std::future::pending().await,
                }
            } => Event::RoundEnded(report),
            _ = tick.tick() => Event::Tick,
        };
        match event {
            Event::Shutdown => break Ok(()),
            Event::Feed(None) => break Err(anyhow!("the feed task stopped")),
            Event::Feed(Some(first)) => {
                let mut batch = Vec::new();
                let mut next = Some(first);
                while let Some(event) = next.take() {
                    match event {
                        FeedEvent::Finished(finished) => batch.push(*finished),
                        FeedEvent::Opened { server, after_seq } => {
                            info!(%server, after_seq, "following finished tasks");
                            learner.metrics.set_following(true);
                        }
                        FeedEvent::Lost { server, reason } => {
                            warn!(%server, %reason, "lost the feed of finished tasks; reconnecting");
                            learner.metrics.set_following(false);
                            learner.metrics.watch_reconnected();
                        }
                    }
                    if batch.len() < BATCH_RECORDS_MAX {
                        next = feed.try_recv().ok();
                    }
                }
                if let Err(error) = learner.handle_batch(batch) {
                    break Err(error);
                }
                learner.maybe_start_round();
            }
            Event::RoundEnded(Ok(report)) => {
                learner.round_ended(report);
                learner.maybe_start_round();
            }
            Event::RoundEnded(Err(error)) => {
                break Err(anyhow!(error).context("the training round panicked"))
            }
            Event::Tick => learner.maybe_start_round(),
        }
    };
    // Each aborted task is awaited until it is dropped, so that when `run` returns its sockets
    // are closed (a restarted learner can bind the same metrics address) and no round is still
    // publishing. Cancelled is the expected answer, and a panic while stopping changes nothing.
    feed_task.abort();
    let _ = feed_task.await;
    if let Some(task) = metrics_task {
        task.abort();
        let _ = task.await;
    }
    if let Some(round) = learner.round.take() {
        round.abort();
        let _ = round.await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_model::features::SCHEMA;

    #[test]
    fn config_defaults_and_validation() {
        let config = LearnerConfig::new(
            vec!["127.0.0.1:7101".to_owned()],
            "token".to_owned(),
            PathBuf::from("/tmp/learner"),
        );
        assert!(config.validate().is_ok());
        assert_eq!(config.retrain_every_examples, 200);
        assert_eq!(config.retrain_interval, Duration::from_secs(30));
        assert_eq!(config.min_examples, 100);
        assert_eq!(config.train.hidden, vec![32, 32]);
        assert_eq!(config.train.holdout_fraction, 0.2);
        let bad = [
            LearnerConfig {
                servers: vec![],
                ..config.clone()
            },
            LearnerConfig {
                servers: vec!["http://host:1".to_owned()],
                ..config.clone()
            },
            LearnerConfig {
                retrain_every_examples: 0,
                ..config.clone()
            },
            LearnerConfig {
                retrain_interval: Duration::ZERO,
                ..config.clone()
            },
            LearnerConfig {
                min_examples: 1,
                ..config.clone()
            },
            LearnerConfig {
                train: TrainConfig {
                    holdout_fraction: 1.5,
                    ..TrainConfig::default()
                },
                ..config.clone()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
    }

    #[test]
    fn retriable_statuses() {
        assert!(is_retriable(&Status::unavailable("no leader")));
        assert!(!is_retriable(&Status::unknown("server said so")));
        assert!(!is_retriable(&Status::permission_denied("bad token")));
    }

    /// With no server reachable the learner stays up, not ready, and stops cleanly on shutdown,
    /// leaving its data directory behind.
    #[tokio::test]
    async fn runs_without_a_cluster_and_shuts_down() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut config = LearnerConfig::new(
            vec!["127.0.0.1:1".to_owned()],
            "token".to_owned(),
            dir.path().join("learner"),
        );
        config.device = Device::Cpu;
        run(config, tokio::time::sleep(Duration::from_millis(500))).await?;
        assert!(dir.path().join("learner").join("examples.log").exists());
        Ok(())
    }

    /// An Admin service with only what the learner calls: a feed of fixed records that ends the
    /// first stream after `first_stream_records` (a server going away), then a model registry.
    struct FakeAdmin {
        records: Vec<pb::FinishedTask>,
        first_stream_records: usize,
        state: Arc<std::sync::Mutex<FakeState>>,
    }

    #[derive(Default)]
    struct FakeState {
        watch_after: Vec<u64>,
        models: Vec<pb::Model>,
        tokens: Vec<String>,
        get_model_calls: usize,
        /// Keeps later streams open, as a live server does.
        open_streams: Vec<mpsc::Sender<Result<pb::FinishedTask, Status>>>,
    }

    fn fake_state(state: &std::sync::Mutex<FakeState>) -> std::sync::MutexGuard<'_, FakeState> {
        // A test thread that panicked while holding the lock has already failed the test.
        state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    type Reply<T> = Result<tonic::Response<T>, Status>;

    #[tonic::async_trait]
    impl pb::admin_server::Admin for FakeAdmin {
        type WatchFinishedTasksStream = tonic::codegen::tokio_stream::wrappers::ReceiverStream<
            Result<pb::FinishedTask, Status>,
        >;

        async fn watch_finished_tasks(
            &self,
            request: tonic::Request<pb::WatchFinishedTasksRequest>,
        ) -> Reply<Self::WatchFinishedTasksStream> {
            let after_seq = request.into_inner().after_seq;
            let (sender, receiver) = mpsc::channel(self.records.len() + 1);
            let mut state = fake_state(&self.state);
            let first = state.watch_after.is_empty();
            state.watch_after.push(after_seq);
            let mut pending = self.records.iter().filter(|r| r.seq > after_seq);
            let take = if first {
                self.first_stream_records
            } else {
                usize::MAX
            };
            for record in pending.by_ref().take(take) {
                sender
                    .try_send(Ok(record.clone()))
                    .map_err(|e| Status::internal(e.to_string()))?;
            }
            if !first {
                state.open_streams.push(sender);
            }
            Ok(tonic::Response::new(
                tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(receiver),
            ))
        }

        async fn publish_model(
            &self,
            request: tonic::Request<pb::PublishModelRequest>,
        ) -> Reply<pb::PublishModelResponse> {
            let request = request.into_inner();
            let mut state = fake_state(&self.state);
            let version = state.models.len() as u64 + 1;
            let mut model = request
                .model
                .ok_or_else(|| Status::invalid_argument("no model"))?;
            model.version = version;
            state.models.push(model);
            state.tokens.push(request.token);
            Ok(tonic::Response::new(pb::PublishModelResponse { version }))
        }

        async fn list_models(
            &self,
            _: tonic::Request<pb::ListModelsRequest>,
        ) -> Reply<pb::ListModelsResponse> {
            let state = fake_state(&self.state);
            Ok(tonic::Response::new(pb::ListModelsResponse {
                models: vec![],
                current: state.models.last().map(|model| model.version),
            }))
        }

        async fn get_model(
            &self,
            request: tonic::Request<pb::GetModelRequest>,
        ) -> Reply<pb::GetModelResponse> {
            let version = request.into_inner().version;
            let mut state = fake_state(&self.state);
            state.get_model_calls += 1;
            let model = state.models.iter().find(|m| m.version == version).cloned();
            Ok(tonic::Response::new(pb::GetModelResponse { model }))
        }

        async fn submit_task(
            &self,
            _: tonic::Request<pb::SubmitTaskRequest>,
        ) -> Reply<pb::SubmitTaskResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn get_task(
            &self,
            _: tonic::Request<pb::GetTaskRequest>,
        ) -> Reply<pb::GetTaskResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn list_tasks(
            &self,
            _: tonic::Request<pb::ListTasksRequest>,
        ) -> Reply<pb::ListTasksResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn cancel_task(
            &self,
            _: tonic::Request<pb::CancelTaskRequest>,
        ) -> Reply<pb::CancelTaskResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn cluster_status(
            &self,
            _: tonic::Request<pb::ClusterStatusRequest>,
        ) -> Reply<pb::ClusterStatusResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn state_digest(
            &self,
            _: tonic::Request<pb::StateDigestRequest>,
        ) -> Reply<pb::StateDigestResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn cluster_info(
            &self,
            _: tonic::Request<pb::ClusterInfoRequest>,
        ) -> Reply<pb::ClusterInfoResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn join_cluster(
            &self,
            _: tonic::Request<pb::JoinClusterRequest>,
        ) -> Reply<pb::JoinClusterResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn remove_node(
            &self,
            _: tonic::Request<pb::RemoveNodeRequest>,
        ) -> Reply<pb::RemoveNodeResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn create_join_token(
            &self,
            _: tonic::Request<pb::CreateJoinTokenRequest>,
        ) -> Reply<pb::CreateJoinTokenResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn list_executors(
            &self,
            _: tonic::Request<pb::ListExecutorsRequest>,
        ) -> Reply<pb::ListExecutorsResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn drain_executor(
            &self,
            _: tonic::Request<pb::DrainExecutorRequest>,
        ) -> Reply<pb::DrainExecutorResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn rollback_model(
            &self,
            _: tonic::Request<pb::RollbackModelRequest>,
        ) -> Reply<pb::RollbackModelResponse> {
            Err(Status::unimplemented("fake"))
        }
    }

    /// Polls `done` every 50 ms for up to 60 s.
    async fn wait_for<F, Fut>(what: &str, mut done: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        for _ in 0..1200 {
            if done().await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(anyhow!("timed out waiting for {what}"))
    }

    /// A plain HTTP/1.1 GET: the status code and the body, or `None` while nothing listens.
    async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: learner\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let status = response.split(' ').nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n")?.1.to_owned();
        Some((status, body))
    }

    async fn metric_line(addr: SocketAddr, line: &str) -> bool {
        http_get(addr, "/metrics")
            .await
            .is_some_and(|(_, body)| body.lines().any(|l| l == line))
    }

    /// A port nothing listens on now; the learner binds it a moment later.
    fn free_addr() -> anyhow::Result<SocketAddr> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
    }

    fn start(config: &LearnerConfig) -> (oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>) {
        let (stop, stopped) = oneshot::channel::<()>();
        let learner = tokio::spawn(run(config.clone(), async move {
            // Either a stop or a dropped sender ends the learner.
            let _ = stopped.await;
        }));
        (stop, learner)
    }

    /// The whole agent against a fake server: it follows the feed across a dropped stream,
    /// counts failed tasks as rejected, trains, publishes a model that beats the baseline with the
    /// token, serves its metrics and readiness, and persists its cursor; restarted, it resumes
    /// after the cursor, and a round that cannot improve on the current model publishes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follows_trains_publishes_and_resumes() -> anyhow::Result<()> {
        let mut records = crate::decide::tests::synthetic_records(600, 7);
        for record in records.iter_mut().step_by(10) {
            if let Some(task) = record.task.as_mut() {
                task.state = pb::TaskState::Failed as i32;
            }
        }
        let accepted = records.len() - records.len().div_ceil(10);
        let last_seq = records.iter().map(|r| r.seq).max().unwrap_or(0);
        let state = Arc::new(std::sync::Mutex::new(FakeState::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None)
            .map_err(|e| anyhow!("{e}"))?;
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::admin_server::AdminServer::new(FakeAdmin {
                    records,
                    first_stream_records: 250,
                    state: state.clone(),
                }))
                .serve_with_incoming(incoming),
        );

        let dir = tempfile::tempdir()?;
        let metrics_addr = free_addr()?;
        let mut config = LearnerConfig::new(
            vec![addr.to_string()],
            "secret".to_owned(),
            dir.path().to_owned(),
        );
        config.device = Device::Cpu;
        config.metrics_listen = Some(metrics_addr);
        config.retrain_interval = Duration::from_millis(300);
        config.train.steps = 400;
        let models = || fake_state(&state).models.clone();

        // First run: everything from the start of the feed.
        let (stop, learner) = start(&config);
        wait_for("readiness", || async {
            http_get(metrics_addr, "/readyz")
                .await
                .map(|(status, _)| status)
                == Some(200)
        })
        .await?;
        wait_for("a published model", || async { !models().is_empty() }).await?;
        let cursor = format!("{{\"version\":1,\"after_seq\":{last_seq}}}");
        wait_for("the cursor", || async {
            std::fs::read_to_string(dir.path().join("cursor.json")).is_ok_and(|text| text == cursor)
        })
        .await?;
        for line in [
            "colony_learner_examples_rejected_total{reason=\"not_succeeded\"} 60".to_owned(),
            format!("colony_learner_examples {accepted}"),
            "colony_system_health{component=\"learner\",status=\"healthy\"} 1".to_owned(),
            "colony_learner_watch_reconnects_total 1".to_owned(),
        ] {
            assert!(metric_line(metrics_addr, &line).await, "missing {line}");
        }
        let _ = stop.send(());
        learner.await??;
        {
            let state = fake_state(&state);
            assert_eq!(state.watch_after[..2], [0, 250], "{:?}", state.watch_after);
            assert!(state.tokens.iter().all(|token| token == "secret"));
            let model = &state.models[0];
            assert_eq!(model.feature_schema, SCHEMA);
            assert_eq!(model.device, "cpu");
            assert_eq!(model.weights_bytes, model.weights.len() as u64);
            Predictor::from_model(&model.feature_schema, &model.weights)?;
            let metrics = model.metrics.unwrap_or_default();
            assert!(metrics.holdout_mse < metrics.baseline_mse, "{metrics:?}");
            assert_eq!(metrics.previous_mse, None);
            // The first round starts once enough records arrived, never with more than exist.
            assert!(metrics.train_rows + metrics.holdout_rows <= accepted as u64);
        }

        // Second run: resumes after the cursor and trains on the logged examples, all of them.
        let (stop, learner) = start(&config);
        wait_for("the resumed feed", || async {
            fake_state(&state).watch_after.last() == Some(&last_seq)
        })
        .await?;
        wait_for("a round", || async {
            metric_line(
                metrics_addr,
                "colony_learner_trainings_total{outcome=\"published\"} 1",
            )
            .await
                || metric_line(
                    metrics_addr,
                    "colony_learner_trainings_total{outcome=\"rejected\"} 1",
                )
                .await
        })
        .await?;
        let _ = stop.send(());
        learner.await??;

        // Third run: the same examples and seed give the same model as the second run's, which
        // either is the current model or lost to it, so it is not published.
        let published = models().len();
        let (stop, learner) = start(&config);
        wait_for("a rejected round", || async {
            metric_line(
                metrics_addr,
                "colony_learner_trainings_total{outcome=\"rejected\"} 1",
            )
            .await
        })
        .await?;
        let _ = stop.send(());
        learner.await??;
        assert_eq!(models().len(), published);
        server.abort();
        Ok(())
    }
}
