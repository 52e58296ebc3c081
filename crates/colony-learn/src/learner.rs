//! The learner agent: follows the cluster's feed of finished tasks, keeps them as training
//! examples, retrains when enough new ones arrived, and publishes a model only when it beats both
//! the naive baseline and the current model on the same holdout.
//!
//! Three activities run side by side and meet in one loop, driven by [`Event`]s: the feed task
//! (`follow`) streams `WatchFinishedTasks` and reconnects across the servers with backoff; the
//! training thread owns the device (a CUDA context stays on the thread that made it) and runs
//! [`decide`] on request; a round task fetches the current model, asks the training thread for a
//! decision and publishes. The loop alone owns the examples and the data directory.

mod config;
mod feed;
mod identity;
mod round;
#[cfg(test)]
mod tests;
mod training;

pub use identity::enrolled;

pub use config::{ConfigError, LearnerConfig};

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use colony_client::{Client, ClientConfig, Keepalive};
use colony_proto::pb;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::example::{example, Example, Examples};
use crate::metrics::{Metrics, RoundOutcome};
use crate::store::Store;
use colony_model::WEIGHTS_BYTES_MAX;
use feed::{follow, FeedEvent};
use round::{round, RoundContext, RoundReport};
use training::TrainingThread;

/// How long to wait for a TCP connection to one server before trying the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest one unary call (or opening the feed) may take on one server.
const RPC_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest one unary call may take across every server before the round gives up (and is
/// retried after the retrain interval).
const RPC_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/2 pings on an idle feed, so a silently dead connection is noticed: a quiet cluster sends
/// nothing for a long time, and that must not look like a hung server or vice versa.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Finished tasks buffered between the feed task and the loop.
const FEED_CHANNEL_CAPACITY: usize = 1024;
/// The most finished tasks handled (and persisted) as one batch.
const BATCH_RECORDS_MAX: usize = 1024;
/// How often the loop checks whether the retrain interval has passed, at most.
const TICK_MAX: Duration = Duration::from_secs(1);
/// Room in a GetModel reply for the model's fields beside its weights.
const MODEL_REPLY_OVERHEAD_BYTES: usize = 64 << 10;

/// The admin client the rounds and the feed share: the feed's keepalive, and room for a model.
fn admin_client(
    servers: &[String],
    auth: &colony_client::Auth,
) -> Result<Client, colony_client::ClientError> {
    let config = ClientConfig {
        timeout: RPC_TIMEOUT,
        attempt_timeout_max: RPC_ATTEMPT_TIMEOUT,
        connect_timeout: CONNECT_TIMEOUT,
        keepalive: Some(Keepalive { interval: KEEPALIVE_INTERVAL, timeout: KEEPALIVE_TIMEOUT }),
        decoding_message_bytes_max: WEIGHTS_BYTES_MAX + MODEL_REPLY_OVERHEAD_BYTES,
    };
    Client::with_config(servers, config, auth)
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
    /// Retention removed the records after `from` up to `to` before they were read: counted as
    /// missed, and the cursor moves past them (records read after the gap move it further).
    fn skipped(&mut self, from: u64, to: u64) -> anyhow::Result<()> {
        warn!(
            after = from,
            resume_after = to,
            "retention removed finished tasks before the learner read them"
        );
        self.metrics.feed_missed(to - from);
        self.store.save_cursor(to).context("saving the cursor")
    }

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
        self.store.save_cursor(last_seq).context("saving the cursor")?;
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
        info!(examples = self.examples.len(), new = self.new_examples, "training a model");
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
                warn!(error = format!("{error:#}"), "training round failed; retrying later");
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
    tokio::pin!(shutdown);
    config.validate()?;
    let (store, recovered) = Store::open(&config.data_dir)
        .with_context(|| format!("opening the data directory {}", config.data_dir.display()))?;
    if recovered.torn_bytes > 0 {
        warn!(bytes = recovered.torn_bytes, "cut a torn record off the end of the example log");
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
    info!(examples = examples.len(), after_seq, "recovered the learner's data");

    let metrics = Arc::new(Metrics::new().context("creating metrics")?);
    metrics.set_examples(examples.len());
    let http = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics listener on {addr}"))?;
            info!(%addr, "serving metrics");
            metrics.add_process_collector().context("serving metrics")?;
            let (stop, stopped) = oneshot::channel::<()>();
            let shutdown = async {
                // A dropped sender stops the endpoint as well.
                let _ = stopped.await;
            };
            let served = colony_process::serve_http(listener, metrics.clone(), shutdown);
            let task = tokio::spawn(async move {
                if let Err(error) = served.await {
                    tracing::error!(%error, "metrics endpoint stopped");
                }
            });
            Some((stop, task))
        }
        None => None,
    };

    let training = TrainingThread::start(config.device, config.train.clone()).await?;
    info!(requested = %config.device, device = %training.device, "training device resolved");

    // Enrolling waits for a server to answer; a stop ends the wait.
    let identity = tokio::select! {
        identity = identity::obtain(&config.servers, config.token.as_deref(), &config.data_dir) => identity?,
        () = &mut shutdown => {
            info!("stopped before the learner could enroll");
            return Ok(());
        }
    };
    let client = admin_client(&config.servers, &identity.auth()?)?;
    let (feed_sender, mut feed) = mpsc::channel(FEED_CHANNEL_CAPACITY);
    let feed_task = tokio::spawn(follow(client.clone(), after_seq, feed_sender));

    let tick_period = config.retrain_interval.min(TICK_MAX);
    let mut learner = Learner {
        context: RoundContext { client, training, metrics: metrics.clone() },
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
                let mut skipped = None;
                let mut next = Some(first);
                while let Some(event) = next.take() {
                    match event {
                        FeedEvent::Finished(finished) => batch.push(*finished),
                        FeedEvent::Opened { server, after_seq } => {
                            info!(%server, after_seq, "following finished tasks");
                            learner.metrics.set_following(true);
                        }
                        FeedEvent::Skipped { from, to } => {
                            skipped = Some((skipped.map_or(from, |(first, _)| first), to));
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
                if let Some((from, to)) = skipped {
                    if let Err(error) = learner.skipped(from, to) {
                        break Err(error);
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
    // Each stopped task is awaited until it is gone, so that when `run` returns its sockets are
    // closed (a restarted learner can bind the same metrics address) and no round is still
    // publishing. Cancelled is the expected answer, and a panic while stopping changes nothing.
    feed_task.abort();
    let _ = feed_task.await;
    if let Some((stop, task)) = http {
        let _ = stop.send(());
        let _ = task.await;
    }
    if let Some(round) = learner.round.take() {
        round.abort();
        let _ = round.await;
    }
    result
}
